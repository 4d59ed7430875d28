"""The one-backward estimate of every patching grid (docs/patching.md#the-estimate)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from jaxtyping import Int

from cage_lens.core import engine
from cage_lens.core.adapter import ModelAdapter, adapt
from cage_lens.core.certificate import certify_or_warn
from cage_lens.core.hooks import PointHook, fired_hooks, installed, session
from cage_lens.errors import InputError, NumericalError
from cage_lens.inputs import rectangular_tokens
from cage_lens.patching.grids import BLOCK_GRIDS, Metric, check_grids
from cage_lens.patching.rules import resolve_patch_rules

__all__ = ["relevance_patch", "check_same_length"]


def _as_tokens(model, tokens, role: str = "corrupted_tokens") -> Int[torch.Tensor, "batch pos"]:
    """Tokens through the input gate (cage_lens.inputs): ids checked, prompts never truncated or ``<unk>``-substituted."""
    return rectangular_tokens(model, tokens, role=role)


def check_same_length(model, clean, corrupted) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted tokens as tensors, refusing different lengths (patching compares position
    ``i`` of one run with position ``i`` of the other: there is no alignment rule that keeps that true)."""
    clean_t, corrupted_t = _as_tokens(model, clean, "clean"), _as_tokens(model, corrupted, "corrupted")
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
def _tap_hooks(adapter: ModelAdapter, names: Sequence[str], taps: dict[str, torch.Tensor]) -> list[PointHook]:
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
    return [PointHook(n, fn, first=True) for n, fn in pairs]


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
    fired_hooks(adapter)  # validate the model before installing anything
    rule_set = resolve_patch_rules(rules)
    label = rule_set.name
    wanted = check_grids(grids, adapter)
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
    certify_or_warn(adapter, strict)
    tap_hooks = _tap_hooks(adapter, names, taps)
    with session(adapter), engine.rules_active(adapter, rule_set), installed(adapter, tap_hooks):
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


