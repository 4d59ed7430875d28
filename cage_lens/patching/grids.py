"""The patching grids of TransformerLens (``get_act_patch_<name>``): which hook each patches and how
a cell sums the activation (docs/patching.md#grids-and-axis-orders)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float

from cage_lens.core.adapter import ModelAdapter
from cage_lens.errors import InputError

__all__ = ["Metric", "Grid", "GRIDS", "BLOCK_GRIDS", "HEAD_PARTS", "check_grids"]

Metric = Callable[[Float[torch.Tensor, "batch pos vocab"]], torch.Tensor]


@dataclass(frozen=True)
class Grid:
    """One TransformerLens patching grid: the hook it patches and how a cell sums the activation.

    ``reduce`` maps ``Δa ⊙ g`` of one layer (the activation's own layout, batch first) to that layer's
    slice of the grid; ``axes`` names the grid's axes, layer first, in TransformerLens' order."""

    name: str
    hook: str  # hook name after ``blocks.{layer}.``
    axes: tuple[str, ...]
    reduce: Callable[[torch.Tensor], torch.Tensor]

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook}"

    @property
    def tl_function(self) -> str:
        return f"get_act_patch_{self.name}"


def _per_pos(x):  # [batch, pos, d_model] -> [pos]
    return x.sum(dim=(0, 2))


def _per_head(x):  # [batch, pos, head, d_head] -> [head]
    return x.sum(dim=(0, 1, 3))


def _per_pos_head(x):  # [batch, pos, head, d_head] -> [pos, head]
    return x.sum(dim=(0, 3))


def _pattern_per_head(x):  # [batch, head, dest_pos, src_pos] -> [head]
    return x.sum(dim=(0, 2, 3))


def _pattern_per_head_dest(x):  # [batch, head, dest_pos, src_pos] -> [head, dest_pos]
    return x.sum(dim=(0, 3))


def _pattern_per_cell(x):  # [batch, head, dest_pos, src_pos] -> [head, dest_pos, src_pos]
    return x.sum(dim=0)


def _grids() -> dict[str, Grid]:
    grids = [
        Grid("resid_pre", "hook_resid_pre", ("layer", "pos"), _per_pos),
        Grid("resid_mid", "hook_resid_mid", ("layer", "pos"), _per_pos),
        Grid("attn_out", "hook_attn_out", ("layer", "pos"), _per_pos),
        Grid("mlp_out", "hook_mlp_out", ("layer", "pos"), _per_pos),
    ]
    for part, hook in (("out", "z"), ("q", "q"), ("k", "k"), ("v", "v")):
        grids.append(Grid(f"attn_head_{part}_all_pos", f"attn.hook_{hook}", ("layer", "head"), _per_head))
        grids.append(Grid(f"attn_head_{part}_by_pos", f"attn.hook_{hook}", ("layer", "pos", "head"), _per_pos_head))
    grids += [
        Grid("attn_head_pattern_all_pos", "attn.hook_pattern", ("layer", "head"), _pattern_per_head),
        Grid("attn_head_pattern_by_pos", "attn.hook_pattern", ("layer", "head", "dest_pos"), _pattern_per_head_dest),
        Grid("attn_head_pattern_dest_src_pos", "attn.hook_pattern", ("layer", "head", "dest_pos", "src_pos"),
             _pattern_per_cell),
    ]
    return {g.name: g for g in grids}


#: every grid by name; ``relevance_patch_<name>`` estimates ``transformer_lens.patching.get_act_patch_<name>``
GRIDS: dict[str, Grid] = _grids()

BLOCK_GRIDS = ("resid_pre", "attn_out", "mlp_out")
HEAD_PARTS = ("out", "q", "k", "v", "pattern")


def check_grids(grids: str | Sequence[str], adapter: ModelAdapter) -> list[Grid]:
    names = [grids] if isinstance(grids, str) else list(grids)
    if not names:
        raise InputError("no grids requested; name at least one of: " + ", ".join(GRIDS))
    unknown = [n for n in names if n not in GRIDS]
    if unknown:
        raise InputError(f"unknown patching grid {unknown[0]!r}; choose from: {', '.join(GRIDS)}")
    out = [GRIDS[n] for n in dict.fromkeys(names)]
    if adapter.arch.attn_only:
        bad = [g.name for g in out if g.name in ("resid_mid", "mlp_out")]
        if bad:
            raise InputError(f"grid {bad[0]!r} needs an MLP, but the model is attention-only")
    return out


