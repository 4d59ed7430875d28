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
    kind: str  # which part of the activation one cell patches: a key of CELL_KINDS

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook}"

    @property
    def tl_function(self) -> str:
        return f"get_act_patch_{self.name}"

    @property
    def row_axis(self) -> int | None:
        """Index of the cell axis (after ``layer``) that is a query row, None when a cell spans all rows."""
        for axis in ("pos", "dest_pos"):
            if axis in self.axes:
                return self.axes.index(axis) - 1
        return None

    def changes(self, differs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From ``differs`` (where one layer's activation differs between the two runs, batch first): which
        cells a patch changes, and the first query row each changes (no row before it can move)."""
        return CELL_KINDS[self.kind].changes(differs)

    def patch(self, target: torch.Tensor, rows: slice, source: torch.Tensor, cell: tuple[int, ...]) -> None:
        """Write ``source`` (one run's activation, batch first) into batch rows ``rows`` of ``target``
        where ``cell`` patches it, as TransformerLens' patch setter of this grid does. Query rows are
        counted from the first row both tensors hold."""
        CELL_KINDS[self.kind].patch(target, rows, source, cell)


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


# ---------------------------------------------------------------------------- what one cell patches
@dataclass(frozen=True)
class CellKind:
    """``changes(differs)`` -> (changed, first row) per cell from a layer's ``[batch, ...]`` difference mask;
    ``patch(target, rows, source, cell)`` TransformerLens' patch setter on a cell."""

    changes: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    patch: Callable[[torch.Tensor, slice, torch.Tensor, tuple], None]


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last axis (its length where there is none)."""
    n = mask.shape[-1]
    index = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask, index, torch.full_like(index, n)).amin(-1)


def _rows_are_cells(mask: torch.Tensor, row_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cell per query row: it changes when its row does, and its first row is its own."""
    shape = [1] * mask.ndim
    shape[row_axis] = mask.shape[row_axis]
    rows = torch.arange(mask.shape[row_axis], device=mask.device).view(shape).expand_as(mask)
    return mask, rows


def _pos_changes(d):  # [batch, pos, d] -> cells [pos]
    return _rows_are_cells(d.flatten(2).any(2).any(0), 0)


def _head_changes(d):  # [batch, pos, head, d_head] -> cells [head], every position
    by_row = d.any(0).any(-1)  # [pos, head]
    return by_row.any(0), _first_true(by_row.T)


def _pos_head_changes(d):  # -> cells [pos, head]
    return _rows_are_cells(d.any(0).any(-1), 0)


def _pattern_head_changes(d):  # [batch, head, dest, src] -> cells [head], every query row
    by_row = d.any(0).any(-1)  # [head, dest]
    return by_row.any(1), _first_true(by_row)


def _pattern_dest_changes(d):  # -> cells [head, dest]
    return _rows_are_cells(d.any(0).any(-1), 1)


def _pattern_cell_changes(d):  # -> cells [head, dest, src]
    return _rows_are_cells(d.any(0), 1)


def _set_pos(t, rows, src, cell):  # [batch, pos, ...]
    t[rows, cell[0]] = src[:, cell[0]]


def _set_head(t, rows, src, cell):  # [batch, pos, head, d_head], every position
    t[rows, :, cell[0]] = src[:, :, cell[0]]


def _set_pos_head(t, rows, src, cell):
    t[rows, cell[0], cell[1]] = src[:, cell[0], cell[1]]


def _set_pattern_head(t, rows, src, cell):  # [batch, head, dest_pos, src_pos], every query row
    t[rows, cell[0]] = src[:, cell[0]]


def _set_pattern_dest(t, rows, src, cell):
    t[rows, cell[0], cell[1]] = src[:, cell[0], cell[1]]


def _set_pattern_cell(t, rows, src, cell):
    t[rows, cell[0], cell[1], cell[2]] = src[:, cell[0], cell[1], cell[2]]


CELL_KINDS: dict[str, CellKind] = {
    "pos": CellKind(_pos_changes, _set_pos),
    "head": CellKind(_head_changes, _set_head),
    "pos_head": CellKind(_pos_head_changes, _set_pos_head),
    "pattern_head": CellKind(_pattern_head_changes, _set_pattern_head),
    "pattern_dest": CellKind(_pattern_dest_changes, _set_pattern_dest),
    "pattern_cell": CellKind(_pattern_cell_changes, _set_pattern_cell),
}


def _grids() -> dict[str, Grid]:
    grids = [
        Grid("resid_pre", "hook_resid_pre", ("layer", "pos"), _per_pos, "pos"),
        Grid("resid_mid", "hook_resid_mid", ("layer", "pos"), _per_pos, "pos"),
        Grid("attn_out", "hook_attn_out", ("layer", "pos"), _per_pos, "pos"),
        Grid("mlp_out", "hook_mlp_out", ("layer", "pos"), _per_pos, "pos"),
    ]
    for part, hook in (("out", "z"), ("q", "q"), ("k", "k"), ("v", "v")):
        grids.append(Grid(f"attn_head_{part}_all_pos", f"attn.hook_{hook}", ("layer", "head"), _per_head, "head"))
        grids.append(Grid(f"attn_head_{part}_by_pos", f"attn.hook_{hook}", ("layer", "pos", "head"), _per_pos_head,
                          "pos_head"))
    grids += [
        Grid("attn_head_pattern_all_pos", "attn.hook_pattern", ("layer", "head"), _pattern_per_head, "pattern_head"),
        Grid("attn_head_pattern_by_pos", "attn.hook_pattern", ("layer", "head", "dest_pos"), _pattern_per_head_dest,
             "pattern_dest"),
        Grid("attn_head_pattern_dest_src_pos", "attn.hook_pattern", ("layer", "head", "dest_pos", "src_pos"),
             _pattern_per_cell, "pattern_cell"),
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


