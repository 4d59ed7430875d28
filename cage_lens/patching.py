"""Relevance patching: TransformerLens' activation-patching grids estimated from one backward pass.

Named and shaped like ``transformer_lens.patching``: swap ``patching.get_act_patch_resid_pre`` for
``cage_lens.patching.relevance_patch_resid_pre`` (same arguments, same grid shape and axis order).
Each cell is the first-order estimate of what patching that cell does to the metric,

    (a_clean − a_corrupted) · ∂metric/∂a   (evaluated on the corrupted run, gradient under ``rules``)

summed over the batch and the cell's feature axes. ``rules="gxi"`` is classic attribution patching;
``"cplrp"`` (the default, best measured), ``"attnlrp"`` and ``"relp"`` (the RelP reference rules) take
the gradient under LRP rules (relevance patching). One forward and one backward of the corrupted batch
give every cell of every requested grid.

Direction and sign: TransformerLens' ``get_act_patch_*`` run ``corrupted_tokens`` with activations
from ``clean_cache`` patched in (denoising) and return ``metric(patched logits)``. The estimate here
is the *change* that patch makes, ``metric(patched) − metric(corrupted)``: subtract the unpatched
metric from TL's grid to compare numbers (correlations are unaffected). Noising is the same call
with the roles swapped — ``relevance_patch_*(model, clean_tokens, corrupted_cache, metric)``, exactly
as with TL. See docs/patching.md for formulas, conventions and the measured agreement.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from jaxtyping import Float, Int

from cage_lens.adapter import ModelAdapter, adapt
from cage_lens.errors import InputError, NumericalError
from cage_lens import engine
from cage_lens.rules import BUILT_IN_RULES, RULE_SETS, RuleSet, resolve_rules

__all__ = [
    "GRIDS", "Grid", "PatchRules", "RULE_VARIANTS", "relevance_patch", "resolve_patch_rules",
    "relevance_patch_resid_pre", "relevance_patch_resid_mid", "relevance_patch_attn_out", "relevance_patch_mlp_out",
    "relevance_patch_attn_head_out_all_pos", "relevance_patch_attn_head_q_all_pos",
    "relevance_patch_attn_head_k_all_pos", "relevance_patch_attn_head_v_all_pos",
    "relevance_patch_attn_head_pattern_all_pos", "relevance_patch_attn_head_out_by_pos",
    "relevance_patch_attn_head_q_by_pos", "relevance_patch_attn_head_k_by_pos",
    "relevance_patch_attn_head_v_by_pos", "relevance_patch_attn_head_pattern_by_pos",
    "relevance_patch_attn_head_pattern_dest_src_pos", "relevance_patch_block_every",
    "relevance_patch_attn_head_all_pos_every", "relevance_patch_attn_head_by_pos_every",
    "agreement", "Agreement", "activation_patch", "check_same_length", "pearson", "spearman",
]

Metric = Callable[[Float[torch.Tensor, "batch pos vocab"]], torch.Tensor]


# ---------------------------------------------------------------------------- grids
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


def _check_grids(grids: str | Sequence[str], adapter: ModelAdapter) -> list[Grid]:
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


# ---------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class PatchRules:
    """A rule variant for relevance patching: an engine rule set (``base``) with each component's
    rule switched on (the base rule) or off (plain gradient). It builds a :class:`~cage_lens.RuleSet`
    (:meth:`rule_set`), so the variants run on the same engine as every other view.

    ``norms``: normalisation scale constant; ``mlp``: identity rule on element-wise activations, the
    gated product's split and constant MoE routers; ``attention``: AttnLRP's factors on q, k, v or
    CP-LRP's detached q and k (and the soft-cap rule on attention scores).
    ``PatchRules("relp", base="attnlrp", attention=False)`` is the rule set of the RelP reference code
    (LN rule, identity rule, half rule on the gate; attention untouched). docs/patching.md#rules
    lists what each variant measured.
    """

    name: str
    base: str = "cplrp"
    norms: bool = True
    mlp: bool = True
    attention: bool = True

    def __post_init__(self):
        if self.base not in RULE_SETS:
            raise InputError(f"PatchRules.base must be one of {', '.join(RULE_SETS)}, got {self.base!r}")

    def rule_set(self) -> RuleSet:
        changes: dict = {}
        if not self.norms:
            changes["norm"] = "gradient"
        if not self.mlp:
            changes.update(activation="gradient", gate=1.0, up=1.0, router="gradient")
        if not self.attention:
            changes.update(q=1.0, k=1.0, v=1.0, softcap="gradient")
        return dataclasses.replace(BUILT_IN_RULES[self.base], name=self.name, **changes)


#: named variants accepted by ``rules=`` in this module, next to the engine's rule sets
RULE_VARIANTS: dict[str, RuleSet] = {
    "relp": PatchRules("relp", base="attnlrp", attention=False).rule_set(),
}


def resolve_patch_rules(rules) -> RuleSet:
    """A :class:`RuleSet` from an engine rule-set name, a name from ``RULE_VARIANTS``, a
    :class:`PatchRules` or a RuleSet."""
    if isinstance(rules, PatchRules):
        return rules.rule_set()
    if isinstance(rules, str) and rules.lower() in RULE_VARIANTS:
        return RULE_VARIANTS[rules.lower()]
    if isinstance(rules, (str, RuleSet)) and (not isinstance(rules, str) or rules.lower() in RULE_SETS):
        return resolve_rules(rules)
    raise InputError(
        f"unknown rule set {rules!r}; choose one of {', '.join(RULE_SETS + tuple(RULE_VARIANTS))}, "
        "a patching.PatchRules or a cage_lens.RuleSet"
    )


# ---------------------------------------------------------------------------- inputs
def _as_tokens(model, tokens) -> Int[torch.Tensor, "batch pos"]:
    if isinstance(tokens, str):
        tokens = [tokens]
    if isinstance(tokens, (list, tuple)):
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise InputError("prompts must be a string, a non-empty list of strings or a [batch, pos] token tensor")
        rows = [model.to_tokens(t)[0] for t in tokens]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise InputError(
                f"the prompts have different token lengths {lengths}; a patching batch must be rectangular "
                "(TransformerLens patches position i of every row). Batch prompts of equal length."
            )
        return torch.stack(rows)
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise InputError(f"tokens must be an integer [batch, pos] tensor or prompt strings, got {type(tokens).__name__}")
    if tokens.ndim != 2:
        raise InputError(f"tokens must be [batch, pos] (TransformerLens' patching contract), got shape {tuple(tokens.shape)}")
    return tokens.long()


def check_same_length(model, clean, corrupted) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted tokens as tensors, refusing different lengths (patching compares position
    ``i`` of one run with position ``i`` of the other: there is no alignment rule that keeps that true)."""
    clean_t, corrupted_t = _as_tokens(model, clean), _as_tokens(model, corrupted)
    if clean_t.shape != corrupted_t.shape:
        detail = ""
        if clean_t.shape[0] == 1 == corrupted_t.shape[0] and hasattr(model, "to_str_tokens"):
            detail = (f": clean {list(model.to_str_tokens(clean_t[0]))} vs corrupted "
                      f"{list(model.to_str_tokens(corrupted_t[0]))}")
        raise InputError(
            f"clean and corrupted inputs have different shapes {tuple(clean_t.shape)} vs {tuple(corrupted_t.shape)}"
            f"{detail}. Patching needs the same number of tokens in both runs: change one token for "
            "another single token (check leading spaces)."
        )
    return clean_t, corrupted_t


