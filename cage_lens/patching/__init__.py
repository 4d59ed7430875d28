"""Relevance patching: TransformerLens' activation-patching grids, computed or estimated at a fraction
of the cost of one forward per cell (docs/patching.md).

Named and shaped like ``transformer_lens.patching``: swap ``patching.get_act_patch_resid_pre`` for
``cage_lens.patching.relevance_patch_resid_pre`` (same arguments, same grid shape and axis order). Each
cell is the *change* the patch makes, ``metric(patched) − metric(corrupted)``: subtract the unpatched
metric from TL's grid to compare numbers. Noising is the same call with the roles swapped, as with TL.

How a grid is computed (``method=``, docs/patching.md#methods): ``"rap"`` (the default) — routing-aware
patching: exact suffix patching while a budget allows, else one backward plus row-exact estimates
(the patched row's trajectory exact, every later row's attention re-softmaxed) and exact patching of
the cells that matter most, with flags on unreliable cells; ``"exact"`` — TL's numbers from suffix runs;
``"one_backward"`` — ``(a_clean − a_corrupted) · ∂metric/∂a`` from one forward and one backward under
``rules`` (relevance patching with ``"cplrp"``, ``"relp"``, ``"attnlrp"``; attribution patching with
``"gxi"``), also what ``rules=`` alone selects; ``"atp_star"`` — the AtP* baseline.
``relevance_patch`` returns a :class:`PatchResult` carrying the method per grid, the exact cells, the
flags and the cost in forward-equivalents.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float

from cage_lens.core.adapter import adapt
from cage_lens.patching.agreement import (
    DIRECTIONS, SPEARMAN_FLOOR, Agreement, activation_patch, agreement, pearson, spearman,
)
from cage_lens.patching.grids import BLOCK_GRIDS, GRIDS, HEAD_PARTS, Grid
from cage_lens.patching.patch import METHODS, default_method, relevance_patch
from cage_lens.patching.result import FLAG_NAMES, PatchResult
from cage_lens.patching.rules import RULE_VARIANTS, PatchRules, resolve_patch_rules
from cage_lens.patching.runs import check_same_length

__all__ = [
    "GRIDS", "Grid", "PatchRules", "RULE_VARIANTS", "relevance_patch", "resolve_patch_rules",
    "PatchResult", "FLAG_NAMES", "METHODS", "default_method",
    "relevance_patch_resid_pre", "relevance_patch_resid_mid", "relevance_patch_attn_out", "relevance_patch_mlp_out",
    "relevance_patch_attn_head_out_all_pos", "relevance_patch_attn_head_q_all_pos",
    "relevance_patch_attn_head_k_all_pos", "relevance_patch_attn_head_v_all_pos",
    "relevance_patch_attn_head_pattern_all_pos", "relevance_patch_attn_head_out_by_pos",
    "relevance_patch_attn_head_q_by_pos", "relevance_patch_attn_head_k_by_pos",
    "relevance_patch_attn_head_v_by_pos", "relevance_patch_attn_head_pattern_by_pos",
    "relevance_patch_attn_head_pattern_dest_src_pos", "relevance_patch_block_every",
    "relevance_patch_attn_head_all_pos_every", "relevance_patch_attn_head_by_pos_every",
    "agreement", "Agreement", "activation_patch", "check_same_length", "pearson", "spearman",
    "DIRECTIONS", "SPEARMAN_FLOOR", "BLOCK_GRIDS", "HEAD_PARTS",
]


# ---------------------------------------------------------------------------- one function per TL grid
def _named(grid: str) -> Callable:
    spec = GRIDS[grid]
    shape = " ".join(spec.axes)

    def estimate(model, corrupted_tokens, clean_cache, patching_metric, *, method=None, rules=None, speedup=None,
                 budget=None) -> torch.Tensor:
        return relevance_patch(model, corrupted_tokens, clean_cache, patching_metric, grid, method=method, rules=rules,
                               speedup=speedup, budget=budget)[grid]

    estimate.__name__ = estimate.__qualname__ = f"relevance_patch_{grid}"
    estimate.__doc__ = (
        f"Relevance-patching estimate of ``transformer_lens.patching.{spec.tl_function}``: ``[{shape}]``, each "
        f"cell ≈ metric(patched) − metric(corrupted) for patching ``blocks.{{layer}}.{spec.hook}`` from "
        "``clean_cache`` into the run of ``corrupted_tokens``. Default method: "
        f"{default_method(grid)}; arguments as :func:`relevance_patch`, whose result also carries how each "
        "cell was computed and the flags of unreliable cells."
    )
    return estimate


relevance_patch_resid_pre = _named("resid_pre")
relevance_patch_resid_mid = _named("resid_mid")
relevance_patch_attn_out = _named("attn_out")
relevance_patch_mlp_out = _named("mlp_out")
relevance_patch_attn_head_out_all_pos = _named("attn_head_out_all_pos")
relevance_patch_attn_head_q_all_pos = _named("attn_head_q_all_pos")
relevance_patch_attn_head_k_all_pos = _named("attn_head_k_all_pos")
relevance_patch_attn_head_v_all_pos = _named("attn_head_v_all_pos")
relevance_patch_attn_head_pattern_all_pos = _named("attn_head_pattern_all_pos")
relevance_patch_attn_head_out_by_pos = _named("attn_head_out_by_pos")
relevance_patch_attn_head_q_by_pos = _named("attn_head_q_by_pos")
relevance_patch_attn_head_k_by_pos = _named("attn_head_k_by_pos")
relevance_patch_attn_head_v_by_pos = _named("attn_head_v_by_pos")
relevance_patch_attn_head_pattern_by_pos = _named("attn_head_pattern_by_pos")
relevance_patch_attn_head_pattern_dest_src_pos = _named("attn_head_pattern_dest_src_pos")


def _pad_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Zero-pad the last axis to ``n_heads`` (grouped-query k and v grids, as TL's bundles do)."""
    return torch.nn.functional.pad(x, (0, n_heads - x.shape[-1]))


