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
gradient rule, 1 without a cap). Causal mask: entries above the diagonal are zero; GQA: query heads
share their key/value head; rotary: q and k are taken after rotation. MLPs and norms are token-local,
so their transitions are diagonal.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

from cage_lens.circuit.levels import Transition
from cage_lens.circuit.state import AttentionState, ForwardState
from cage_lens.core.rulesets import RuleSet
from cage_lens.errors import UnsupportedModelError

__all__ = ["fast_edge_rows"]


def _expand_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[pos, kv_head, d] -> [pos, head, d]: query head h reads kv head h // (n_heads / n_kv_heads)."""
    return t if t.shape[1] == n_heads else t.repeat_interleave(n_heads // t.shape[1], dim=1)


def _row_chunk(n_heads: int, n_pos: int, itemsize: int, budget_bytes: int) -> int:
    return max(1, min(n_pos, budget_bytes // max(1, 6 * n_heads * n_pos * itemsize)))


def fast_edge_rows(state: ForwardState, transition: Transition, rows: Int[torch.Tensor, "row"],
                   budget_bytes: int = 256 * 2**20) -> Float[torch.Tensor, "row source"]:
    """Rows ``A[j, :]`` of one transition by the closed form (flat node indices), processed in chunks
    of rows so the ``[head, chunk, pos]`` intermediates stay within ``budget_bytes``."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    att = state.layers[transition.layer]
    n_pos = att.x.shape[0]
    kind = transition.kind
    if kind in ("local", "branch_out"):
        return _diagonal_rows(state.relevance(transition.source.hook), rows)
    if kind == "skip":
        return _diagonal_rows((att.x * att.g_out).sum(-1), rows)
    if kind == "mlp_skip":
        mid, _ = state.resid[transition.source.hook]
        return _diagonal_rows((mid * state.resid[transition.target.hook][1]).sum(-1), rows)
    if kind == "mlp_branch":
        return _diagonal_rows(state.branches[transition.layer].diagonal, rows)
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
    if kind == "head_out":
        out = torch.zeros(len(rows), transition.source.relevance.shape[0], dtype=att.x.dtype)
        columns = torch.arange(att.z.shape[1])[None, :] * n_pos + rows[:, None]  # [row, head]
        out.scatter_(1, columns, transition.source.relevance[columns])
        return out
    if att.problem is not None:
        raise UnsupportedModelError(f"method='fast' cannot compute these edges: {att.problem}; use method='autograd'")
    return _attention_rows(state, att, transition, rows, budget_bytes)


def _attention_rows(state: ForwardState, att: AttentionState, transition: Transition, rows: torch.Tensor,
                    budget_bytes: int) -> torch.Tensor:
    n_pos = att.x.shape[0]
    kind = transition.kind
    positions, heads = (rows % n_pos, rows // n_pos) if kind == "head_in" else (rows, None)
    out = torch.zeros(len(rows), n_pos, dtype=att.x.dtype, device=att.x.device)
    step = _row_chunk(att.z.shape[1], n_pos, att.x.element_size(), budget_bytes)
    branch = state.branches[transition.layer].diagonal if kind == "attention" and state.branches else None
    for start in range(0, len(rows), step):
        chunk = positions[start:start + step].to(att.x.device)
        per_head = _head_terms(att, chunk, state.rules)   # [head, row, pos]
        if heads is not None:
            out[start:start + step] = per_head[heads[start:start + step], torch.arange(len(chunk))]
            continue
        edges = per_head.sum(0)
        if kind == "attention":
            index = torch.arange(len(chunk))
            edges[index, chunk] += (att.x[chunk] * att.g_out[chunk]).sum(-1)  # skip: δ_ij ⟨x_j, g_j⟩
            if branch is not None:
                edges[index, chunk] += branch[chunk]                              # parallel MLP branch
        out[start:start + step] = edges
    return out


def _diagonal_rows(values: Float[torch.Tensor, "pos"], rows: torch.Tensor) -> torch.Tensor:
    """Token-local transitions (MLP with its norm, residual connection): ``A[j, i] = δ_ij values[j]``."""
    values = values.cpu()
    out = torch.zeros(len(rows), values.shape[0], dtype=values.dtype)
    out[torch.arange(len(rows)), rows] = values[rows]
    return out


def _softcap_factor(scores: torch.Tensor, cap: float | None, rules: RuleSet) -> torch.Tensor | float:
    """``d capped/d scores`` as the rules see it (see the module docstring)."""
    if cap is None:
        return 1.0
    x = scores / cap
    if rules.softcap == "identity":
        return torch.where(x == 0, torch.ones_like(x), torch.tanh(x) / torch.where(x == 0, torch.ones_like(x), x))
    return 1.0 - torch.tanh(x).pow(2)


def _head_terms(att: AttentionState, rows: torch.Tensor, rules: RuleSet) -> torch.Tensor:
    """Per-head attention edges ``[head, row, pos]`` without the residual connection."""
    n_heads, n_pos = att.z.shape[1], att.x.shape[0]
    v, v0 = _expand_kv(att.v, n_heads), _expand_kv(att.v0, n_heads)
    g_z = att.g_z[rows]                                                      # [row, head, d]
    causal = torch.arange(n_pos, device=rows.device)[None, :] <= rows[:, None]  # [row, pos]
    if att.q is not None:
        q, k = att.q[rows], _expand_kv(att.k, n_heads)
        raw = torch.einsum("rhd,phd->hrp", q, k) * att.scale                 # q·k·scale
        key_term = lambda: torch.einsum("rhd,phd->hrp", q, _expand_kv(att.k0, n_heads)) * att.scale  # noqa: E731
        query_term = lambda: torch.einsum("rhd,phd->hrp", att.q0[rows], k) * att.scale  # noqa: E731
    else:  # bias-free q, k: ⟨q_j, k⁰_i⟩ = s_ji ρ_i and ⟨q⁰_j, k_i⟩ = s_ji ρ_j
        raw = att.scores[:, rows]
        key_term = lambda: raw * att.rho[None, None, :]  # noqa: E731
        query_term = lambda: raw * att.rho[rows][None, :, None]  # noqa: E731
    if att.pattern is not None:
        pattern = att.pattern[:, rows]
    else:
        scores = raw if att.softcap is None else att.softcap * torch.tanh(raw / att.softcap)
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)     # [head, row, pos]
    _check_pattern(pattern, v, att.z[rows])
    u = torch.einsum("phd,rhd->hrp", v, g_z)                                 # ⟨v_h(i) W_O, g_j⟩
    u0 = torch.einsum("phd,rhd->hrp", v0, g_z)
    edges = rules.v * pattern * u0
    if rules.q or rules.k:
        score_grad = pattern * (u - (pattern * u).sum(-1, keepdim=True))     # D_h[j, i]
        score_grad = score_grad * _softcap_factor(raw, att.softcap, rules)
        if rules.k:
            edges = edges + rules.k * score_grad * key_term()
        if rules.q:
            query_path = (score_grad * query_term()).sum(-1)                 # [head, row]
            edges[:, torch.arange(len(rows)), rows] += rules.q * query_path
    return edges


def _check_pattern(pattern: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> None:
    """The recomputed attention must reproduce the model's own head outputs ``z``; otherwise the
    model computes attention in a way the closed form does not know (ALiBi, a sliding window shorter
    than the prompt, …)."""
    recomputed = torch.einsum("hrp,phd->rhd", pattern, v)
    tol = 1e-5 if z.dtype == torch.float64 else 1e-3  # HF eager attention runs softmax in float32
    err = float((recomputed - z).abs().max()) / max(float(z.abs().max()), 1e-30)
    if not err <= tol:
        raise UnsupportedModelError(
            f"method='fast' cannot reproduce this model's attention (relative error {err:.2g}; position biases "
            "such as ALiBi or a sliding window shorter than the prompt are not in the closed form); "
            "use method='autograd'"
        )
