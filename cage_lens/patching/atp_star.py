"""AtP* (Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
components") on TransformerLens' grids: a baseline beside routing-aware patching (docs/patching.md#atp).

AtP* is attribution patching (plain gradient, ``rules="gxi"``) with two additions:

- **QK fix.** The linear term of a patch that changes attention queries and keys is replaced by the
  exact change of the attention pattern, evaluated against the pattern's gradient. TransformerLens'
  residual grids have no queries or keys of their own, so here a cell's change is followed along the
  skip path: a position cell's ``δ`` reaches row ``p``'s input of every later block (resid_pre: from its
  own block on), a head's ``Δz_h W_O`` reaches every row from its first changed one. At each such
  block the new query and key of those rows are computed through the model itself (one masked row
  per probe, :meth:`SuffixPatcher.rows`), the affected rows re-softmaxed exactly, and
  ``AtP*(c) = AtP(c) − Σ ⟨Δq, ∂m/∂q⟩ − Σ ⟨Δk, ∂m/∂k⟩ + Σ ⟨P' − P, ∂m/∂P⟩``.
- **GradDrop.** The estimate recomputed ``L`` times, each with the gradient through one layer's
  attention and MLP outputs set to zero; a cell whose estimate moves by more than itself when one
  layer is dropped rests on cancelling paths (flag ``graddrop``).

Grids other than resid_pre, attn_out, mlp_out and attn_head_out_all_pos get AtP alone (the result says so).
"""

from __future__ import annotations

from typing import Sequence

import torch

from cage_lens.core.hooks import PointHook
from cage_lens.patching.estimate import linear_grid
from cage_lens.patching.exact import Cell, SuffixPatcher, cells_of
from cage_lens.patching.grids import GRIDS, Grid
from cage_lens.patching.result import PatchResult
from cage_lens.patching.routing import LayerAttention, RowEstimate, routing_names, tl_forwards
from cage_lens.patching.runs import PatchRun

__all__ = ["QK_FIX_GRIDS", "atp_star_inputs", "atp_star_taps", "GradDrop", "atp_star_run"]

#: grids whose cells get the QK fix (the others: AtP alone)
QK_FIX_GRIDS = ("resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos")


def atp_star_inputs(adapter) -> list[str]:
    """The hook points the QK fix's probes read from the patched run, whichever grids were asked: each
    block's input (a probe is that row plus the cell's change) and its queries and keys."""
    resid = GRIDS["resid_pre"]
    return [n for l in range(adapter.arch.n_layers) for n in (resid.hook_name(l), adapter.layer(l).q, adapter.layer(l).k)]


def atp_star_taps(adapter, grids: Sequence[Grid]) -> list[str]:
    """The hook points whose plain gradients AtP* reads: the grids' own, and each layer's q, k and pattern."""
    names = [g.hook_name(l) for g in grids for l in range(adapter.arch.n_layers)]
    for l in range(adapter.arch.n_layers):
        site = adapter.layer(l)
        names += [site.q, site.k, adapter.attn_hook(l, "hook_pattern")]
    return list(dict.fromkeys(names))


class _Gate(torch.autograd.Function):
    """Identity forward; backward passes the gradient unless ``state["drop"]`` names this layer."""

    @staticmethod
    def forward(ctx, x, layer, state):
        ctx.layer, ctx.state = layer, state
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (torch.zeros_like(grad) if ctx.state["drop"] == ctx.layer else grad), None, None


class GradDrop:
    """Hooks that gate the gradient through each layer's attention and MLP outputs (``drop`` selects the
    layer whose gradient is set to zero; None passes everything)."""

    def __init__(self, adapter):
        self.state = {"drop": None}
        self.adapter = adapter

    def hooks(self) -> list[PointHook]:
        def gate(layer):
            def hook(tensor, hook):
                return _Gate.apply(tensor, layer, self.state)
            return hook
        out = []
        for l in range(self.adapter.arch.n_layers):
            site = self.adapter.layer(l)
            out += [PointHook(site.attn_out, gate(l))] + ([PointHook(site.mlp_out, gate(l))] if site.mlp_out else [])
        return out


