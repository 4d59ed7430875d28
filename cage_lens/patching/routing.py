"""Routing-aware patching (RAP): TransformerLens' patching grids where the effect of a patch may travel
through *where attention looks*, at a bounded cost (docs/patching.md#routing-aware-patching).

A one-backward estimate (relevance or attribution patching) reads a patch's effect off one gradient.
When the patch switches an attention row on a saturated softmax, that gradient is ~0 (and CP-LRP holds
patterns constant by design), so the estimate misses the effect, sign included. RAP:

1. runs every changed cell exactly (:class:`~cage_lens.patching.exact.SuffixPatcher`) when that fits the
   budget — cheap whenever the corruption is late in the prompt;
2. otherwise estimates the grids, the single-row ones with :class:`RowEstimate` (the patched row's own
   trajectory exact, every later row's read of its new key and value re-softmaxed exactly), the others
   with the one-backward estimate; then patches exactly the all-position head grids when they fit and the
   cells with the highest priority (``|estimate| + |estimate − one-backward|``) until the budget is spent.

The estimate stage also yields the per-cell flags of :data:`~cage_lens.patching.result.FLAG_NAMES`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch

from cage_lens.core.adapter import ModelAdapter, visible_keys
from cage_lens.patching.estimate import gradients, linear_grid
from cage_lens.patching.exact import Cell, SuffixPatcher, cells_of
from cage_lens.patching.grids import Grid
from cage_lens.patching.result import PatchResult
from cage_lens.patching.rules import resolve_patch_rules
from cage_lens.patching.runs import PatchRun

__all__ = ["RowEstimate", "LayerAttention", "routing_patch_run", "routing_names", "tl_forwards", "SWITCH", "SATURATED"]

#: an attention row "switches" when its total variation distance moves by at least this much
SWITCH = 0.5
#: ... on a saturated softmax: the top probability p has p(1 − p) below this before or after
SATURATED = 0.05


def tl_forwards(run: PatchRun, grids: Sequence[Grid]) -> int:
    """Forwards TransformerLens' sweep runs for ``grids``: one per cell."""
    return int(sum(run.changes(g)[0].numel() for g in grids))


