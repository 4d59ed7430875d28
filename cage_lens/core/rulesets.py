"""LRP rule sets as data (layer 1 of :mod:`cage_lens.core`; see docs/rules.md).

Every rule keeps forward values bit-identical and only changes local gradients, so the relevance of
any hooked activation ``h`` is ``h ⊙ ∂target/∂h`` (Gradient×Input under modified gradients). A rule
set is one frozen :class:`RuleSet`: the gradient factors of queries, keys and values, the split of a
gated product, and how normalisation, element-wise activations, logit soft-caps and MoE routers are
treated. The hooks (:mod:`cage_lens.core.realise`) and the closed-form graph edges
(:mod:`cage_lens.circuit.closed_form`) both read the same object; the autograd pieces that apply the
factors are :mod:`cage_lens.core.autograd`.

Built-in rule sets (looked up by name in :data:`BUILT_IN_RULES`; :data:`RULE_SETS` lists the names):

- ``"attnlrp"`` — AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-wise Relevance
  Propagation for Transformers", ICML 2024): identity rule on normalisation and element-wise
  non-linearities (Montavon et al. 2019; Ali et al. 2022 for the norm), uniform rule on the bilinear
  products of attention (q·k: ¼ to each of q and k after the softmax's own gradient, P·v: ½ to v)
  and on the gated-MLP product (½ to each factor), router weights of a mixture of experts constant.
- ``"cplrp"`` — CP-LRP (Ali et al., "XAI for Transformers: Better Explanations through Conservative
  Propagation", ICML 2022): identity rule on norms and activations, q and k detached (no relevance
  through the softmax), the gate of a gated MLP detached, routers constant. Conserves relevance
  exactly on a bias-free model.
- ``"gxi"`` — plain Gradient×Input (Shrikumar et al. 2016; Bach et al. 2015's LRP-0 on linear
  layers): no modified gradient anywhere.

A course or a study can define its own variant and get every view of it::

    uniform = cage_lens.RuleSet("uniform1", q=1, k=1, v=1, gate=0.5, up=0.5)
    cage_lens.attribute(model, prompt, rules=uniform)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from cage_lens.errors import InputError

__all__ = ["RuleSet", "RULE_SETS", "BUILT_IN_RULES", "ATTNLRP", "CPLRP", "GXI", "resolve_rules"]

#: the built-in rule sets by lower-case name, filled below: a RuleSet under one of these names must
#: hold exactly its values (a result labelled "attnlrp" is AttnLRP; docs/rules.md#rule-sets)
_RESERVED: dict[str, "RuleSet"] = {}

_NORM_RULES = ("identity", "gradient")
_ACTIVATION_RULES = ("identity", "gradient")
_SOFTCAP_RULES = ("identity", "gradient")
_ROUTER_RULES = ("constant", "gradient")


@dataclass(frozen=True)
class RuleSet:
    """Every choice an LRP rule set makes, as data (see docs/rules.md#rule-sets).

    Attributes:
        name: how results are labelled (``Attribution.rules``).
        q, k, v: gradient factors on queries, keys and values (``0`` detaches). The uniform rule on
            the bilinear product ``q·k`` gives ``½`` of the score relevance to each side, after the
            softmax's own gradient; AttnLRP writes it as ¼ because the score relevance is further
            halved between the two products of attention (Achtibat et al. 2024, Prop. 3.3).
        gate, up: share of a gated product ``act(gate) · up`` sent to each factor (gated MLPs and
            mixture-of-experts experts); ``gate=0`` detaches the gate (CP-LRP).
        norm: ``"identity"`` treats the scale of every normalisation (LayerNorm, RMSNorm — pre-,
            post-, sandwich and q/k norms) as a constant; ``"gradient"`` keeps its gradient.
        activation: ``"identity"`` sends ``grad · post/pre`` through element-wise non-linearities
            (GELU, SiLU, ReLU …); ``"gradient"`` keeps their derivative.
        softcap: the same choice for logit soft-capping ``c·tanh(x/c)`` (Gemma-2's attention scores
            and final logits).
        router: ``"constant"`` detaches the routing weights of a mixture of experts.

    The softmax of attention always keeps its plain gradient (both AttnLRP and CP-LRP do).
    """

    name: str
    q: float = 1.0
    k: float = 1.0
    v: float = 1.0
    gate: float = 1.0
    up: float = 1.0
    norm: str = "identity"
    activation: str = "identity"
    softcap: str = "identity"
    router: str = "constant"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"a RuleSet needs a non-empty name, got {self.name!r}")
        for factor in ("q", "k", "v", "gate", "up"):
            value = getattr(self, factor)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"RuleSet {self.name!r}: {factor} must be a finite number, got {value!r}")
            object.__setattr__(self, factor, float(value))
        for option, allowed in (("norm", _NORM_RULES), ("activation", _ACTIVATION_RULES),
                                ("softcap", _SOFTCAP_RULES), ("router", _ROUTER_RULES)):
            if getattr(self, option) not in allowed:
                raise InputError(
                    f"RuleSet {self.name!r}: {option} must be one of {', '.join(allowed)}, got {getattr(self, option)!r}"
                )
        self._check_not_impersonating()

    def _check_not_impersonating(self) -> None:
        built_in = _RESERVED.get(self.name.lower())
        if built_in is None:
            return
        differ = [f"{f.name}={getattr(self, f.name)!r} (built-in {getattr(built_in, f.name)!r})"
                  for f in fields(self) if f.name != "name" and getattr(self, f.name) != getattr(built_in, f.name)]
        if differ:
            raise InputError(
                f"RuleSet {self.name!r} is not the built-in {built_in.name!r}: {', '.join(differ)}. Give a custom rule "
                f"set a name of its own (e.g. RuleSet('{self.name}-custom', ...)), so that results and their "
                "provenance cannot mistake it for the built-in"
            )

    @property
    def is_plain_gradient(self) -> bool:
        """True when the rule set modifies nothing (plain Gradient×Input)."""
        return (
            (self.q, self.k, self.v, self.gate, self.up) == (1.0, 1.0, 1.0, 1.0, 1.0)
            and (self.norm, self.activation, self.softcap, self.router) == ("gradient",) * 4
        )

    @property
    def freezes_every_nonlinearity(self) -> bool:
        """True when the backward pass sees a network that is affine in its inputs and biases (q, k
        and gates detached, every scale and ratio constant): relevance is then conserved exactly up
        to what the biases absorb. CP-LRP is such a rule set; the completeness certificate uses it."""
        return (
            self.q == 0.0 and self.k == 0.0 and self.gate == 0.0
            and (self.norm, self.activation, self.router) == ("identity", "identity", "constant")
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RuleSet":
        """The rule set with these values (every field checked; a built-in name must carry the built-in's values)."""
        if not isinstance(data, dict):
            raise InputError(f"a RuleSet is stored as a mapping of its fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown RuleSet fields {unknown}; fields are {sorted(known)}")
        if "name" not in data:
            raise InputError("a stored RuleSet has no name")
        return cls(**data)


ATTNLRP = RuleSet("attnlrp", q=0.25, k=0.25, v=0.5, gate=0.5, up=0.5)
CPLRP = RuleSet("cplrp", q=0.0, k=0.0, v=1.0, gate=0.0, up=1.0)
GXI = RuleSet("gxi", norm="gradient", activation="gradient", softcap="gradient", router="gradient")

#: the built-in rule sets by name
BUILT_IN_RULES: dict[str, RuleSet] = {r.name: r for r in (ATTNLRP, CPLRP, GXI)}
_RESERVED.update(BUILT_IN_RULES)
#: their names (what ``rules=`` accepts as a string)
RULE_SETS: tuple[str, ...] = tuple(BUILT_IN_RULES)


def resolve_rules(rules: "str | RuleSet") -> RuleSet:
    """A :class:`RuleSet` from a built-in name (case-insensitive) or a RuleSet itself."""
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str) and rules.lower() in BUILT_IN_RULES:
        return BUILT_IN_RULES[rules.lower()]
    raise InputError(
        f"unknown rule set {rules!r}; choose one of {', '.join(RULE_SETS)} or pass a cage_lens.RuleSet"
    )
