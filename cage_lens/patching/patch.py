"""``relevance_patch``: every requested grid by the method chosen per grid (docs/patching.md#methods).

Methods (``method=``):

- ``"rap"`` (the default): routing-aware patching, exact where the budget allows, routing-aware
  estimates elsewhere, with per-cell flags (:mod:`cage_lens.patching.routing`);
- ``"exact"``: every changed cell by exact suffix patching (TransformerLens' numbers, fewer FLOPs);
- ``"one_backward"``: one forward and one backward under ``rules`` (relevance patching; attribution
  patching with ``rules="gxi"``); also what ``rules=`` alone selects, as it always has;
- ``"atp_star"``: AtP* (attribution patching with the QK fix and GradDrop), a baseline
  (:mod:`cage_lens.patching.atp_star`).
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch
from jaxtyping import Int

from cage_lens.core.adapter import ModelAdapter, adapt
from cage_lens.core.hooks import fired_hooks, session
from cage_lens.errors import InputError, UnsupportedModelError
from cage_lens.inputs import check_number
from cage_lens.patching.atp_star import GradDrop, atp_star_inputs, atp_star_run, atp_star_taps
from cage_lens.patching.estimate import check_rules_reach, one_backward, tapped_run
from cage_lens.patching.exact import SuffixPatcher, cells_of
from cage_lens.patching.grids import BLOCK_GRIDS, Grid, Metric, check_grids
from cage_lens.patching.result import PatchResult
from cage_lens.patching.routing import primary_rules, routing_names, routing_patch_run, tl_forwards
from cage_lens.patching.rules import default_rules, resolve_patch_rules
from cage_lens.patching.runs import as_tokens, start_run

__all__ = ["relevance_patch", "METHODS", "DEFAULT_BUDGET", "default_budget", "default_method", "resolve_method"]

METHODS = ("rap", "exact", "one_backward", "atp_star")
#: RAP's default budget in forward-equivalents for the whole call, kept between 1/75 and 1/10 of
#: TransformerLens' forwards for the same grids (docs/patching.md#budget)
DEFAULT_BUDGET = 16.0


def default_budget(tl_forwards: int) -> float:
    """16 forward-equivalents — what the zoo's grids need for the agreement targets — but never more than
    1/10 of TransformerLens' sweep nor less than 1/75 of it (large sweeps get proportionally more)."""
    return min(tl_forwards / 10, max(tl_forwards / 75, DEFAULT_BUDGET))


def default_method(grid: str) -> str:
    """The default of every grid: RAP with the grid's default rules for its one-backward part."""
    return f"rap ({default_rules(grid)})"


