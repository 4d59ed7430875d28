"""Rule sets for relevance patching: the engine's rule sets, RelP's reference rules and ablations of
one component at a time (docs/patching.md#rules)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cage_lens.core.rulesets import BUILT_IN_RULES, RULE_SETS, RuleSet, resolve_rules
from cage_lens.errors import InputError
from cage_lens.patching.grids import GRIDS

__all__ = ["PatchRules", "RULE_VARIANTS", "resolve_patch_rules", "default_rules"]


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


def default_rules(grid: str) -> str:
    """CP-LRP for every grid it can estimate; RelP's rule set for query and key grids."""
    return "relp" if GRIDS[grid].hook in ("attn.hook_q", "attn.hook_k") else "cplrp"