def _clean_activation(cache, name: str) -> torch.Tensor:
    try:
        value = cache[name]
    except (KeyError, IndexError):
        value = None
    if value is None:
        raise InputError(
            f"the clean cache has no {name!r}; build it with model.run_with_cache(clean_tokens) "
            "(without a names_filter that drops it)"
        )
    return value


def _metric_value(metric: Metric, logits: torch.Tensor) -> torch.Tensor:
    value = metric(logits)
    if not isinstance(value, torch.Tensor):
        raise InputError(
            f"patching_metric returned a {type(value).__name__}; it must return a scalar torch tensor computed "
            "from the logits (TransformerLens' contract metric(logits) -> scalar; do not call .item())"
        )
    if value.ndim != 0:
        raise InputError(
            f"patching_metric must return a scalar (TransformerLens' contract metric(logits) -> scalar), "
            f"got shape {tuple(value.shape)}; reduce it over the batch, e.g. .mean()"
        )
    if not value.requires_grad:
        raise InputError("patching_metric's value does not depend on the logits (no gradient); compute it from them")
    if not torch.isfinite(value):
        raise NumericalError(f"patching_metric is not finite on the corrupted run: {float(value)}")
    return value


# ---------------------------------------------------------------------------- the estimate
def _tap_hooks(adapter: ModelAdapter, names: Sequence[str], taps: dict[str, torch.Tensor]) -> list[engine.PointHook]:
    """Hooks that hand each patched hook point a fresh view of its activation and keep it in ``taps``.

    The gradient of that view is the gradient of *replacing the hook's output*, which is exactly what
    TransformerLens' patch does (on a bridge, ``hook_resid_mid`` aliases ``ln2.hook_in`` and a tensor
    returned there only reaches the MLP; the estimate follows). The embeddings are re-rooted so
    gradients exist even when the model's parameters are frozen; no ``.grad`` is written anywhere."""
    def root(tensor, hook):
        return tensor.detach().requires_grad_(True)

    def tap(name):
        def hook(tensor, hook):
            # an activation cut off from the inputs by a rule (the pattern under CP-LRP) still has a
            # gradient with respect to the metric: make it a leaf
            taps[name] = tensor.view_as(tensor) if tensor.requires_grad else tensor.detach().requires_grad_(True)
            return taps[name]
        return hook

    # ahead of the rule hooks: a rule placed on a tapped activation itself (AttnLRP's ÷4 on q and k,
    # ÷2 on v) is part of the gradient that activation receives
    pairs = [(n, root) for n in engine.input_roots(adapter)] + [(n, tap(n)) for n in names]
    return [engine.PointHook(n, fn, first=True) for n, fn in pairs]


