"""From a :class:`~cage_lens.core.rulesets.RuleSet` and a model's structure sites to hooks
(layer 6 of :mod:`cage_lens.core`; docs/rules.md).

``realise(adapter, rule_set)`` returns the hooks that put the rule set on one model: hook-point hooks
(``PointHook``, TL-native) wherever a hook point exists, module forward hooks (``ModuleHook``) only
where none does (fused mixture-of-experts kernels, the final unembedding before a logit soft-cap).
Every call builds fresh closures, so the little state the rules keep between two hook points of one
forward (a norm's input until its output, an MLP's pre-activation until its product) belongs to that
call; the engine makes the hooks act only in the thread that installed them.

A rule that replaces a tensor's gradient takes the tensor *detached* as its forward value, so the
autograd graph of the original computation (which the rule bypasses) is freed at once instead of
being kept until the backward: memory stays that of a plain backward.

Per structure (docs/rules.md#per-structure-rules):

- normalisation (every norm module, q/k norms included): ``norm="identity"`` holds the scale
  constant — the scale hook is detached (HookedTransformer) or the norm's output gets the gradient of
  the scale-frozen map (bridges, whose native norms cannot be edited at ``hook_scale`` without changing
  forward values);
- attention: the gradients at ``hook_q``, ``hook_k``, ``hook_v`` are multiplied by ``q``, ``k``,
  ``v`` (0 detaches); a soft-cap on the scores gets the identity rule by routing the gradient of the
  capped scores through ``(post/pre) · pre`` recomputed from the rotated queries and keys;
- plain MLP: identity rule ``grad · post/pre`` through the activation;
- gated MLP and each expert of a mixture of experts: ``gate``/``up`` shares of the product, identity
  rule (or the derivative) through the activation; router weights detached (``router="constant"``);
- final logit soft-cap: identity rule at the unembedding output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cage_lens.core.adapter import MLPSite, ModelAdapter
from cage_lens.core.autograd import (
    CenteredIdentity, ElementwiseIdentity, GatedProduct, RoutedGradient, ScaleGradient, safe_ratio,
)
from cage_lens.core.hooks import ModuleHook, ModulePreHook, PointHook
from cage_lens.core.rulesets import RuleSet
from cage_lens.errors import UnsupportedModelError

__all__ = ["Realisation", "realise"]


@dataclass
class Realisation:
    """The hooks of one rule set on one model, in installation order."""

    rule_set: RuleSet
    hooks: list = field(default_factory=list)

    def as_named_hooks(self) -> list:
        """``(hook_name, fn)`` pairs for ``model.hooks(fwd_hooks=...)``."""
        named = []
        for h in self.hooks:
            if isinstance(h, (ModuleHook, ModulePreHook)):
                raise UnsupportedModelError(
                    f"rule set {self.rule_set.name!r} needs a module-level hook on {type(h.module).__name__} "
                    "(no hook point there); use `with cage_lens.lrp(model, ...)` instead of rule_hooks"
                )
            named.append((h.point if isinstance(h.point, str) else h.point.name, h.fn))
        return named


# ---------------------------------------------------------------------------- small hook factories
def _detach(tensor, hook):
    return tensor.detach()


def _gradient_factor(factor: float):
    """Hook multiplying the gradient by ``factor`` (None when the factor is 1)."""
    if factor == 1.0:
        return None
    if factor == 0.0:
        return _detach

    def hook(tensor, hook):
        return ScaleGradient.apply(tensor, factor)
    return hook


class _Stash:
    """Per-call memory between two hook points of one forward (keyed by role)."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}

    def keep(self, key: str):
        def hook(tensor, hook):
            self.values[key] = tensor
        return hook

    def take(self, key: str) -> torch.Tensor:
        try:
            return self.values.pop(key)
        except KeyError:
            raise UnsupportedModelError(
                f"the hook recording {key!r} did not fire before it was needed; this model runs its "
                "layers in an order cage_lens does not know"
            ) from None


