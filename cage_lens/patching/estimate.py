"""The one-backward estimate of every patching grid (docs/patching.md#the-estimate).

Each cell is ``Σ (a_src − a_dst) · ĝ`` over the cell's part of the activation, with ``ĝ`` the gradient of
the metric on the patched run taken under the rules (relevance patching) or plain (attribution
patching): one forward and one backward give every cell of every grid.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from cage_lens.core import engine
from cage_lens.core.adapter import ModelAdapter
from cage_lens.core.certificate import certify_or_warn
from cage_lens.core.hooks import PointHook, installed, session
from cage_lens.core.rulesets import RuleSet
from cage_lens.errors import InputError, NumericalError
from cage_lens.patching.grids import Grid, Metric
from cage_lens.patching.runs import PatchRun, fetch_source, metric_value, source_activation, start_run

__all__ = ["check_rules_reach", "gradients", "linear_grid", "one_backward", "tapped_run", "TappedRun"]


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


def check_rules_reach(rule_set: RuleSet, grids: Sequence[Grid]) -> None:
    """Refuse query/key grids under a rule set that detaches q and k (CP-LRP): they would be all zeros."""
    qk = [g.name for g in grids if g.hook in ("attn.hook_q", "attn.hook_k")]
    if qk and (rule_set.q == 0.0 or rule_set.k == 0.0):
        raise InputError(
            f"rules={rule_set.name!r} detaches q and k (CP-LRP gives them no relevance), so grid {qk[0]!r} has no "
            "estimate; use rules='attnlrp' or 'gxi' for query/key grids"
        )


def gradients(model, adapter: ModelAdapter, tokens: torch.Tensor, metric: Metric, names: Sequence[str],
              rule_set: RuleSet, strict: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The activations at ``names`` on the run of ``tokens`` and the metric's gradient there under
    ``rule_set``: one forward, one backward. Refuses a name no gradient reaches."""
    names = list(dict.fromkeys(names))
    taps: dict[str, torch.Tensor] = {}
    certify_or_warn(adapter, strict)
    tap_hooks = _tap_hooks(adapter, names, taps)
    with session(adapter), engine.rules_active(adapter, rule_set), installed(adapter, tap_hooks):
        value = metric_value(metric, model(tokens))
        found = [taps[n] for n in names]
        grads = dict(zip(names, torch.autograd.grad(value, found, allow_unused=True)))
    unreached = [n for n, g in grads.items() if g is None]
    if unreached:
        raise InputError(
            f"no gradient reaches {unreached[0]} from the metric under rules={rule_set.name!r} (the rules detach "
            "it, or the metric does not depend on it); there is no estimate for that grid"
        )
    return {n: taps[n].detach() for n in names}, {n: g.detach() for n, g in grads.items()}


class TappedRun:
    """The patched run and the graph of its forward under ``rule_set`` (see :func:`tapped_run`)."""

    def __init__(self, run: PatchRun, value: torch.Tensor, found: dict[str, torch.Tensor], taps: Sequence[str],
                 rule_set: RuleSet):
        self.run, self.value, self.found, self.taps, self.rule_set = run, value, found, list(taps), rule_set

    def gradients(self, retain: bool = False, stage: str | None = None) -> dict[str, torch.Tensor]:
        """The metric's gradient at every tap (one backward of the run's own forward, 2 forward-equivalents)."""
        with session(self.run.adapter):
            grads = dict(zip(self.taps, torch.autograd.grad(self.value, [self.found[n] for n in self.taps],
                                                            retain_graph=retain, allow_unused=True)))
        unreached = [n for n in self.taps if grads[n] is None and not n.endswith(("hook_q", "hook_k", "hook_pattern"))]
        if unreached:
            raise InputError(
                f"no gradient reaches {unreached[0]} from the metric under rules={self.rule_set.name!r} (the rules "
                "detach it, or the metric does not depend on it); there is no estimate for that grid"
            )
        self.run.ledger.add_fe(stage or f"backward ({self.rule_set.name})", 2.0)
        return {n: (g.detach() if g is not None else torch.zeros_like(self.found[n])) for n, g in grads.items()}


def tapped_run(model, adapter: ModelAdapter, tokens: torch.Tensor, source: Mapping, metric: Metric,
               names: Sequence[str], taps: Sequence[str], rule_set: RuleSet, strict: bool = True,
               extra_hooks: Sequence[PointHook] = ()) -> TappedRun:
    """The patched run (:func:`~cage_lens.patching.runs.start_run`, with the HF key/value cache on a bridge)
    in one forward under ``rule_set`` that also taps ``taps``: its gradients come later from the same graph
    (:meth:`TappedRun.gradients`), no second forward. The rules change gradients only, so the run's
    activations are the plain forward's (the exact engine's self-check refuses a model where they are not,
    to rounding)."""
    found: dict[str, torch.Tensor] = {}
    certify_or_warn(adapter, strict)
    taps = list(dict.fromkeys(taps))
    with session(adapter), engine.rules_active(adapter, rule_set):
        run, value = start_run(model, adapter, tokens, source, metric, names, kv=True,
                               extra_hooks=_tap_hooks(adapter, taps, found) + list(extra_hooks), grad=True)
    return TappedRun(run, value, found, taps, rule_set)


def linear_grid(grid: Grid, n_layers: int, source: Mapping, activations: dict, grads: dict) -> torch.Tensor:
    """``Σ (a_src − a_dst) · g`` per cell of ``grid``, ``[layer, ...]``."""
    layers = []
    for layer in range(n_layers):
        name = grid.hook_name(layer)
        patched = activations[name]
        layers.append(grid.reduce((source_activation(source, name, patched) - patched) * grads[name]))
    result = torch.stack(layers)
    if not torch.isfinite(result).all():
        raise NumericalError(f"the {grid.name} estimate contains NaN or inf; check the model's dtype and the metric")
    return result


def one_backward(model, adapter: ModelAdapter, tokens: torch.Tensor, source: Mapping, metric: Metric,
                 grids: Sequence[Grid], rule_set: RuleSet, strict: bool = True) -> dict[str, torch.Tensor]:
    """Every grid in ``grids`` from one forward and one backward of ``tokens`` under ``rule_set``."""
    check_rules_reach(rule_set, grids)
    n_layers = adapter.arch.n_layers
    names = [g.hook_name(layer) for g in grids for layer in range(n_layers)]
    for name in dict.fromkeys(names):  # a cache without them is refused before the forward
        fetch_source(source, name)
    activations, grads = gradients(model, adapter, tokens, metric, names, rule_set, strict)
    return {g.name: linear_grid(g, n_layers, source, activations, grads) for g in grids}