def _probes(run: PatchRun, grid: Grid, cells: Sequence[Cell]) -> list[tuple[int, Cell]]:
    """``(cell index, probe)`` pairs: each block input row a cell's change reaches along the skip path,
    as a resid_pre cell whose value is the patched run's input plus that change."""
    adapter, n_layers = run.adapter, run.adapter.arch.n_layers
    resid = GRIDS["resid_pre"]
    out = []
    for i, cell in enumerate(cells):
        name = grid.hook_name(cell.layer)
        if grid.kind == "pos":
            delta = run.source_of(name)[:, cell.first] - run.activations[name][:, cell.first]  # [B, d]
            rows = {cell.first: delta}
            first_layer = cell.layer if grid.name == "resid_pre" else cell.layer + 1
        else:  # a head's output: Δz_h W_O^h at every row from its first changed one
            head = cell.index[0]
            dz = (run.source_of(name) - run.activations[name])[:, :, head]  # [B, T, d_head]
            w_o = run.model.blocks[cell.layer].attn.W_O[head].to(dz)
            rows = {r: dz[:, r] @ w_o for r in range(cell.first, run.length)}
            first_layer = cell.layer + 1
        for layer in range(first_layer, n_layers):
            base = run.activations[resid.hook_name(layer)]
            for row, change in rows.items():
                value = (base[:, row] + change)[:, None]
                out.append((i, Cell(resid, layer, (row,), row, value)))
    return out