def resolve_method(method: str | None, rules) -> str:
    """``method`` checked; ``None`` is ``"rap"``, or ``"one_backward"`` when only ``rules=`` was given."""
    if method is None:
        return "rap" if rules is None else "one_backward"
    if method not in METHODS:
        raise InputError(f"unknown patching method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def _names(adapter: ModelAdapter, grids: Sequence[Grid], method: str) -> list[str]:
    n_layers = adapter.arch.n_layers
    names = [g.hook_name(l) for g in grids for l in range(n_layers)]
    if not adapter.arch.is_bridge:  # the blocks' inputs and the prefix keys/values (pre-rotary)
        names += [adapter.block(l, n) for l in range(n_layers) for n in ("hook_resid_pre", "attn.hook_k", "attn.hook_v")]
    if method in ("rap", "atp_star"):
        names += [n for l in range(n_layers) for key, n in routing_names(adapter, l).items() if key != "z"]
    if method == "atp_star":
        names += atp_star_inputs(adapter)
    return list(dict.fromkeys(names))


def _one_backward(model, adapter, tokens, source, metric, grids, rules, strict, note: str = "") -> PatchResult:
    groups: dict[str, list[Grid]] = {}
    for g in grids:
        groups.setdefault(resolve_patch_rules(rules[g.name]).name, []).append(g)
    values, method, cost = {}, {}, {}
    for label, members in groups.items():
        values.update({k: v for k, v in one_backward(model, adapter, tokens, source, metric, members,
                                                      resolve_patch_rules(rules[members[0].name]), strict).items()})
        method.update({g.name: f"one_backward: {label}{note}" for g in members})
        cost[f"forward + backward ({label})"] = 3.0
    exact = {g.name: torch.zeros(values[g.name].shape, dtype=torch.bool) for g in grids}
    cells = sum(values[g.name].numel() for g in grids)
    return PatchResult({g.name: values[g.name] for g in grids}, method, exact, {}, cost, cells)


def relevance_patch(
    model,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Mapping[str, torch.Tensor],
    patching_metric: Metric,
    grids: str | Sequence[str] = BLOCK_GRIDS,
    *,
    method: str | None = None,
    rules=None,
    speedup: float | None = None,
    budget: float | None = None,
    strict: bool = True,
) -> PatchResult:
    """Every requested grid of ``transformer_lens.patching.get_act_patch_<grid>``, as the change each
    patch makes: metric(patched) − metric(unpatched run).

    Args:
        model: a HookedTransformer or TransformerBridge (eval mode).
        corrupted_tokens: ``[batch, pos]`` tokens of the run that is patched (or prompt strings of one length).
        clean_cache: activations of the run patched *from*, ``model.run_with_cache(clean_tokens)[1]``
            (an ``ActivationCache`` or a dict keyed by hook name; same batch and positions).
        patching_metric: ``metric(logits) -> scalar`` on ``[batch, pos, vocab]`` logits (TL's contract).
        grids: names from :data:`GRIDS` (``"resid_pre"``, ``"attn_head_out_all_pos"``, ...).
        method: ``"rap"`` (default), ``"exact"`` or ``"one_backward"`` (module docstring); with only
            ``rules=`` given, ``"one_backward"``.
        rules: the rules of the one-backward estimate (RAP's too): ``"cplrp"`` (default; ``"relp"`` for
            query/key grids, which CP-LRP cannot estimate), ``"attnlrp"``, ``"gxi"`` (attribution patching),
            ``"relp"``, a :class:`PatchRules` or a rule set.
        speedup, budget: RAP's budget in forward-equivalents for the whole call (docs/patching.md#budget):
            ``budget`` directly, or TransformerLens' forward count / ``speedup``; by default
            :func:`default_budget` (16, within 1/75 .. 1/10 of TransformerLens' forwards).
        strict: refuse a model the completeness certificate does not pass (docs/rules.md).

    Returns: a :class:`PatchResult` — ``{grid: tensor}`` shaped like TL's grids, with ``method``, ``exact``,
    ``flags``, ``cost`` and ``speedup`` (docs/patching.md#flags).
    """
    adapter = adapt(model)
    adapter.check_eval_mode()
    fired_hooks(adapter)  # validate the model before installing anything
    tokens = as_tokens(model, corrupted_tokens).to(adapter.device)
    wanted = check_grids(grids, adapter)
    chosen = resolve_method(method, rules)
    speedup = check_number(speedup, "speedup", low=1.0, allow_none=True)
    budget = check_number(budget, "budget", low=0.0, low_open=True, allow_none=True)
    per_grid = {g.name: rules if rules is not None else default_rules(g.name) for g in wanted}
    for r in per_grid.values():
        resolve_patch_rules(r)  # an unknown rule set is refused before any forward
    if chosen == "one_backward":
        return _one_backward(model, adapter, tokens, clean_cache, patching_metric, wanted, per_grid, strict)
    with session(adapter, grad=False):  # one session for the many small runs below
        return _patch_run(model, adapter, tokens, clean_cache, patching_metric, wanted, chosen, per_grid,
                          method is not None, speedup, budget, strict)


def _patch_run(model, adapter, tokens, clean_cache, patching_metric, wanted, chosen, per_grid, explicit: bool,
               speedup, budget, strict) -> PatchResult:
    names = _names(adapter, wanted, chosen)
    tapped, graddrop = None, None
    if chosen == "exact":
        run, _ = start_run(model, adapter, tokens, clean_cache, patching_metric, names, kv=True)
    elif chosen == "atp_star":  # plain gradients, AtP*'s taps and the GradDrop gates in one forward
        graddrop = GradDrop(adapter)
        tapped = tapped_run(model, adapter, tokens, clean_cache, patching_metric, names,
                            atp_star_taps(adapter, wanted), resolve_patch_rules("gxi"), strict, graddrop.hooks())
        run = tapped.run
    else:  # RAP: the patched run under the rules of its main one-backward estimate, backward only when needed
        primary = primary_rules(wanted, per_grid)
        members = [g for g in wanted if resolve_patch_rules(per_grid[g.name]).name == primary.name]
        check_rules_reach(primary, members)
        taps = [g.hook_name(l) for g in members for l in range(adapter.arch.n_layers)]
        taps += [routing_names(adapter, l)["z"] for l in range(adapter.arch.n_layers)]
        tapped = tapped_run(model, adapter, tokens, clean_cache, patching_metric, names, taps, primary, strict)
        run = tapped.run
    try:
        patcher = SuffixPatcher(run)
    except UnsupportedModelError as exc:
        if explicit:
            raise
        note = f" (exact patching unavailable: {exc})"
        warnings.warn(f"relevance_patch falls back to the one-backward estimate{note}", stacklevel=2)
        return _one_backward(model, adapter, tokens, clean_cache, patching_metric, wanted, per_grid, strict, note)
    if chosen == "exact":  # every changed cell, one batch per first row across the grids
        values = {g.name: torch.zeros(run.changes(g)[0].shape, dtype=torch.float64) for g in wanted}
        cells = [c for g in wanted for c in cells_of(run, g)]
        for cell, value in zip(cells, patcher.effects(cells)):
            values[cell.grid.name][(cell.layer,) + cell.index] = value
        exact = {g.name: torch.ones(values[g.name].shape, dtype=torch.bool) for g in wanted}
        return PatchResult(values, {g.name: "exact" for g in wanted}, exact, {}, run.ledger.fe(), tl_forwards(run, wanted))
    tl = tl_forwards(run, wanted)
    limit = budget if budget is not None else tl / speedup if speedup is not None else default_budget(tl)
    if chosen == "atp_star":
        return atp_star_run(run, patcher, wanted, tapped, graddrop)
    return routing_patch_run(run, patcher, wanted, per_grid, limit, tapped, strict)