def _expand(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Grouped-query keys/values ``[..., kv_head, d_head]`` repeated to one per query head."""
    return x.repeat_interleave(n_heads // x.shape[-2], dim=-2) if x.shape[-2] != n_heads else x


def routing_names(adapter: ModelAdapter, layer: int) -> dict[str, str]:
    """Hook names RAP reads at ``layer``: the rotated (or plain) query and key, the value, pattern and z."""
    site = adapter.layer(layer)
    return {"q": site.rot_q or site.q, "k": site.rot_k or site.k, "v": site.v,
            "pattern": adapter.attn_hook(layer, "hook_pattern"), "z": site.z}


@dataclass
class LayerAttention:
    """One layer's attention on the patched run, float64: rotated queries ``q`` [batch, pos, head, d_head],
    keys ``k`` and values ``v`` (one per query head), scores ``scores`` [batch, head, dest, src] (−inf where
    a query does not see the key: above the diagonal, and outside a sliding window), ``lse`` their row
    log-sum-exp, ``pattern``, the score scale and ``visible`` [dest, src], which keys each query sees."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scores: torch.Tensor
    lse: torch.Tensor
    pattern: torch.Tensor
    scale: float
    visible: torch.Tensor

    @classmethod
    def of(cls, run: PatchRun, layer: int) -> "LayerAttention | None":
        """The layer's attention recomputed from its cached q, k; None when that does not reproduce the
        cached pattern (a soft-cap, ALiBi, ...: the closed form below would be wrong)."""
        names = routing_names(run.adapter, layer)
        scale = run.adapter.score_scale(layer)
        if scale is None or run.adapter.layer(layer).attn_softcap:
            return None
        acts = run.activations
        n_heads = run.adapter.arch.n_heads
        q = acts[names["q"]].double()
        k = _expand(acts[names["k"]].double(), n_heads)
        v = _expand(acts[names["v"]].double(), n_heads)
        length = q.shape[1]
        scores = torch.einsum("bihe,bjhe->bhij", q, k) * scale
        visible = visible_keys(torch.arange(length, device=q.device), length, run.adapter.attention_window(layer))
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = scores.logsumexp(-1)
        pattern = (scores - lse[..., None]).exp()
        cached = acts[names["pattern"]]
        # float64 models may still run their softmax in float32 inside (HF eager attention); a soft-cap or
        # ALiBi moves probabilities by far more
        tolerance = 1e-5 if cached.dtype == torch.float64 else 1e-4
        if not float((pattern - cached.double()).abs().max()) <= tolerance:
            return None
        return cls(q, k, v, scores, lse, pattern, scale, visible)

    def later_readers(self, rows: torch.Tensor) -> torch.Tensor:
        """``[len(rows), T]``: which rows ``i > p`` see key ``p``, for each ``p`` in ``rows`` (the rows that
        re-read a key when row ``p``'s key changes; under a sliding window, only while ``p`` is inside it)."""
        after = torch.arange(self.visible.shape[-1], device=rows.device)[None, :] > rows[:, None]
        return self.visible.index_select(1, rows).T & after


class RowEstimate:
    """Routing-aware estimate of grids whose cells patch one query row ``p`` (resid_pre, attn_out,
    mlp_out, the by-position head and pattern grids).

    Rows before ``p`` do not move, so row ``p``'s patched trajectory is computed exactly, all layers
    (one row per cell, :meth:`SuffixPatcher.rows`). Rows ``i > p`` see the patch only through the new key
    ``k'`` and value ``v'`` of row ``p`` at each layer; each such read is evaluated exactly for that layer —
    the row's softmax recomputed with the new score ``s'_i = scale · q_i·k'`` — and carried to the metric
    by the gradient ``G_i = ∂metric/∂z_i`` under the rules (CP-LRP: patterns held downstream):

        estimate = [metric with row p's new logits − metric] + Σ_layers Σ_{i>p} ⟨z'_i − z_i, G_i⟩,
        ⟨z'_i − z_i, G_i⟩ = (P_ip − P'_ip) A_ip + P'_ip ⟨v', G_i⟩ − P_ip ⟨v_p, G_i⟩,
        P'_ip = exp(s'_i − lse'_i),  lse'_i = logaddexp(lse_i^{¬p}, s'_i),

    with ``A_ip`` the mean of ``⟨v_j, G_i⟩`` under row ``i``'s softmax without key ``p`` and
    ``lse^{¬p}`` its log-normaliser (docs/patching.md#the-row-exact-estimate). Exact when the metric reads
    no row after ``p``; otherwise first order in how the later rows' own queries move."""

    def __init__(self, run: PatchRun, patcher: SuffixPatcher, z_grads: dict[str, torch.Tensor]):
        self.run, self.patcher = run, patcher
        self.layers = [LayerAttention.of(run, layer) for layer in range(run.adapter.arch.n_layers)]
        self.reads: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: ⟨v_j, G_i⟩ and Σ_j P_ij ⟨v_j, G_i⟩
        if self.available:
            for layer, att in enumerate(self.layers):
                G = z_grads[routing_names(run.adapter, layer)["z"]].double()  # [batch, pos, head, d_head]
                w = torch.einsum("bjhe,bihe->bhij", att.v, G)
                self.reads.append((w, (att.pattern * w).sum(-1)))
            arch, B, T = run.adapter.arch, run.batch, run.length
            run.ledger.add("routing estimate", arch.n_layers * B * arch.n_heads * T * T * 4 * arch.d_head)
        self.z_grads = z_grads

    @property
    def available(self) -> bool:
        """Whether every layer's attention is softmax(q·k · scale) as cached (see :meth:`LayerAttention.of`)."""
        return all(layer is not None for layer in self.layers)

    def estimate(self, cells: dict[str, Sequence[Cell]]) -> dict[str, dict[str, torch.Tensor]]:
        """Per grid (``cells``: the changed cells of each single-row grid), ``{"estimate", "direct", "cross",
        "magnitude", "routing_tv", "saturation"}``, each a grid (float64): ``magnitude`` is Σ |terms|,
        ``routing_tv`` the largest total-variation change of an attention row the cell causes (its own
        row, or a later row's read), ``saturation`` p(1 − p) of that row's top key. The row trajectories of
        every grid's cells run together, in one batch."""
        run = self.run
        every = [c for name in cells for c in cells[name]]
        n_layers = run.adapter.arch.n_layers
        captures = [name for layer in range(n_layers) for key, name in routing_names(run.adapter, layer).items()
                    if key in ("k", "v", "pattern")]
        logits, captured = self.patcher.rows(every, captures) if every else ({}, {})
        acc = {k: torch.zeros(len(every), dtype=torch.float64) for k in ("direct", "cross", "magnitude", "routing_tv")}
        acc["saturation"] = torch.full((len(every),), 0.25, dtype=torch.float64)
        layers = torch.tensor([c.layer for c in every], dtype=torch.long)
        for layer in range(n_layers):
            mine = (layers <= layer).nonzero().flatten()
            if len(mine):
                names = routing_names(run.adapter, layer)
                self._layer_terms(layer, [every[i] for i in mine.tolist()], mine, captured[names["k"]][mine],
                                  captured[names["v"]][mine], captured[names["pattern"]][mine], acc)
        for i, row_logits in logits.items():
            acc["direct"][i] = run.metric_with([every[i].first], row_logits[:, None])
        acc["magnitude"] += acc["direct"].abs()
        acc["estimate"] = acc["direct"] + acc["cross"]
        out = {}
        for name, grid_cells in cells.items():
            shape = run.changes(grid_cells[0].grid)[0].shape if grid_cells else None
            if shape is None:
                continue
            out[name] = {k: torch.zeros(shape, dtype=torch.float64) for k in acc}
            out[name]["saturation"].fill_(0.25)
        for i, cell in enumerate(every):
            at = (cell.layer,) + cell.index
            for key, values in acc.items():
                out[cell.grid.name][key][at] = values[i]
        return out

    def _layer_terms(self, layer: int, cells: Sequence[Cell], at: torch.Tensor, k_new: torch.Tensor,
                     v_new: torch.Tensor, own: torch.Tensor, acc: dict) -> None:
        """Add layer ``layer``'s terms of ``cells`` (their new key, value and own attention row) to
        ``acc[...][at]``."""
        run, att = self.run, self.layers[layer]
        names = routing_names(run.adapter, layer)
        n_heads = run.adapter.arch.n_heads
        B, T = run.batch, run.length
        C = len(cells)
        G = self.z_grads[names["z"]].double()  # [B, T, H, dh]
        w, total = self.reads[layer]
        rows = torch.tensor([c.first for c in cells], device=att.pattern.device)  # the terms stay on the model's device
        zero = att.pattern.new_zeros(())
        k_new, v_new = _expand(k_new.double(), n_heads), _expand(v_new.double(), n_heads)  # [C,B,H,dh]

        # the cell's own row: its attention along the exact trajectory
        old_own = att.pattern[:, :, rows].permute(2, 0, 1, 3)  # [C,B,H,T]
        own = own.double()
        own_tv = ((own - old_own).abs().sum(-1) / 2).flatten(1)  # [C, B·H]
        own_sat = torch.minimum(_peak(old_own), _peak(own)).flatten(1)

        # later rows i > p re-reading the new key and value (closed form per row, see the class docstring)
        col = lambda m: m.index_select(-1, rows).permute(3, 0, 1, 2)  # [B,H,T,T] -> [C,B,H,T] (column p, rows i)
        live = att.later_readers(rows)[:, None, None, :]  # [C,1,1,T]
        p_old = torch.where(live, col(att.pattern), zero)
        s_new = torch.einsum("bihe,cbhe->cbhi", att.q, k_new) * att.scale
        w_old = col(w)
        w_new = torch.einsum("cbhe,bihe->cbhi", v_new, G)
        lse_rest, mean_rest = self._without_column(att, w, total, rows)
        lse_new = torch.logaddexp(lse_rest, s_new)
        p_new = torch.where(live, (s_new - lse_new).exp(), zero)
        term = torch.where(live, (p_old - p_new) * mean_rest + p_new * w_new - p_old * w_old, zero)
        change = (p_new - p_old).abs().flatten(1)  # a row's total variation when only column p moves
        top_other = self._top_other(att, rows)  # [C,B,H,T]
        rescale = (att.lse[None] - lse_new).exp()
        cross_sat = torch.minimum(_peak(torch.maximum(top_other, p_old), reduce=False),
                                  _peak(torch.maximum(top_other * rescale, p_new), reduce=False)).flatten(1)

        tv_all = torch.cat([own_tv, change], dim=1)
        sat_all = torch.cat([own_sat, cross_sat], dim=1)
        tv, where = tv_all.max(1)
        sat = sat_all.gather(1, where[:, None])[:, 0]
        tv, sat = tv.cpu(), sat.cpu()  # the accumulators live on the CPU
        acc["cross"][at] += term.sum(dim=(1, 2, 3)).cpu()
        acc["magnitude"][at] += term.abs().sum(dim=(1, 2, 3)).cpu()
        better = tv > acc["routing_tv"][at]
        acc["routing_tv"][at] = torch.where(better, tv, acc["routing_tv"][at])
        acc["saturation"][at] = torch.where(better, sat, acc["saturation"][at])
        arch = run.adapter.arch
        run.ledger.add("routing estimate", C * B * n_heads * T * (4 * arch.d_head + 20))

    @staticmethod
    def _without_column(att: LayerAttention, w: torch.Tensor, total: torch.Tensor, rows: torch.Tensor):
        """For each cell row ``p`` and every row ``i > p``: ``lse_i^{¬p}`` (log Σ_{j≠p} e^{S_ij}) and ``A_ip``
        (the mean of ``w_ij`` under row i's softmax without key p), both [C, B, H, T]. Where ``P_ip < ½``
        from the row's own sums; elsewhere directly (no cancellation when a row sits on key p)."""
        P = att.pattern.index_select(-1, rows).permute(3, 0, 1, 2)  # [C,B,H,T]
        w_col = w.index_select(-1, rows).permute(3, 0, 1, 2)
        safe = P < 0.5
        kept = 1 - torch.where(safe, P, torch.zeros_like(P))
        lse_rest = att.lse[None] + kept.log()
        mean_rest = (total[None] - P * w_col) / kept
        later = torch.arange(P.shape[-1], device=P.device)[None, :] > rows[:, None]  # [C, T]
        c, b, h, i = ((~safe) & later[:, None, None, :]).nonzero().unbind(1)
        if len(c):
            row = att.scores[b, h, i].clone()  # [N, T]
            row[torch.arange(len(c), device=row.device), rows[c]] = float("-inf")
            lse_rest[c, b, h, i] = row.logsumexp(-1)
            mean_rest[c, b, h, i] = (row.softmax(-1) * w[b, h, i]).sum(-1)
        return lse_rest, mean_rest

    @staticmethod
    def _top_other(att: LayerAttention, rows: torch.Tensor) -> torch.Tensor:
        """The largest probability of each row ``i`` on a key other than the cell's row, [C, B, H, T]."""
        top2, idx = att.pattern.topk(min(2, att.pattern.shape[-1]), dim=-1)
        first, second = top2[..., 0], top2[..., -1] if top2.shape[-1] > 1 else torch.zeros_like(top2[..., 0])
        on_p = idx[..., 0][None] == rows.view(-1, 1, 1, 1)
        return torch.where(on_p, second[None], first[None])


def _peak(p: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """``p(1 − p)`` of a row's top probability (``reduce``: of the row's max over its last axis)."""
    top = p.amax(-1) if reduce else p
    return top * (1 - top)


def _flags(est: dict[str, torch.Tensor], linear: torch.Tensor, changed: torch.Tensor) -> dict[str, torch.Tensor]:
    estimate = est["estimate"]
    scale = float(estimate.abs().max()) if estimate.numel() else 0.0
    tv, cross = est["routing_tv"], est["cross"]
    flags = {
        "saturated_switch": (tv >= SWITCH) & (est["saturation"] < SATURATED),
        "disagree": (estimate - linear.double()).abs() > 0.1 * scale,
        "cross_routing": (cross.abs() > 0.5 * estimate.abs()) & (tv >= 0.3) & (cross.abs() > 0.02 * scale),
        "cancellation": (est["magnitude"] > 3 * estimate.abs()) & (est["magnitude"] > 0.1 * scale),
    }
    return {name: mask & changed for name, mask in flags.items()}


def primary_rules(grids: Sequence[Grid], rules: dict[str, object]):
    """The rule set of RAP's main one-backward estimate: that of the single-row grids (or the first grid)."""
    rows = [g for g in grids if g.row_axis is not None] or list(grids)
    return resolve_patch_rules(rules[rows[0].name])


def routing_patch_run(run: PatchRun, patcher: SuffixPatcher, grids: Sequence[Grid], rules: dict[str, object],
                      budget: float, tapped, strict: bool = True) -> PatchResult:
    """RAP on one patched run (the module docstring); ``budget``: forward-equivalents for the whole call;
    ``tapped``: the run's own forward under :func:`primary_rules`, whose gradients it reads when needed."""
    cells = {g.name: cells_of(run, g) for g in grids}
    cost = {g.name: [patcher.cost([c]) / run.ledger.unit for c in cells[g.name]] for g in grids}
    state = _State(run, patcher, grids)
    if run.ledger.total + sum(sum(c) for c in cost.values()) <= budget:
        state.patch_exactly([c for g in grids for c in cells[g.name]])
        return state.result({g.name: "rap: exact" for g in grids})
    method, linear = _estimate(state, cells, rules, tapped, strict)
    left = budget - run.ledger.total
    whole = []
    for g in grids:  # the all-position head grids first: no flag predicts their errors well
        if g.row_axis is None and sum(cost[g.name]) <= left:
            whole += cells[g.name]
            left -= sum(cost[g.name])
    state.patch_exactly(whole)
    state.patch_exactly(_by_priority(state, cells, cost, linear, left))
    for g in grids:
        done = sum(bool(state.exact[g.name][(c.layer,) + c.index]) for c in cells[g.name])
        if done == len(cells[g.name]):
            method[g.name] = "rap: exact"
        elif done:
            method[g.name] += f", {done} of {len(cells[g.name])} changed cells exact"
    return state.result(method)


class _State:
    """RAP's grids as they fill: values, which cells are exact, flags, routing changes."""

    def __init__(self, run: PatchRun, patcher: SuffixPatcher, grids: Sequence[Grid]):
        self.run, self.patcher, self.grids = run, patcher, grids
        self.exact = {g.name: ~run.changes(g)[0] for g in grids}  # an unchanged cell is exactly 0 by every method
        self.values = {g.name: torch.zeros(run.changes(g)[0].shape, dtype=torch.float64) for g in grids}
        self.flags: dict[str, dict[str, torch.Tensor]] = {}
        self.tv: dict[str, torch.Tensor] = {}

    def patch_exactly(self, chosen: Sequence[Cell]) -> None:
        """Exact values for ``chosen`` (one batch per first row, across grids)."""
        for cell, value in zip(chosen, self.patcher.effects(chosen)):
            at = (cell.layer,) + cell.index
            self.values[cell.grid.name][at] = value
            self.exact[cell.grid.name][at] = True

    def result(self, method: dict[str, str]) -> PatchResult:
        return PatchResult(self.values, method, self.exact, self.flags, self.run.ledger.fe(),
                           tl_forwards(self.run, self.grids), self.tv)


def _estimate(state: _State, cells: dict[str, list[Cell]], rules: dict[str, object], tapped,
              strict: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The estimate stage: one backward per rule set (the main one from the run's own forward), the
    single-row grids row-exact, the others one-backward. Returns the method per grid and the one-backward
    estimates."""
    run = state.run
    model, adapter = run.model, run.adapter
    n_layers = adapter.arch.n_layers
    method, linear = {}, {}
    primary = primary_rules(state.grids, rules).name
    for label, members in _by_rules(state.grids, rules).items():
        if label == primary:
            activations, grads = run.activations, tapped.gradients()
        else:  # a second rule set (query/key grids under RAP's CP-LRP): its own forward and backward
            rule_set = resolve_patch_rules(rules[members[0].name])
            names = [g.hook_name(l) for g in members for l in range(n_layers)]
            names += [routing_names(adapter, l)["z"] for l in range(n_layers)]
            activations, grads = gradients(model, adapter, run.tokens, run.metric, names, rule_set, strict)
            run.ledger.add_fe(f"forward + backward ({label})", 3.0)
        row_grids = [g for g in members if g.row_axis is not None and g.kind in ("pos", "pos_head")]
        rows = RowEstimate(run, state.patcher, {n: grads[n] for n in grads if n.endswith("hook_z")}) if row_grids else None
        estimates = rows.estimate({g.name: cells[g.name] for g in row_grids}) if rows and rows.available else {}
        for g in members:
            linear[g.name] = linear_grid(g, n_layers, run.source, activations, grads).double().cpu()
            if g.name in estimates:
                est = estimates[g.name]
                state.values[g.name] = est["estimate"]
                state.flags[g.name] = _flags(est, linear[g.name], run.changes(g)[0])
                state.tv[g.name] = est["routing_tv"]
                method[g.name] = f"rap: row-exact + {label}"
            else:
                state.values[g.name] = linear[g.name].clone()
                unavailable = g in row_grids and not estimates
                method[g.name] = f"rap: {label}" + (" (row-exact unavailable: the cached attention is not "
                                                    "softmax(q·k · scale))" if unavailable else "")
    return method, linear


def _by_priority(state: _State, cells: dict[str, list[Cell]], cost: dict[str, list[float]],
                 linear: dict[str, torch.Tensor], left: float) -> list[Cell]:
    """Cells to patch exactly with ``left`` forward-equivalents: each grid's not-yet-exact cells by
    ``|estimate| + |estimate − one-backward estimate|``, round-robin over the grids, each taken if it fits."""
    queues = {}
    for g in state.grids:
        est, lin = state.values[g.name], linear[g.name]
        todo = [(c, k) for c, k in zip(cells[g.name], cost[g.name]) if not state.exact[g.name][(c.layer,) + c.index]]
        score = [float(est[(c.layer,) + c.index].abs() + (est[(c.layer,) + c.index] - lin[(c.layer,) + c.index]).abs())
                 for c, _ in todo]
        queues[g.name] = deque(item for _, item in sorted(zip(score, todo), key=lambda pair: -pair[0]))
    chosen: list[Cell] = []
    while any(queues.values()):
        for queue in queues.values():
            while queue:
                cell, k = queue.popleft()
                if k <= left:
                    chosen.append(cell)
                    left -= k
                    break
    return chosen


def _by_rules(grids: Sequence[Grid], rules: dict[str, object]) -> dict[str, list[Grid]]:
    groups: dict[str, list[Grid]] = {}
    for g in grids:
        groups.setdefault(resolve_patch_rules(rules[g.name]).name, []).append(g)
    return groups
