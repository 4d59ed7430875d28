"""Reference cross-layer edges by batch-packed multi-target backpropagation (docs/graphs.md#reference).

The prompt is replicated B times; replica b re-roots the source state as a leaf and its objective is
``⟨h_t(j_b), g_t(j_b)⟩`` (``g`` the stored gradient under the rules), so one backward call yields B
rows of ``A``. Slow, but independent of the closed form's algebra: the tests hold the two equal.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

from cage_lens.circuit.levels import Level, Transition
from cage_lens.circuit.state import ForwardState, StopForward, stop_after
from cage_lens.core import engine
from cage_lens.core.adapter import ModelAdapter
from cage_lens.core.hooks import PointHook, installed, session
from cage_lens.errors import InputError

__all__ = ["autograd_edge_rows"]

_RESIDUAL_SOURCES = ("embeddings", "resid_post")


def _reroot(name: str, leaves: list) -> PointHook:
    def hook(tensor, hook):
        leaf = tensor.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf
    return PointHook(name, hook)


def _reroot_hooks(adapter: ModelAdapter, source: Level, layer: int, leaves: list) -> list:
    """Hooks that make ``h_s`` a fresh leaf. resid_mid is re-rooted through the attention's
    contribution (``resid_mid = resid_pre + (leaf − resid_pre)``) because on a bridge
    ``hook_resid_mid`` may feed only the MLP branch."""
    if source.kind in _RESIDUAL_SOURCES:
        return [_reroot(adapter.block(layer, "hook_resid_pre"), leaves)]
    if source.kind in ("heads", "neurons", "attn_out", "mlp_out"):
        return [_reroot(source.hook, leaves)]
    if source.kind != "resid_mid":
        raise InputError(f"no transition starts at {source.name}")
    site = adapter.layer(source.layer)
    stash: dict = {}

    def keep_pre(tensor, hook):
        stash["pre"] = tensor.detach()

    def reroot_mid(tensor, hook):
        leaf = (stash["pre"] + tensor.detach()).requires_grad_(True)
        leaves.append(leaf)
        return leaf - stash["pre"]
    return [PointHook(site.resid_pre, keep_pre), PointHook(site.attn_out, reroot_mid)]


def _target_of(adapter: ModelAdapter, state: ForwardState, transition: Transition, rows: torch.Tensor, leaves: list):
    """(hook to stop at, function: captured activation [B, ...] → Σ_b objective_b) for the target level."""
    n_pos = state.tokens.shape[0]
    target = transition.target
    replica = torch.arange(len(rows))
    if target.kind == "neurons":
        g_post = state.mlps[transition.layer].g_post
        positions, units = target.pos[rows], target.unit[rows]
        return target.hook, lambda post: (post[replica, positions, units] * g_post[positions, units]).sum()
    if target.kind == "heads":
        g_z = state.layers[transition.layer].g_z
        heads, positions = rows // n_pos, rows % n_pos
        return target.hook, lambda z: (z[replica, positions, heads] * g_z[positions, heads]).sum()
    _, g = state.resid[target.hook]
    if target.kind == "resid_mid":
        # resid_mid = resid_pre + attn_out: stop at attn_out and add the re-rooted resid_pre (when the
        # source is that residual state; otherwise resid_pre is a constant here)
        site = adapter.layer(target.layer)
        with_source = transition.source.kind in _RESIDUAL_SOURCES
        return site.attn_out, lambda h: ((h[replica, rows] + (leaves[0][replica, rows] if with_source else 0)) * g[rows]).sum()
    return target.hook, lambda h: (h[replica, rows] * g[rows]).sum()


def autograd_edge_rows(adapter: ModelAdapter, state: ForwardState, transition: Transition,
                       rows: Int[torch.Tensor, "row"], batch_size: int = 16) -> Float[torch.Tensor, "row source"]:
    """Reference rows ``A[j, :]``: ``batch_size`` replicas of the prompt per backward call. Head
    outputs are re-rooted at ``hook_z``; the residual-connection edges (``"skip"``, ``"mlp_skip"``)
    are those with every head output (and a parallel block's MLP output) detached."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    n_pos = state.tokens.shape[0]
    source, layer = transition.source, transition.layer
    site = adapter.layer(layer)
    n_source = source.relevance.shape[0] if source.relevance is not None else n_pos
    out = torch.zeros(len(rows), n_source, dtype=state.layers[0].x.dtype)
    with session(adapter):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            leaves: list = []
            captured: dict = {}
            extra = _reroot_hooks(adapter, source, layer, leaves)
            if transition.kind == "skip":
                extra.append(PointHook(site.z, lambda t, hook: t.detach()))
                if adapter.arch.parallel:
                    extra.append(PointHook(site.mlp_out, lambda t, hook: t.detach()))
            if transition.kind == "mlp_skip":
                extra.append(PointHook(site.mlp.post, lambda t, hook: t.detach()))
            target_hook, objective = _target_of(adapter, state, transition, chunk, leaves)
            tokens = state.tokens[None].expand(len(chunk), n_pos).to(adapter.device).clone()
            with engine.rules_active(adapter, state.rules):
                try:
                    with installed(adapter, extra + [stop_after(target_hook, captured)]):
                        adapter.model(tokens)
                except StopForward:
                    pass
                (grad,) = torch.autograd.grad(objective(captured["h"]), leaves[0])
            leaf = leaves[0].detach()
            if source.kind == "neurons":
                contribution = (leaf * grad).cpu()[:, source.pos, source.unit]
            else:
                contribution = (leaf * grad).sum(-1).cpu()                   # [B, pos] or [B, pos, head]
                if source.kind == "heads":
                    contribution = contribution.transpose(1, 2).reshape(len(chunk), -1)  # flat head·pos + pos
            out[start:start + len(chunk)] = contribution
    return out