def relevance_patch_block_every(
    model, corrupted_tokens, clean_cache, metric, *, method=None, rules=None, speedup=None, budget=None
) -> Float[torch.Tensor, "patch_type layer pos"]:
    """``[3, layer, pos]``: resid_pre, attn_out, mlp_out (as ``get_act_patch_block_every``)."""
    grids = relevance_patch(model, corrupted_tokens, clean_cache, metric, BLOCK_GRIDS, method=method, rules=rules,
                            speedup=speedup, budget=budget)
    return torch.stack([grids[g] for g in BLOCK_GRIDS])


def relevance_patch_attn_head_all_pos_every(
    model, corrupted_tokens, clean_cache, metric, *, method=None, rules=None, speedup=None, budget=None
) -> Float[torch.Tensor, "patch_type layer head"]:
    """``[5, layer, head]``: out, q, k, v, pattern (as ``get_act_patch_attn_head_all_pos_every``;
    grouped-query k and v zero-padded to ``n_heads``)."""
    names = [f"attn_head_{p}_all_pos" for p in HEAD_PARTS]
    grids = relevance_patch(model, corrupted_tokens, clean_cache, metric, names, method=method, rules=rules,
                            speedup=speedup, budget=budget)
    n_heads = adapt(model).arch.n_heads
    return torch.stack([_pad_heads(grids[n], n_heads) for n in names])


def relevance_patch_attn_head_by_pos_every(
    model, corrupted_tokens, clean_cache, metric, *, method=None, rules=None, speedup=None, budget=None
) -> Float[torch.Tensor, "patch_type layer pos head"]:
    """``[5, layer, pos, head]``: out, q, k, v, pattern (as ``get_act_patch_attn_head_by_pos_every``:
    k and v zero-padded, the pattern grid moved to ``[layer, dest_pos, head]``)."""
    names = [f"attn_head_{p}_by_pos" for p in HEAD_PARTS]
    grids = relevance_patch(model, corrupted_tokens, clean_cache, metric, names, method=method, rules=rules,
                            speedup=speedup, budget=budget)
    n_heads = adapt(model).arch.n_heads
    pattern = grids["attn_head_pattern_by_pos"].transpose(1, 2)
    return torch.stack([_pad_heads(pattern if n == "attn_head_pattern_by_pos" else grids[n], n_heads) for n in names])
