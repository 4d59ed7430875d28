"""Agreement of the patching estimates with TransformerLens' activation patching
(docs/patching.md#agreement-with-activation-patching)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from cage_lens.core.adapter import adapt
from cage_lens.errors import InputError
from cage_lens.inputs import check_number
from cage_lens.patching.grids import GRIDS, Grid, Metric, check_grids
from cage_lens.patching.patch import METHODS, relevance_patch
from cage_lens.patching.result import PatchResult
from cage_lens.patching.rules import resolve_patch_rules
from cage_lens.patching.runs import as_tokens, check_same_length

__all__ = ["Agreement", "agreement", "activation_patch", "pearson", "spearman", "DIRECTIONS", "SPEARMAN_FLOOR"]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties sharing their average rank (patching grids hold many exact zeros)."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x, dtype=torch.float64)
    start = 0
    n = len(x)
    while start < n:
        end = start
        while end + 1 < n and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two grids (flattened, float64); NaN when either grid is constant."""
    x, y = a.detach().double().flatten().cpu(), b.detach().double().flatten().cpu()
    if x.shape != y.shape:
        raise InputError(f"cannot correlate grids of {tuple(a.shape)} and {tuple(b.shape)} cells")
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


#: cells below this fraction of their grid's largest |value| rank as 0 in :func:`spearman`
SPEARMAN_FLOOR = 1e-4


def _floored(x: torch.Tensor, floor: float) -> torch.Tensor:
    x = x.detach().double().flatten().cpu()
    return torch.where(x.abs() <= floor * x.abs().max(), torch.zeros_like(x), x)


