"""Closed-form cross-layer edges from one forward and one backward pass (docs/graphs.md#closed-form).

For one attention sublayer ``out_j = x_j + Σ_h Σ_m P_h[j,m] v_h(m) W_O^h + b_O`` (its contribution
possibly passed through a post-norm), with the norm scales treated as the rule set says and ``g`` the
stored gradients, the edge ``A[j,i] = Σ_k x_i,k ∂⟨out_j, g_j⟩/∂x_i,k`` is

- skip: ``δ_ij ⟨x_j, g_j⟩``
- value path: ``v · Σ_h P_h[j,i] u⁰_h[j,i]`` with ``u_h[j,i] = ⟨v_h(i), ∂target/∂z_h(j)⟩`` and ``u⁰``
  its bias-free part,
- key path: ``k · Σ_h D̃_h[j,i] ⟨q_j, k⁰_i⟩ s``,
- query path (onto the query token only): ``δ_ij q · Σ_h Σ_m D̃_h[j,m] ⟨q⁰_j, k_m⟩ s``,

where ``q, k, v`` are the rule set's gradient factors, ``s`` the score scale, ``D_h[j,i] =
P_h[j,i] (u_h[j,i] − Σ_m P_h[j,m] u_h[j,m])`` the gradient of the (capped) scores and ``D̃ = D · r``
with ``r`` the soft-cap's factor (``post/pre`` under the identity rule, ``1 − tanh²`` under the
gradient rule, 1 without a cap). Causal mask: entries above the diagonal are zero, and under a sliding
window of ``W`` positions those ``W`` or more below it; GQA: query heads
share their key/value head; rotary: q and k are taken after rotation. MLPs and norms are token-local,
so their transitions are diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from jaxtyping import Float, Int

from cage_lens.circuit.levels import Transition
from cage_lens.circuit.state import AttentionState, ForwardState
from cage_lens.core.adapter import visible_keys
from cage_lens.core.precision import UNIT_ROUNDOFF
from cage_lens.core.rulesets import RuleSet
from cage_lens.errors import UnsupportedModelError

__all__ = ["fast_edge_rows", "fast_edge_chunks", "EDGE_BUDGET"]

#: bytes of one row chunk's ``[head, rows, key]`` intermediates
EDGE_BUDGET = 256 * 2**20


def _expand_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[pos, kv_head, d] -> [pos, head, d]: query head h reads kv head h // (n_heads / n_kv_heads)."""
    return t if t.shape[1] == n_heads else t.repeat_interleave(n_heads // t.shape[1], dim=1)


def _row_chunk(n_heads: int, n_pos: int, itemsize: int, budget_bytes: int) -> int:
    return max(1, min(n_pos, budget_bytes // max(1, 6 * n_heads * n_pos * itemsize)))


def fast_edge_rows(state: ForwardState, transition: Transition, rows: Int[torch.Tensor, "row"],
                   budget_bytes: int | None = None) -> Float[torch.Tensor, "row source"]:
    """Rows ``A[j, :]`` of one transition by the closed form (flat node indices)."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    out = None
    for start, block in fast_edge_chunks(state, transition, rows, budget_bytes):
        if out is None:
            out = torch.zeros(len(rows), block.shape[1], dtype=block.dtype)
        out[start:start + len(block)] = block.cpu()
    return out


def fast_edge_chunks(state: ForwardState, transition: Transition, rows: Int[torch.Tensor, "row"],
                     budget_bytes: int | None = None) -> Iterator[tuple[int, Float[torch.Tensor, "chunk source"]]]:
    """``(start, A[rows[start:start + n], :])`` for consecutive chunks of ``rows``, on the model's device: the
    ``[head, chunk, pos]`` intermediates of an attention transition stay within ``budget_bytes``, and
    the caller can prune each chunk before the next is formed (docs/graphs.md#long-prompts). At least one
    chunk is yielded, empty when ``rows`` is. ``budget_bytes`` defaults to :data:`EDGE_BUDGET`."""
    budget_bytes = EDGE_BUDGET if budget_bytes is None else budget_bytes
    rows = torch.as_tensor(rows, dtype=torch.long)
    att = state.layers[transition.layer]
    n_pos = att.x.shape[0]
    kind = transition.kind
    if kind in ("local", "branch_out", "skip", "mlp_skip", "mlp_branch"):
        yield from _diagonal_chunks(_diagonal(state, transition), rows, budget_bytes)
        return
    if kind in ("neuron_in", "neuron_out", "head_out"):
        yield 0, _unit_rows(state, transition, rows)
        return
    if att.problem is not None:
        raise UnsupportedModelError(f"method='fast' cannot compute these edges: {att.problem}; use method='autograd'")
    yield from _attention_chunks(state, att, transition, rows, budget_bytes)


def _diagonal(state: ForwardState, transition: Transition) -> Float[torch.Tensor, "pos"]:
    """The per-token value of a token-local transition (MLP with its norm, residual connection)."""
    att, kind = state.layers[transition.layer], transition.kind
    if kind in ("local", "branch_out"):
        return state.relevance(transition.source.hook)
    if kind == "skip":
        return (att.x * att.g_out).sum(-1)
    if kind == "mlp_skip":
        mid, _ = state.resid[transition.source.hook]
        return (mid * state.resid[transition.target.hook][1]).sum(-1)
    return state.branches[transition.layer].diagonal   # mlp_branch


def _unit_rows(state: ForwardState, transition: Transition, rows: torch.Tensor) -> torch.Tensor:
    att, kind = state.layers[transition.layer], transition.kind
    n_pos = att.x.shape[0]
    if kind == "neuron_in":
        level, incoming = transition.target, state.mlps[transition.layer].incoming.cpu()
        out = torch.zeros(len(rows), n_pos, dtype=att.x.dtype)
        out[torch.arange(len(rows)), level.pos[rows]] = incoming[level.pos[rows], level.unit[rows]]
        return out
    if kind == "neuron_out":
        level = transition.source
        columns = rows[:, None] * (level.size // n_pos) + torch.arange(level.size // n_pos)[None, :]  # [row, k]
        out = torch.zeros(len(rows), level.size, dtype=att.x.dtype)
        out.scatter_(1, columns, level.relevance[columns])
        return out
    out = torch.zeros(len(rows), transition.source.relevance.shape[0], dtype=att.x.dtype)   # head_out
    columns = torch.arange(att.z.shape[1])[None, :] * n_pos + rows[:, None]  # [row, head]
    out.scatter_(1, columns, transition.source.relevance[columns])
    return out


def _diagonal_chunks(values: Float[torch.Tensor, "pos"], rows: torch.Tensor, budget_bytes: int):
    """Token-local transitions: ``A[j, i] = δ_ij values[j]``, a few rows at a time."""
    values = values.cpu()
    step = max(1, budget_bytes // max(1, values.shape[0] * values.element_size()))
    for start in range(0, max(len(rows), 1), step):
        chunk = rows[start:start + step]
        out = torch.zeros(len(chunk), values.shape[0], dtype=values.dtype)
        out[torch.arange(len(chunk)), chunk] = values[chunk]
        yield start, out


@dataclass
class _Parts:
    """One layer's tensors as the closed form reads them (heads expanded, bias-free parts formed once)."""

    v: torch.Tensor
    v0: torch.Tensor
    k: torch.Tensor | None
    k0: torch.Tensor | None
    q0: torch.Tensor | None

    @classmethod
    def of(cls, att: AttentionState) -> "_Parts":
        n_heads = att.z.shape[1]
        v = _expand_kv(att.v, n_heads)
        v0 = v if att.plain else _expand_kv(att.v0, n_heads)
        if att.q is None:
            return cls(v, v0, None, None, None)
        k = _expand_kv(att.k, n_heads)
        return cls(v, v0, k, k if att.plain else _expand_kv(att.k0, n_heads), att.q if att.plain else att.q0)


def _attention_chunks(state: ForwardState, att: AttentionState, transition: Transition, rows: torch.Tensor,
                      budget_bytes: int):
    n_pos = att.x.shape[0]
    kind = transition.kind
    positions, heads = (rows % n_pos, rows // n_pos) if kind == "head_in" else (rows, None)
    step = _row_chunk(att.z.shape[1], n_pos, att.x.element_size(), budget_bytes)
    branch = state.branches[transition.layer].diagonal if kind == "attention" and state.branches else None
    parts = _Parts.of(att)
    last = max(0, len(rows) - step)
    for start in range(0, max(len(rows), 1), step):
        chunk = positions[start:start + step].to(att.x.device)
        if len(chunk) == 0:
            yield start, torch.zeros(0, n_pos, dtype=att.x.dtype, device=att.x.device)
            return
        keys = _key_range(chunk, att.window)
        per_head = _head_terms(att, parts, chunk, state.rules, keys, check=start >= last)   # [head, row, key]
        out = torch.zeros(len(chunk), n_pos, dtype=att.x.dtype, device=att.x.device)
        if heads is not None:
            out[:, keys.start:keys.stop] = per_head[heads[start:start + step], torch.arange(len(chunk))]
        else:
            edges = per_head.sum(0)
            if kind == "attention":
                index, own = torch.arange(len(chunk)), chunk - keys.start
                edges[index, own] += (att.x[chunk] * att.g_out[chunk]).sum(-1)    # skip: δ_ij ⟨x_j, g_j⟩
                if branch is not None:
                    edges[index, own] += branch[chunk]                                # parallel MLP branch
            out[:, keys.start:keys.stop] = edges
        yield start, out


def _softcap_factor(scores: torch.Tensor, cap: float | None, rules: RuleSet) -> torch.Tensor | float:
    """``d capped/d scores`` as the rules see it (see the module docstring)."""
    if cap is None:
        return 1.0
    x = scores / cap
    if rules.softcap == "identity":
        return torch.where(x == 0, torch.ones_like(x), torch.tanh(x) / torch.where(x == 0, torch.ones_like(x), x))
    return 1.0 - torch.tanh(x).pow(2)


def _key_range(rows: torch.Tensor, window: int | None) -> slice:
    """The keys some of ``rows`` attend to: none after the last row (causal), none ``window`` or more
    before the first (a sliding window), so a chunk of late rows under a window of W reads W + chunk keys."""
    first = 0 if window is None else max(0, int(rows.min()) - window + 1)
    return slice(first, int(rows.max()) + 1)


def _head_terms(att: AttentionState, parts: _Parts, rows: torch.Tensor, rules: RuleSet, keys: slice,
                check: bool = True) -> torch.Tensor:
    """Per-head attention edges ``[head, row, key]`` without the residual connection, for the key
    positions ``keys`` (:func:`_key_range`: the others are zero). ``check`` recomputes the rows' head
    outputs from the pattern (:func:`_check_pattern`)."""
    v, v0 = parts.v[keys], parts.v0[keys]
    g_z = att.g_z[rows]                                                      # [row, head, d]
    visible = visible_keys(rows, keys.stop, att.window, first=keys.start)    # [row, key]
    if att.q is not None:
        q, k = att.q[rows], parts.k[keys]
        raw = torch.einsum("rhd,phd->hrp", q, k) * att.scale                 # q·k·scale
        if att.plain:   # no bias parts, ρ = 1: ⟨q_j, k⁰_i⟩ = ⟨q⁰_j, k_i⟩ = q·k
            key_term = query_term = lambda: raw  # noqa: E731
        else:
            key_term = lambda: torch.einsum("rhd,phd->hrp", q, parts.k0[keys]) * att.scale  # noqa: E731
            query_term = lambda: torch.einsum("rhd,phd->hrp", parts.q0[rows], k) * att.scale  # noqa: E731
    else:  # bias-free q, k: ⟨q_j, k⁰_i⟩ = s_ji ρ_i and ⟨q⁰_j, k_i⟩ = s_ji ρ_j
        raw = att.scores[:, rows, keys]
        key_term = lambda: raw * att.rho[None, None, keys]  # noqa: E731
        query_term = lambda: raw * att.rho[rows][None, :, None]  # noqa: E731
    if att.pattern is not None:
        pattern = att.pattern[:, rows, keys]
    else:
        scores = raw if att.softcap is None else att.softcap * torch.tanh(raw / att.softcap)
        pattern = scores.masked_fill(~visible, float("-inf")).softmax(-1)    # [head, row, key]
    if att.window is not None:   # keys outside the window have P = 0 and D = 0; their scores may be −inf
        raw = raw.masked_fill(~visible, 0.0)
    if check:
        _check_pattern(pattern, v, att.z[rows])
    u = torch.einsum("phd,rhd->hrp", v, g_z)                                 # ⟨v_h(i) W_O, g_j⟩
    u0 = u if v0 is v else torch.einsum("phd,rhd->hrp", v0, g_z)
    edges = rules.v * pattern * u0
    if rules.q or rules.k:
        score_grad = pattern * (u - (pattern * u).sum(-1, keepdim=True))     # D_h[j, i]
        score_grad = score_grad * _softcap_factor(raw, att.softcap, rules)
        if rules.k:
            edges = edges + rules.k * score_grad * key_term()
        if rules.q:
            query_path = (score_grad * query_term()).sum(-1)                 # [head, row]
            edges[:, torch.arange(len(rows)), rows - keys.start] += rules.q * query_path
    return edges


def _check_pattern(pattern: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> None:
    """The recomputed attention must reproduce the model's own head outputs ``z``; otherwise the
    model computes attention in a way the closed form does not know (a position bias it was not told of,
    a mask other than the causal one and the model's sliding window, …). The tolerance is the dtype's rounding: float64 models may run their softmax in
    float32 inside (HF eager attention), and a 16-bit ``z`` summed in another order differs from the
    recomputation by up to an ulp of its largest entry (measured 0.0017–0.0051 of it in bfloat16), so two
    ulps (four unit roundoffs) are allowed there; a position bias or a mask moves outputs by far more."""
    recomputed = torch.einsum("hrp,phd->rhd", pattern, v)
    tol = 1e-5 if z.dtype == torch.float64 else max(1e-3, 4 * UNIT_ROUNDOFF[z.dtype])
    err = float((recomputed - z).abs().max()) / max(float(z.abs().max()), 1e-30)
    if not err <= tol:
        raise UnsupportedModelError(
            f"method='fast' cannot reproduce this model's attention (relative error {err:.2g}; a position bias "
            "or an attention mask the closed form does not know); use method='autograd'"
        )