def _activation_derivative(act, gate: torch.Tensor) -> torch.Tensor:
    """d act/d gate, element-wise (plain gradient rule through the activation)."""
    with torch.enable_grad():
        x = gate.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(act(x).sum(), x)
    return d


# ---------------------------------------------------------------------------- per structure
def _norm_hooks(adapter: ModelAdapter) -> list:
    hooks: list = []
    for site in adapter.norm_sites:
        if site.scale_hook is not None:
            hooks.append(PointHook(site.scale_hook, _detach))
            continue
        stash = _Stash()

        def rule(out, hook, stash=stash, site=site):
            x = stash.take("x")
            if site.centred:
                bias = site.bias
                return CenteredIdentity.apply(x, out.detach(), None if bias is None else bias.detach())
            return ElementwiseIdentity.apply(x, out.detach())

        hooks += [PointHook(site.in_hook, stash.keep("x")), PointHook(site.out_hook, rule)]
    return hooks


def _softcap_hooks(adapter: ModelAdapter, layer: int, cap: float) -> list:
    """Identity rule on ``c·tanh(s/c)`` of the attention scores: the capped (and masked) scores keep
    their values; their gradient reaches q and k through ``r · s`` with ``r = post/pre`` held
    constant and ``s`` recomputed from the rotated queries and keys."""
    site = adapter.layer(layer)
    q_name, k_name = site.rot_q or site.q, site.rot_k or site.k
    if site.attn_scores is None:
        raise UnsupportedModelError(f"blocks.{layer}.attn soft-caps its scores but has no hook_attn_scores")
    scale = adapter.score_scale(layer)
    if scale is None:
        raise UnsupportedModelError(f"blocks.{layer}.attn soft-caps its scores but their scale cannot be read")
    stash = _Stash()

    def rule(post, hook):
        q, k = stash.take("q"), stash.take("k")  # [batch, pos, head, d_head] / [batch, pos, kv_head, d_head]
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2) if k.shape[2] != q.shape[2] else k
        pre = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        with torch.no_grad():
            ratio = (post / pre).nan_to_num_(nan=1.0)          # tanh(x)/x → 1 at x = 0
            ratio.masked_fill_(~(post.abs() <= cap), 0.0)     # masked entries (−inf, finfo.min)
        return RoutedGradient.apply(post.detach(), pre, ratio)

    return [PointHook(q_name, stash.keep("q")), PointHook(k_name, stash.keep("k")),
            PointHook(site.attn_scores, rule)]


def _mlp_hooks(mlp: MLPSite, rules: RuleSet) -> list:
    if mlp.kind == "plain":
        if rules.activation != "identity":
            return []
        stash = _Stash()

        def identity(post, hook):
            return ElementwiseIdentity.apply(stash.take("pre"), post.detach())
        return [PointHook(mlp.pre, stash.keep("pre")), PointHook(mlp.post, identity)]
    if mlp.kind == "gated":
        return _gated_hooks(mlp, rules)
    hooks: list = []
    if rules.router == "constant":
        hooks.append(PointHook(mlp.router, _detach))
    if mlp.fused_experts is not None:
        return hooks + _fused_expert_hooks(mlp, rules)
    for expert in mlp.experts:
        hooks += _gated_hooks(expert, rules)
    return hooks