def spearman(a: torch.Tensor, b: torch.Tensor, floor: float = SPEARMAN_FLOOR) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN when either grid is constant.

    Cells whose |value| is at most ``floor`` × the grid's largest |value| rank as exact zeros (ties):
    TransformerLens stores patched metrics in float32, so effects that small are rounding, and their
    order would otherwise decide the ranks of most cells of a sparse grid."""
    return pearson(_ranks(_floored(a, floor)), _ranks(_floored(b, floor)))


DIRECTIONS = ("denoising", "noising")
DEFAULT_AGREEMENT_GRIDS = ("resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos")


@dataclass
class Agreement:
    """Patching estimates against TransformerLens' activation patching on one batch.

    ``activation[grid]`` is TL's grid minus the unpatched metric (the effect of each patch);
    ``estimates[label][grid]`` the estimates of the same effects, one label per method or rule set
    (``"rap"``, ``"cplrp"``, ``"gxi"``, ...); ``method[label][grid]`` how each was computed and
    ``cost[label]`` its forward-equivalents (TL's sweep: ``tl_forwards``). ``flags[grid]`` are the flags
    of unreliable cells from the routing-aware estimate, when one ran (docs/patching.md#flags).
    ``baseline`` is the metric of the run being patched, ``source`` the metric of the run patched from.
    ``changed[grid]`` marks the cells whose activation differs between the two runs: elsewhere the patch
    is a no-op, every method gives exactly 0, and ``changed_only=True`` leaves those cells out."""

    direction: str
    grids: list[str]
    rules: list[str]
    activation: dict[str, torch.Tensor]
    estimates: dict[str, dict[str, torch.Tensor]]
    baseline: float
    source: float
    changed: dict[str, torch.Tensor]
    method: dict[str, dict[str, str]]
    cost: dict[str, float]
    tl_forwards: int
    flags: dict[str, dict[str, torch.Tensor]]
    exact: dict[str, dict[str, torch.Tensor]]

    def flagged(self, grid: str) -> torch.Tensor:
        """Cells of ``grid`` with any flag that the routing-aware estimate did not compute exactly."""
        mask = torch.zeros(self.activation[grid].shape, dtype=torch.bool)
        for flag in self.flags.get(grid, {}).values():
            mask |= flag
        exact = next((e[grid] for label, e in self.exact.items() if label == "rap"), None)
        return mask & ~exact if exact is not None else mask

    def flag_report(self, rules: str, grid: str, tolerance: float = 0.1) -> dict[str, float]:
        """How well ``flags[grid]`` point at the cells where estimate ``rules`` is off by more than
        ``tolerance`` × the grid's largest effect: recall, precision and the share of changed cells flagged."""
        wrong = (self.estimates[rules][grid] - self.activation[grid]).abs() > tolerance * self.activation[grid].abs().max()
        flagged = torch.zeros_like(wrong)
        for flag in self.flags.get(grid, {}).values():
            flagged |= flag
        changed = self.changed[grid]
        hits = int((wrong & flagged).sum())
        return {"wrong": int(wrong.sum()), "flagged": int(flagged.sum()),
                "recall": hits / int(wrong.sum()) if wrong.any() else float("nan"),
                "precision": hits / int(flagged.sum()) if flagged.any() else float("nan"),
                "share": int(flagged.sum()) / max(1, int(changed.sum()))}

    def _cells(self, rules: str, grid: str, changed_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        est, act = self.estimates[rules][grid], self.activation[grid]
        if changed_only:
            return est[self.changed[grid]], act[self.changed[grid]]
        return est, act

    def pearson(self, rules: str, grid: str, changed_only: bool = False) -> float:
        return pearson(*self._cells(rules, grid, changed_only))

    def spearman(self, rules: str, grid: str, changed_only: bool = False) -> float:
        return spearman(*self._cells(rules, grid, changed_only))

    def table(self) -> str:
        lines = [f"{self.direction}: metric {self.baseline:+.4g} (patched run) vs {self.source:+.4g} (source run)",
                 f"{'grid':<28}" + "".join(f"{r:>20}" for r in self.rules),
                 f"{'':<28}" + "".join(f"{'pearson  spearman':>20}" for _ in self.rules)]
        for g in self.grids:
            flagged = f"   flagged {int(self.flagged(g).sum())}" if self.flags.get(g) else ""
            lines.append(f"{g:<28}" + "".join(f"{self.pearson(r, g):>10.3f}{self.spearman(r, g):>10.3f}" for r in self.rules)
                         + flagged)
        lines.append("cost (forward-equivalents): " + ", ".join(f"{r} {self.cost[r]:.1f}" for r in self.rules)
                     + f"; TransformerLens {self.tl_forwards}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        from cage_lens.views.html import escaped, table_html

        header = ["grid"] + [f"{r} {c}" for r in self.rules for c in ("pearson", "spearman")]
        rows = [[g] + [f"{f(r, g):.3f}" for r in self.rules for f in (self.pearson, self.spearman)] for g in self.grids]
        return (f"<p><b>{escaped(self.direction)}</b>: agreement with activation patching; metric "
                f"{self.baseline:+.4g} (patched run) vs {self.source:+.4g} (source run)</p>" + table_html(header, rows))

    def to_dict(self) -> dict:
        return {
            "direction": self.direction, "grids": self.grids, "rules": self.rules,
            "baseline": self.baseline, "source": self.source,
            "changed": {g: v.tolist() for g, v in self.changed.items()},
            "activation": {g: v.tolist() for g, v in self.activation.items()},
            "estimates": {r: {g: v.tolist() for g, v in d.items()} for r, d in self.estimates.items()},
            "pearson": {r: {g: self.pearson(r, g) for g in self.grids} for r in self.rules},
            "spearman": {r: {g: self.spearman(r, g) for g in self.grids} for r in self.rules},
            "method": self.method, "cost": self.cost, "tl_forwards": self.tl_forwards,
            "flags": {g: {f: v.tolist() for f, v in d.items()} for g, d in self.flags.items()},
        }

    def scatter(self, grid: str, rules: Sequence[str] | None = None, *, ax=None, path=None):
        """Estimate vs activation-patching effect, one colour per rule set (matplotlib, an optional
        dependency). Returns the axes; with ``path`` the figure is also saved there."""
        try:
            import matplotlib

            if ax is None and path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError(
                "Agreement.scatter needs matplotlib (pip install matplotlib); Agreement.table() works without it"
            ) from exc
        if grid not in self.activation:
            raise InputError(f"grid {grid!r} was not measured; measured: {', '.join(self.grids)}")
        if ax is None:
            _, ax = plt.subplots(figsize=(4.2, 4.2))
        x = self.activation[grid].flatten().cpu()
        for r in rules or self.rules:
            ax.scatter(x, self.estimates[r][grid].flatten().cpu(), s=12, alpha=0.7,
                       label=f"{r} (r={self.pearson(r, grid):.2f})")
        lo, hi = float(x.min()), float(x.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("activation patching effect")
        ax.set_ylabel("one-backward estimate")
        ax.set_title(f"{grid} ({self.direction})")
        ax.legend(fontsize=7)
        if path is not None:
            ax.figure.tight_layout()
            ax.figure.savefig(path, dpi=120)
        return ax


def activation_patch(model, tokens, source_cache, metric: Metric, grid: str) -> torch.Tensor:
    """TransformerLens' own ``get_act_patch_<grid>`` (the reference being estimated)."""
    import transformer_lens.patching as tl_patching

    tokens = as_tokens(model, tokens, "tokens").to(adapt(model).device)  # TL truncates nothing, but checks no ids
    (spec,) = check_grids([grid], adapt(model))
    return getattr(tl_patching, spec.tl_function)(model, tokens, source_cache, metric)


def _estimate(model, tokens, source_cache, metric, grids, label_or_rules, speedup, budget) -> PatchResult:
    if isinstance(label_or_rules, str) and label_or_rules in METHODS:
        return relevance_patch(model, tokens, source_cache, metric, grids, method=label_or_rules, speedup=speedup,
                               budget=budget)
    return relevance_patch(model, tokens, source_cache, metric, grids, method="one_backward", rules=label_or_rules)


def agreement(
    model,
    *positional,
    corrupted_tokens=None,
    clean_tokens=None,
    metric: Metric | None = None,
    grids: Sequence[str] = DEFAULT_AGREEMENT_GRIDS,
    rules: Sequence = ("rap", "cplrp", "attnlrp", "gxi"),
    direction: str = "denoising",
    speedup: float | None = None,
    budget: float | None = None,
) -> Agreement:
    """Run TL's activation patching and the estimates on the same grids, prompts and metric:
    ``agreement(model, corrupted_tokens=..., clean_tokens=..., metric=...)``.

    The inputs are keywords, listed in TransformerLens' order (corrupted first, as in
    ``get_act_patch_*(model, corrupted_tokens, clean_cache, metric)``); a positional call is refused,
    because the order was once clean-first and a silent swap would be a silently wrong answer.
    ``direction="denoising"`` patches clean activations into the corrupted run (TL's direction);
    ``"noising"`` patches corrupted activations into the clean run. Tokens are tensors or prompt
    strings of one token length. ``rules``: labels to compare, each a method (``"rap"``, ``"exact"``)
    or a rule set of the one-backward estimate (``"cplrp"``, ``"gxi"``, a ``PatchRules``, ...);
    ``speedup``/``budget`` go to RAP. Cost: one cached forward per run, each estimate, and one forward
    per grid cell for TL."""
    if positional:
        raise InputError(
            "agreement takes its inputs by keyword — agreement(model, corrupted_tokens=..., clean_tokens=..., "
            "metric=...) — in TransformerLens' order; the positional form was clean-first, so a positional call is "
            "refused rather than risk swapping the runs"
        )
    if corrupted_tokens is None or clean_tokens is None or metric is None:
        missing = [n for n, v in (("corrupted_tokens", corrupted_tokens), ("clean_tokens", clean_tokens),
                                  ("metric", metric)) if v is None]
        raise InputError(f"agreement needs {', '.join(missing)} (keywords: corrupted_tokens=, clean_tokens=, metric=)")
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    check_number(speedup, "speedup", low=1.0, allow_none=True)
    check_number(budget, "budget", low=0.0, low_open=True, allow_none=True)
    clean_t, corrupted_t = check_same_length(model, clean_tokens, corrupted_tokens)
    adapter = adapt(model)
    wanted = [g.name for g in check_grids(grids, adapter)]
    labels = [r if isinstance(r, str) and r in METHODS else resolve_patch_rules(r).name for r in rules]
    if not labels:
        raise InputError("name at least one method or rule set to compare")
    clean_t, corrupted_t = clean_t.to(adapter.device), corrupted_t.to(adapter.device)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_t)
        corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_t)
    if direction == "denoising":
        tokens, source_cache, base_logits, source_logits = corrupted_t, clean_cache, corrupted_logits, clean_logits
    else:
        tokens, source_cache, base_logits, source_logits = clean_t, corrupted_cache, clean_logits, corrupted_logits
    baseline, source = float(metric(base_logits)), float(metric(source_logits))
    results = {label: _estimate(model, tokens, source_cache, metric, wanted, r, speedup, budget)
               for label, r in zip(labels, rules)}
    with torch.no_grad():
        effects = {g: activation_patch(model, tokens, source_cache, metric, g).double().cpu() - baseline for g in wanted}
    changed = {g: _changed_cells(GRIDS[g], clean_cache, corrupted_cache, adapter.arch.n_layers) for g in wanted}
    flags = results["rap"].flags if "rap" in results else {}
    return Agreement(direction, wanted, labels, effects,
                     {r: {g: v.double().cpu() for g, v in d.items()} for r, d in results.items()}, baseline, source,
                     changed, {r: d.method for r, d in results.items()}, {r: d.total_cost for r, d in results.items()},
                     sum(effects[g].numel() for g in wanted), {g: {f: m.cpu() for f, m in d.items()} for g, d in flags.items()},
                     {r: {g: m.cpu() for g, m in d.exact.items()} for r, d in results.items()})


def _changed_cells(grid: Grid, cache_a, cache_b, n_layers: int) -> torch.Tensor:
    """Cells of ``grid`` whose activation differs between the two runs."""
    return torch.stack([
        grid.reduce((cache_a[grid.hook_name(layer)] - cache_b[grid.hook_name(layer)]).abs()) > 0
        for layer in range(n_layers)
    ]).cpu()
