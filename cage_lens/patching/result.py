"""What a patching call returns: the grids, and how far to trust each cell (docs/patching.md#flags)."""

from __future__ import annotations

import torch

__all__ = ["PatchResult", "FLAG_NAMES"]

#: the per-cell flags a routing-aware result can carry, and what each says (docs/patching.md#flags)
FLAG_NAMES = {
    "saturated_switch": "an attention row this cell reaches switches (total variation ≥ 0.5) on a saturated softmax "
                        "(p(1 − p) < 0.05 before or after): one-backward estimates cannot see it",
    "disagree": "the routing-aware estimate and the one-backward estimate differ by more than 10 % of the grid's "
                "largest value: the one-backward estimate is wrong here",
    "cross_routing": "more than half of the estimate comes from later rows re-reading this row's key and value while "
                     "some row switches (total variation ≥ 0.3): first order in a routing change, not exact",
    "cancellation": "the estimate is a small difference of terms over three times its size: their errors do not "
                    "cancel",
    "graddrop": "AtP*'s GradDrop: dropping one downstream layer's gradient moves the estimate by more than the "
                "estimate itself (cancelling paths)",
}


class PatchResult(dict):
    """``{grid name: tensor}`` shaped like TransformerLens' grid, each cell ≈ metric(patched) −
    metric(unpatched), with how each grid was computed.

    - ``method[grid]``: the method and rules behind the grid (e.g. ``"rap: exact"``, ``"rap: row-exact +
      cplrp, 37 cells exact"``, ``"one_backward: cplrp"``);
    - ``exact[grid]``: boolean grid, the cells computed by exact patching (equal to TL's, to rounding);
    - ``flags[grid]``: ``{flag: boolean grid}`` of cells whose estimate is unreliable, see :data:`FLAG_NAMES`;
    - ``routing_tv[grid]``: where computed, the largest total-variation change of an attention row the
      cell's patch causes (0 = attention unchanged, 1 = a row switched completely);
    - ``cost``: forward-equivalents per stage (docs/patching.md#cost); ``tl_forwards``: the forwards
      TransformerLens' sweep of the same grids runs (one per cell); ``speedup`` their ratio."""

    def __init__(self, grids: dict[str, torch.Tensor], method: dict[str, str], exact: dict[str, torch.Tensor],
                 flags: dict[str, dict[str, torch.Tensor]], cost: dict[str, float], tl_forwards: int,
                 routing_tv: dict[str, torch.Tensor] | None = None):
        super().__init__(grids)
        self.method = method
        self.exact = exact
        self.flags = flags
        self.cost = cost
        self.tl_forwards = tl_forwards
        self.routing_tv = routing_tv or {}

    @property
    def total_cost(self) -> float:
        return float(sum(self.cost.values()))

    @property
    def speedup(self) -> float:
        return self.tl_forwards / self.total_cost if self.total_cost > 0 else float("inf")

    def unreliable(self, grid: str) -> torch.Tensor:
        """Cells of ``grid`` that carry a flag and were not computed exactly."""
        mask = torch.zeros(self[grid].shape, dtype=torch.bool)
        for flag in self.flags.get(grid, {}).values():
            mask |= flag.cpu()
        return mask & ~self.exact[grid].cpu()

    def summary(self) -> str:
        lines = [f"cost {self.total_cost:.1f} forward-equivalents ({self.speedup:.0f}x fewer than "
                 f"TransformerLens' {self.tl_forwards} forwards)"]
        for grid in self:
            exact = int(self.exact[grid].sum())
            counts = ", ".join(f"{name} {int(mask.sum())}" for name, mask in self.flags.get(grid, {}).items())
            lines.append(f"{grid}: {self.method[grid]}; {exact} of {self[grid].numel()} cells exact"
                         + (f"; flags: {counts}" if counts else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()