def _gated_hooks(mlp: MLPSite, rules: RuleSet) -> list:
    if rules.activation == "gradient" and rules.gate == 1.0 and rules.up == 1.0:
        return []
    stash = _Stash()
    act_fn = mlp.act
    hooks = [PointHook(mlp.pre, stash.keep("gate")), PointHook(mlp.pre_linear, stash.keep("up"))]
    if isinstance(act_fn, torch.nn.Module):  # a Hugging Face activation module: read its own output
        def keep_act(module, args, kwargs, out):
            stash.values["act"] = out.detach()
        hooks.append(ModuleHook(act_fn, keep_act))

    def product(post, hook):
        gate, up = stash.take("gate"), stash.take("up")
        if "act" in stash.values:
            act = stash.take("act")
        else:
            with torch.no_grad():
                act = act_fn(gate)
        act_grad = None
        if rules.gate:  # the factors carry no history: the division would keep gate, act and the quotient alive
            with torch.no_grad():
                act_grad = safe_ratio(act, gate) if rules.activation == "identity" else _activation_derivative(act_fn, gate)
        return GatedProduct.apply(gate, up, post.detach(), act.detach(), act_grad, rules.gate, rules.up)

    return hooks + [PointHook(mlp.post, product)]


def _fused_expert_hooks(mlp: MLPSite, rules: RuleSet) -> list:
    """A fused experts module (no hook point inside): every path through it crosses exactly one
    product ``act(gate) · up``, so the ``up`` share is applied to the experts' output and the gate
    branch gets ``gate/up`` more at the activation."""
    if rules.activation == "gradient" and rules.gate == 1.0 and rules.up == 1.0:
        return []
    if rules.up == 0.0 and rules.gate != 0.0:
        raise UnsupportedModelError(
            f"rule set {rules.name!r} sends relevance only to the gate of {type(mlp.fused_experts).__name__}, "
            "a fused experts module whose linear branch has no hook point; use up > 0"
        )
    ratio = 0.0 if rules.up == 0.0 else rules.gate / rules.up

    def activation(module, args, kwargs, out):
        pre = args[0] if args else next(iter(kwargs.values()))
        if ratio == 0.0:
            return out.detach()
        if rules.activation == "identity":
            return ElementwiseIdentity.apply(pre, out.detach(), ratio)
        return ScaleGradient.apply(out, ratio) if ratio != 1.0 else None

    def output(module, args, kwargs, out):
        if rules.up == 1.0:
            return None
        return ScaleGradient.apply(out, rules.up)

    return [ModuleHook(mlp.fused_act, activation), ModuleHook(mlp.fused_experts, output)]


def _logit_softcap_hooks(adapter: ModelAdapter, cap: float) -> list:
    """Identity rule on the final ``c·tanh(u/c)``: the unembedding output ``u`` gets its gradient
    multiplied by ``(post/u) / tanh'(u/c)`` so that the cap passes ``grad · post/u`` (computed in
    float64; ``tanh' = 1/cosh²`` stays representable up to |u/c| ≈ 350)."""

    def rule(module, args, kwargs, u):
        x = u.detach().double() / cap
        post_over_u = torch.where(x == 0, torch.ones_like(x), torch.tanh(x) / torch.where(x == 0, torch.ones_like(x), x))
        factor = (post_over_u * torch.cosh(x).pow(2)).to(u.dtype)
        return ScaleGradient.apply(u, factor)

    return [ModuleHook(adapter.model.unembed, rule)]


# ---------------------------------------------------------------------------- the rule set on a model
def realise(adapter: ModelAdapter, rules: RuleSet) -> Realisation:
    """The hooks that put ``rules`` on ``adapter.model`` (fresh per-call state)."""
    out = Realisation(rules)
    if rules.is_plain_gradient:
        return out
    if rules.norm == "identity":
        out.hooks += _norm_hooks(adapter)
    for site in adapter.layers:
        for name, factor in ((site.q, rules.q), (site.k, rules.k), (site.v, rules.v)):
            fn = _gradient_factor(factor)
            if fn is not None:
                out.hooks.append(PointHook(name, fn))
        if site.attn_softcap and rules.softcap == "identity" and (rules.q or rules.k):
            out.hooks += _softcap_hooks(adapter, site.index, site.attn_softcap)
        if site.mlp is not None:
            out.hooks += _mlp_hooks(site.mlp, rules)
    if adapter.arch.logit_softcap and rules.softcap == "identity":
        out.hooks += _logit_softcap_hooks(adapter, adapter.arch.logit_softcap)
    return out
