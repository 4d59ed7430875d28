"""LRP rule sets as data, and the autograd pieces that realise them (see docs/rules.md).

Every rule keeps forward values bit-identical and only changes local gradients, so the relevance of
any hooked activation ``h`` is ``h ⊙ ∂target/∂h`` (Gradient×Input under modified gradients). A rule
set is one frozen :class:`RuleSet`: the gradient factors of queries, keys and values, the split of a
gated product, and how normalisation, element-wise activations, logit soft-caps and MoE routers are
treated. The hooks (:mod:`cage_lens.realise`) and the closed-form graph edges
(:mod:`cage_lens.graph.closed_form`) both read the same object.

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

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import torch

from cage_lens.errors import InputError

__all__ = ["RuleSet", "RULE_SETS", "BUILT_IN_RULES", "ATTNLRP", "CPLRP", "GXI", "resolve_rules", "lrp", "rule_hooks"]

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown RuleSet fields {unknown}; fields are {sorted(known)}")
        return cls(**data)


ATTNLRP = RuleSet("attnlrp", q=0.25, k=0.25, v=0.5, gate=0.5, up=0.5)
CPLRP = RuleSet("cplrp", q=0.0, k=0.0, v=1.0, gate=0.0, up=1.0)
GXI = RuleSet("gxi", norm="gradient", activation="gradient", softcap="gradient", router="gradient")

#: the built-in rule sets by name
BUILT_IN_RULES: dict[str, RuleSet] = {r.name: r for r in (ATTNLRP, CPLRP, GXI)}
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


# ---------------------------------------------------------------------------- autograd pieces
def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den`` is 0. Used for the identity rule's ``post/pre``: where the
    input is exactly 0 its relevance ``pre · grad`` is 0 whatever the factor (LXT adds 1e-10 to the
    denominator instead; the two agree to ~1e-10 relative and this one keeps conservation exact).
    Forward values reaching here are finite (the engine checks), so the only non-finite quotients
    are those divisions by 0."""
    return (num / den).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


class ScaleGradient(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``factor`` (a number or a tensor broadcasting
    against the gradient). The uniform rule on a bilinear product."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class ElementwiseIdentity(torch.autograd.Function):
    """Forward returns ``post`` untouched (as a view); backward sends ``factor · grad · post/pre`` to
    ``pre`` and nothing to ``post``'s own history: the identity rule of an element-wise map
    ``post = φ(pre)`` — and of RMSNorm with its scale held constant, which is diagonal with
    ``∂post_k/∂pre_k = post_k/pre_k``."""

    @staticmethod
    def forward(ctx, pre, post, factor=1.0):
        ctx.save_for_backward(safe_ratio(post, pre))
        ctx.factor = factor
        return post.view_as(post)

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return grad * ratio * ctx.factor, None, None


class CenteredIdentity(torch.autograd.Function):
    """LayerNorm ``post = w ⊙ (x − mean x)/σ + b`` with ``σ`` held constant: forward returns
    ``post``; backward sends ``C (f ⊙ grad)`` to ``x`` with ``f = (post − b)/(x − mean x) = w/σ``
    and ``C`` the centring map (symmetric), i.e. the exact gradient of the normalisation with its
    scale detached (Ali et al. 2022)."""

    @staticmethod
    def forward(ctx, x, post, bias):
        centred = x - x.mean(-1, keepdim=True)
        shifted = post if bias is None else post - bias
        ctx.save_for_backward(safe_ratio(shifted, centred))
        return post.view_as(post)

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        scaled = grad * factor
        return scaled - scaled.mean(-1, keepdim=True), None, None


class GatedProduct(torch.autograd.Function):
    """``post = act(gate) · up`` (plus, on some TL components, a bias added after the product).
    Backward: ``gate_weight`` of the product's relevance to the gate branch (through the identity
    rule on ``act``, or its derivative under the gradient rule) and ``up_weight`` to the linear
    branch (Achtibat et al. 2024, uniform rule on the product)."""

    @staticmethod
    def forward(ctx, gate, up, post, act, act_grad, gate_weight, up_weight):
        # the two local factors, ready for the backward (two tensors kept instead of three)
        to_gate = up * act_grad * gate_weight if gate_weight else None
        to_up = act * up_weight if up_weight else None
        ctx.save_for_backward(to_gate, to_up)
        return post.view_as(post)

    @staticmethod
    def backward(ctx, grad):
        to_gate, to_up = ctx.saved_tensors
        grad_gate = None if to_gate is None else grad * to_gate
        grad_up = None if to_up is None else grad * to_up
        return grad_gate, grad_up, None, None, None, None, None


class RoutedGradient(torch.autograd.Function):
    """Forward returns ``value`` untouched (as a view); backward sends ``grad · factor`` to ``source``
    instead of to ``value``'s own history. The identity rule of an element-wise map whose input is
    not at hand as a tensor of the forward (a soft-capped score: ``value = c·tanh(source/c)`` with
    ``source`` recomputed from q and k)."""

    @staticmethod
    def forward(ctx, value, source, factor):
        ctx.save_for_backward(factor)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        return None, grad * factor, None


# ---------------------------------------------------------------------------- public entry points
def rule_hooks(model, rules: "str | RuleSet" = "attnlrp") -> list:
    """The ``(hook_name, hook_fn)`` list realising a rule set on ``model``, for ``model.hooks(...)``.

    Prefer :func:`lrp`, which also covers rules that live on modules without a hook point (fused
    mixture-of-experts kernels) and checks the model first; this list raises
    :class:`~cage_lens.UnsupportedModelError` for such models."""
    from cage_lens.adapter import adapt
    from cage_lens.realise import realise

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
    from cage_lens import engine
    from cage_lens.adapter import adapt

    adapter = adapt(model)
    rule_set = resolve_rules(rules)
    engine.certify_or_warn(adapter, strict)
    with engine.rules_active(adapter, rule_set):
        yield model