def relevance_patch(
    model,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Mapping[str, torch.Tensor],
    patching_metric: Metric,
    grids: str | Sequence[str] = BLOCK_GRIDS,
    *,
    rules="cplrp",
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """Every requested grid from ONE forward and ONE backward of ``corrupted_tokens`` under ``rules``.

    Args:
        model: a HookedTransformer or TransformerBridge (eval mode).
        corrupted_tokens: ``[batch, pos]`` tokens of the run that is patched (or prompt strings of one length).
        clean_cache: activations of the run patched *from*, e.g. ``model.run_with_cache(clean_tokens)[1]``
            (an ``ActivationCache`` or a dict keyed by hook name); same batch and positions.
        patching_metric: ``metric(logits) -> scalar`` on ``[batch, pos, vocab]`` logits (TL's contract).
        grids: names from :data:`GRIDS` (``"resid_pre"``, ``"attn_head_out_all_pos"``, ...).
        strict: refuse a model the completeness certificate does not pass (docs/rules.md).
        rules: ``"cplrp"`` (default: the best agreement measured, docs/patching.md#results), ``"attnlrp"``,
            ``"gxi"`` (attribution patching), a name from :data:`RULE_VARIANTS` (``"relp"``), a
            :class:`PatchRules`, or a rule set the engine accepts. CP-LRP detaches q and k, so query/key
            grids (and the head bundles that contain them) default to ``"relp"``.

    Returns: ``{grid name: tensor}`` shaped like TL's grid; each cell estimates
    ``metric(patched) − metric(corrupted)``.
    """
    adapter = adapt(model)
    adapter.check_eval_mode()
    adapter.fired_hooks  # validate the model before installing anything
    rule_set = resolve_patch_rules(rules)
    label = rule_set.name
    wanted = _check_grids(grids, adapter)
    qk = [g.name for g in wanted if g.hook in ("attn.hook_q", "attn.hook_k")]
    if qk and (rule_set.q == 0.0 or rule_set.k == 0.0):
        raise InputError(
            f"rules={label!r} detaches q and k (CP-LRP gives them no relevance), so grid {qk[0]!r} has no "
            "estimate; use rules='attnlrp' or 'gxi' for query/key grids"
        )
    tokens = _as_tokens(model, corrupted_tokens).to(adapter.device)
    n_layers = adapter.arch.n_layers
    names = list(dict.fromkeys(g.hook_name(layer) for g in wanted for layer in range(n_layers)))
    clean = {n: _clean_activation(clean_cache, n) for n in names}

    taps: dict[str, torch.Tensor] = {}
    engine.certify_or_warn(adapter, strict)
    tap_hooks = _tap_hooks(adapter, names, taps)
    with engine.session(adapter), engine.rules_active(adapter, rule_set), engine.installed(adapter, tap_hooks):
        value = _metric_value(patching_metric, model(tokens))
        found = [taps[n] for n in names]
        grads = dict(zip(names, torch.autograd.grad(value, found, allow_unused=True)))
    unreached = [n for n, g in grads.items() if g is None]
    if unreached:
        raise InputError(
            f"no gradient reaches {unreached[0]} from the metric under rules={label!r} (the rules detach it, "
            "or the metric does not depend on it); there is no estimate for that grid"
        )

    out = {}
    for grid in wanted:
        layers = []
        for layer in range(n_layers):
            name = grid.hook_name(layer)
            corrupted = taps[name].detach()
            source = clean[name].to(device=corrupted.device, dtype=corrupted.dtype)
            if source.shape != corrupted.shape:
                raise InputError(
                    f"{name}: the clean cache holds shape {tuple(source.shape)} but the corrupted run has "
                    f"{tuple(corrupted.shape)}; clean and corrupted inputs need the same batch size and token length"
                )
            layers.append(grid.reduce((source - corrupted) * grads[name]))
        result = torch.stack(layers).detach()
        if not torch.isfinite(result).all():
            raise NumericalError(f"the {grid.name} estimate contains NaN or inf; check the model's dtype and the metric")
        out[grid.name] = result
    return out


def _default_rules(grid: str) -> str:
    """CP-LRP for every grid it can estimate; RelP's rule set for query and key grids."""
    return "relp" if GRIDS[grid].hook in ("attn.hook_q", "attn.hook_k") else "cplrp"


def _named(grid: str) -> Callable:
    spec = GRIDS[grid]
    shape = " ".join(spec.axes)
    default = _default_rules(grid)

    def estimate(model, corrupted_tokens, clean_cache, patching_metric, *, rules=default) -> torch.Tensor:
        return relevance_patch(model, corrupted_tokens, clean_cache, patching_metric, grid, rules=rules)[grid]

    estimate.__name__ = estimate.__qualname__ = f"relevance_patch_{grid}"
    estimate.__doc__ = (
        f"Relevance-patching estimate of ``transformer_lens.patching.{spec.tl_function}``: ``[{shape}]``, each "
        f"cell ≈ metric(patched) − metric(corrupted) for patching ``blocks.{{layer}}.{spec.hook}`` from "
        "``clean_cache`` into the run of ``corrupted_tokens``. One forward and one backward under ``rules`` "
        f"(default {default!r}); see :func:`relevance_patch`."
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
    model, corrupted_tokens, clean_cache, metric, *, rules="cplrp"
) -> Float[torch.Tensor, "patch_type layer pos"]:
    """``[3, layer, pos]``: resid_pre, attn_out, mlp_out (as ``get_act_patch_block_every``), one backward."""
    grids = relevance_patch(model, corrupted_tokens, clean_cache, metric, BLOCK_GRIDS, rules=rules)
    return torch.stack([grids[g] for g in BLOCK_GRIDS])


def relevance_patch_attn_head_all_pos_every(
    model, corrupted_tokens, clean_cache, metric, *, rules="relp"
) -> Float[torch.Tensor, "patch_type layer head"]:
    """``[5, layer, head]``: out, q, k, v, pattern (as ``get_act_patch_attn_head_all_pos_every``;
    grouped-query k and v zero-padded to ``n_heads``), one backward."""
    names = [f"attn_head_{p}_all_pos" for p in HEAD_PARTS]
    grids = relevance_patch(model, corrupted_tokens, clean_cache, metric, names, rules=rules)
    n_heads = adapt(model).arch.n_heads
    return torch.stack([_pad_heads(grids[n], n_heads) for n in names])


def relevance_patch_attn_head_by_pos_every(
    model, corrupted_tokens, clean_cache, metric, *, rules="relp"
) -> Float[torch.Tensor, "patch_type layer pos head"]:
    """``[5, layer, pos, head]``: out, q, k, v, pattern (as ``get_act_patch_attn_head_by_pos_every``:
    k and v zero-padded, the pattern grid moved to ``[layer, dest_pos, head]``), one backward."""
    names = [f"attn_head_{p}_by_pos" for p in HEAD_PARTS]
    grids = relevance_patch(model, corrupted_tokens, clean_cache, metric, names, rules=rules)
    n_heads = adapt(model).arch.n_heads
    grids["attn_head_pattern_by_pos"] = grids["attn_head_pattern_by_pos"].transpose(1, 2)
    return torch.stack([_pad_heads(grids[n], n_heads) for n in names])



# ---------------------------------------------------------------------------- agreement with TL
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
    """Relevance / attribution patching against TransformerLens' activation patching on one batch.

    ``activation[grid]`` is TL's grid minus the unpatched metric (the effect of each patch);
    ``estimates[rules][grid]`` the one-backward estimates of the same effects. ``baseline`` is the
    metric of the run being patched, ``source`` the metric of the run patched from. ``changed[grid]``
    marks the cells whose activation differs between the two runs: elsewhere the patch is a no-op,
    every method gives exactly 0, and ``changed_only=True`` leaves those cells out of a correlation."""

    direction: str
    grids: list[str]
    rules: list[str]
    activation: dict[str, torch.Tensor]
    estimates: dict[str, dict[str, torch.Tensor]]
    baseline: float
    source: float
    changed: dict[str, torch.Tensor]

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
            lines.append(f"{g:<28}" + "".join(f"{self.pearson(r, g):>10.3f}{self.spearman(r, g):>10.3f}" for r in self.rules))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {
            "direction": self.direction, "grids": self.grids, "rules": self.rules,
            "baseline": self.baseline, "source": self.source,
            "changed": {g: v.tolist() for g, v in self.changed.items()},
            "activation": {g: v.tolist() for g, v in self.activation.items()},
            "estimates": {r: {g: v.tolist() for g, v in d.items()} for r, d in self.estimates.items()},
            "pearson": {r: {g: self.pearson(r, g) for g in self.grids} for r in self.rules},
            "spearman": {r: {g: self.spearman(r, g) for g in self.grids} for r in self.rules},
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

    return getattr(tl_patching, GRIDS[grid].tl_function)(model, tokens, source_cache, metric)


def agreement(
    model,
    clean,
    corrupted,
    metric: Metric,
    *,
    grids: Sequence[str] = DEFAULT_AGREEMENT_GRIDS,
    rules: Sequence = ("cplrp", "attnlrp", "gxi"),
    direction: str = "denoising",
) -> Agreement:
    """Run TL's activation patching and the one-backward estimates on the same grids, prompts and metric.

    ``direction="denoising"`` patches clean activations into the corrupted run (TL's
    ``get_act_patch_*(model, corrupted_tokens, clean_cache, metric)``); ``"noising"`` patches corrupted
    activations into the clean run. ``clean``/``corrupted``: token tensors or prompt strings of one
    token length. Cost: one cached forward per run, one forward+backward per rule set, and one
    forward per grid cell for TL."""
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    adapter = adapt(model)
    wanted = [g.name for g in _check_grids(grids, adapter)]
    labels = [resolve_patch_rules(r).name for r in rules]
    if not labels:
        raise InputError("name at least one rule set to compare")
    clean_t, corrupted_t = check_same_length(model, clean, corrupted)
    clean_t, corrupted_t = clean_t.to(adapter.device), corrupted_t.to(adapter.device)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_t)
        corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_t)
    if direction == "denoising":
        tokens, source_cache, base_logits, source_logits = corrupted_t, clean_cache, corrupted_logits, clean_logits
    else:
        tokens, source_cache, base_logits, source_logits = clean_t, corrupted_cache, clean_logits, corrupted_logits
    baseline, source = float(metric(base_logits)), float(metric(source_logits))
    estimates = {
        label: relevance_patch(model, tokens, source_cache, metric, wanted, rules=r) for label, r in zip(labels, rules)
    }
    with torch.no_grad():
        effects = {g: activation_patch(model, tokens, source_cache, metric, g).double().cpu() - baseline for g in wanted}
    changed = {g: _changed_cells(GRIDS[g], clean_cache, corrupted_cache, adapter.arch.n_layers) for g in wanted}
    return Agreement(direction, wanted, labels, effects,
                     {r: {g: v.double().cpu() for g, v in d.items()} for r, d in estimates.items()}, baseline, source,
                     changed)


def _changed_cells(grid: Grid, cache_a, cache_b, n_layers: int) -> torch.Tensor:
    """Cells of ``grid`` whose activation differs between the two runs."""
    return torch.stack([
        grid.reduce((cache_a[grid.hook_name(layer)] - cache_b[grid.hook_name(layer)]).abs()) > 0
        for layer in range(n_layers)
    ]).cpu()