def _qk_terms(run: PatchRun, atts: list[LayerAttention], grads: dict, probes: list[tuple[int, Cell]],
              captured: dict, n_cells: int, heads: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell: the linear q/k term AtP spends on the probed rows, and the exact pattern change there."""
    adapter, n_heads = run.adapter, run.adapter.arch.n_heads
    linear = torch.zeros(n_cells, dtype=torch.float64)
    exact = torch.zeros(n_cells, dtype=torch.float64)
    layers = torch.tensor([p.layer for _, p in probes])
    for layer, att in enumerate(atts):
        picked = (layers == layer).nonzero().flatten()
        if not len(picked):
            continue
        site, names = adapter.layer(layer), routing_names(adapter, layer)
        at = lambda name: captured[name][picked].double()
        q_pre, k_pre, q_rot, k_rot = at(site.q), at(site.k), at(names["q"]), at(names["k"])  # [N, B, H(kv), dh]
        rows = torch.tensor([probes[j][1].first for j in picked.tolist()], device=att.pattern.device)
        owner = torch.tensor([probes[j][0] for j in picked.tolist()])  # indexes the CPU accumulators
        acts = run.activations
        dq = q_pre - acts[site.q].double()[:, rows].transpose(0, 1)
        dk = k_pre - acts[site.k].double()[:, rows].transpose(0, 1)
        lin = (dq * grads[site.q].double()[:, rows].transpose(0, 1)).sum(dim=(1, 2, 3)) \
            + (dk * grads[site.k].double()[:, rows].transpose(0, 1)).sum(dim=(1, 2, 3))
        linear.index_add_(0, owner, lin.cpu())
        G = grads[adapter.attn_hook(layer, "hook_pattern")].double()  # [B, H, T, T]
        k_rot = k_rot.repeat_interleave(n_heads // k_rot.shape[-2], dim=-2) if k_rot.shape[-2] != n_heads else k_rot
        if heads:
            exact.index_add_(0, *_head_change(att, G, owner, rows, q_rot, k_rot))
        else:
            exact.index_add_(0, owner, _row_change(att, G, rows, q_rot, k_rot).cpu())
    return linear, exact


def _row_change(att: LayerAttention, G: torch.Tensor, rows: torch.Tensor, q_new: torch.Tensor,
                k_new: torch.Tensor) -> torch.Tensor:
    """Σ ⟨P' − P, G⟩ when row ``p``'s query and key change (one probe per row): row ``p`` re-softmaxed with
    both over the keys it sees, every later row that sees key ``p`` with its score there (the closed form
    of :class:`RowEstimate`)."""
    own_scores = torch.einsum("nbhe,bjhe->nbhj", q_new, att.k) * att.scale  # [N, B, H, T]
    n = torch.arange(len(rows), device=rows.device)
    own_scores[n, :, :, rows] = (q_new * k_new).sum(-1) * att.scale
    own_scores = own_scores.masked_fill(~att.visible[rows][:, None, None, :], float("-inf"))
    old_own = att.pattern[:, :, rows].permute(2, 0, 1, 3)
    g_own = G[:, :, rows].permute(2, 0, 1, 3)
    own = ((own_scores.softmax(-1) - old_own) * g_own).sum(dim=(1, 2, 3))
    total = (att.pattern * G).sum(-1)
    lse_rest, mean_rest = RowEstimate._without_column(att, G, total, rows)
    s_new = torch.einsum("bihe,nbhe->nbhi", att.q, k_new) * att.scale
    lse_new = torch.logaddexp(lse_rest, s_new)
    live = att.later_readers(rows)[:, None, None, :]
    zero = att.pattern.new_zeros(())
    p_old = torch.where(live, att.pattern.index_select(-1, rows).permute(3, 0, 1, 2), zero)
    p_new = torch.where(live, (s_new - lse_new).exp(), zero)
    g_col = G.index_select(-1, rows).permute(3, 0, 1, 2)
    cross = torch.where(live, (p_old - p_new) * mean_rest + (p_new - p_old) * g_col, zero)
    return own + cross.sum(dim=(1, 2, 3))


def _head_change(att: LayerAttention, G: torch.Tensor, owner: torch.Tensor, rows: torch.Tensor,
                 q_new: torch.Tensor, k_new: torch.Tensor):
    """For head cells (every row from the first changed one probed): each cell's rows re-softmaxed with
    all their new queries and keys. Returns ``(cells, Σ ⟨P' − P, G⟩ per cell)`` for ``index_add_``."""
    cells, out = owner.unique(), []
    for c in cells.tolist():
        mine = (owner == c).to(rows.device)
        r = rows[mine]
        q, k = att.q.clone(), att.k.clone()  # [B, T, H, dh]
        q[:, r] = q_new[mine].transpose(0, 1)
        k[:, r] = k_new[mine].transpose(0, 1)
        first = int(r.min())
        scores = torch.einsum("bihe,bjhe->bhij", q[:, first:], k) * att.scale
        new = scores.masked_fill(~att.visible[first:], float("-inf")).softmax(-1)
        out.append(((new - att.pattern[:, :, first:]) * G[:, :, first:]).sum().cpu())
    return cells, torch.stack(out).double() if out else torch.zeros(0, dtype=torch.float64)


def atp_star_run(run: PatchRun, patcher: SuffixPatcher, grids: Sequence[Grid], tapped, graddrop: GradDrop) -> PatchResult:
    """AtP* on one patched run whose forward ran under plain gradients with the taps of
    :func:`atp_star_taps` and the GradDrop gates (``tapped``: :class:`~cage_lens.patching.estimate.TappedRun`)."""
    adapter = run.adapter
    n_layers = adapter.arch.n_layers
    grads = tapped.gradients(retain=True)
    atts = [LayerAttention.of(run, l) for l in range(n_layers)]
    fixable = all(a is not None for a in atts)
    values, method, flags = {}, {}, {}
    captures = []
    for l in range(n_layers):
        site, names = adapter.layer(l), routing_names(adapter, l)
        captures += [site.q, site.k, names["q"], names["k"]]
    captures = list(dict.fromkeys(captures))
    for g in grids:
        values[g.name] = linear_grid(g, n_layers, run.source, run.activations, grads).double().cpu()
        method[g.name] = "atp: gxi (no QK fix for this grid)"
        if g.name not in QK_FIX_GRIDS or not fixable:
            continue
        cells = cells_of(run, g)
        probes = _probes(run, g, cells)
        if probes:
            _, captured = patcher.rows([p for _, p in probes], captures, stage="QK fix probes")
            linear, exact = _qk_terms(run, atts, grads, probes, captured, len(cells), g.kind == "head")
            for i, cell in enumerate(cells):
                values[g.name][(cell.layer,) + cell.index] += float(exact[i] - linear[i])
        method[g.name] = "atp*: gxi + QK fix"
    spread = _graddrop_spread(run, grids, tapped, graddrop, values)
    exact = {}
    for g in grids:
        changed = run.changes(g)[0]
        scale = float(values[g.name].abs().max())
        flags[g.name] = {"graddrop": (spread[g.name] > values[g.name].abs()) & (spread[g.name] > 0.1 * scale) & changed}
        exact[g.name] = ~changed
    return PatchResult(values, method, exact, flags, run.ledger.fe(), tl_forwards(run, grids))


def _graddrop_spread(run: PatchRun, grids: Sequence[Grid], tapped, graddrop: GradDrop, values: dict) -> dict:
    """Per cell: the largest move of its AtP estimate when one downstream layer's gradient is dropped."""
    n_layers = run.adapter.arch.n_layers
    spread = {g.name: torch.zeros_like(values[g.name]) for g in grids}
    base = {g.name: values[g.name] for g in grids}
    for drop in range(n_layers):
        graddrop.state["drop"] = drop
        try:
            dropped = tapped.gradients(retain=drop < n_layers - 1, stage="GradDrop backwards")
        finally:
            graddrop.state["drop"] = None
        for g in grids:
            estimate = linear_grid(g, n_layers, run.source, run.activations, dropped).double().cpu()
            layer = torch.arange(n_layers).view(-1, *([1] * (estimate.ndim - 1)))
            upstream = layer <= drop if g.name == "resid_pre" else layer < drop  # the dropped layer is downstream
            moved = torch.where(upstream, (estimate - base[g.name]).abs(), torch.zeros(()))
            spread[g.name] = torch.maximum(spread[g.name], moved)
    return spread
