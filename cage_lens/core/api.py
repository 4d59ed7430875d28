"""The public context managers of the LRP core (layer 9 of :mod:`cage_lens.core`): ``lrp`` runs any
TransformerLens workflow under a rule set, ``rule_hooks`` lists a rule set's hooks for
``model.hooks(...)``. Both certify the model through :mod:`cage_lens.core.certificate` (``lrp``) or
realise the rules through :mod:`cage_lens.core.realise` (``rule_hooks``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from cage_lens.core import engine
from cage_lens.core.adapter import adapt
from cage_lens.core.certificate import certify_or_warn
from cage_lens.core.realise import realise
from cage_lens.core.rulesets import RuleSet, resolve_rules

__all__ = ["lrp", "rule_hooks"]


def rule_hooks(model, rules: "str | RuleSet" = "attnlrp") -> list:
    """The ``(hook_name, hook_fn)`` list realising a rule set on ``model``, for ``model.hooks(...)``.

    Prefer :func:`lrp`, which also covers rules that live on modules without a hook point (fused
    mixture-of-experts kernels) and checks the model first; this list raises
    :class:`~cage_lens.UnsupportedModelError` for such models."""
    return realise(adapt(model), resolve_rules(rules)).as_named_hooks()


@contextlib.contextmanager
def lrp(model, rules: "str | RuleSet" = "attnlrp", *, strict: bool = True) -> Iterator:
    """Run everything inside the ``with`` block (in this thread) under an LRP rule set.

    Forward values are unchanged; gradients follow the rules, so ``h * h.grad`` of any activation is
    its LRP relevance. Hooks act only in the thread that opened the block and are removed on exit,
    also after an exception. The model is certified first (docs/rules.md#completeness-certificate);
    ``strict=False`` runs an uncertified model with a warning. Nested blocks with the same rules
    are applied once; different rules inside an active block raise::

        with cage_lens.lrp(model, "attnlrp"):
            logits, cache = model.run_with_cache(tokens)
    """
    adapter = adapt(model)
    rule_set = resolve_rules(rules)
    certify_or_warn(adapter, strict)
    with engine.rules_active(adapter, rule_set):
        yield model
