"""LRP rule sets as TransformerLens hooks (SPEC §2.3), in Gradient×Input form.

Every rule keeps forward values bit-identical and only changes local gradients, so the relevance of
any hooked activation ``h`` is ``h ⊙ ∂target/∂h``. Rule sets:

- ``"attnlrp"`` (Achtibat et al. 2024): identity rule on norms (scale detached) and element-wise
  non-linearities, uniform rule on the bilinear products of attention (q, k gradients ÷ 4, v ÷ 2;
  softmax keeps its plain gradient) and on the gated-MLP product (½ to each factor).
- ``"cplrp"`` (Ali et al. 2022): identity rule on norms and non-linearities, q and k detached (no
  relevance through the softmax), the gate of a gated MLP detached.
- ``"gxi"``: plain Gradient×Input, no hooks.

``lrp(model, rules)`` installs a rule set for the duration of a ``with`` block; any TL workflow
(``run_with_cache``, the user's own hooks, the user's own ``backward``) then runs under the rules.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from cage_lens.adapter import ModelAdapter, adapt
from cage_lens.errors import CageLensError

__all__ = ["RULE_SETS", "lrp", "rule_hooks", "check_rules"]

RULE_SETS = ("attnlrp", "cplrp", "gxi")

Hook = tuple[str, Callable]


# ---------------------------------------------------------------------------- autograd pieces
class _ScaleGradient(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``factor`` (the uniform rule: SPEC §2.3)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den`` is 0 (there ``num = act(0) = 0`` for every supported
    activation, so the relevance is 0 either way). LXT adds 1e-10 to ``den`` instead; the two agree
    to ~1e-10 relative and this one keeps conservation exact."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


class _ElementwiseIdentity(torch.autograd.Function):
    """Forward returns ``post = act(pre)`` untouched; backward sends ``grad · post/pre`` to ``pre``
    (identity rule: the relevance of each unit passes through the non-linearity unchanged)."""

    @staticmethod
    def forward(ctx, pre, post):
        ctx.save_for_backward(_safe_ratio(post, pre))
        return post.view_as(post)

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class _GatedProduct(torch.autograd.Function):
    """``post = act(gate) · up``. Backward: ``gate_weight`` of the relevance to the gate branch
    (through the identity rule on ``act``) and ``up_weight`` to the linear branch.
    AttnLRP: ½ / ½ (uniform rule); CP-LRP: 0 / 1 (gate detached)."""

    @staticmethod
    def forward(ctx, gate, up, post, act, gate_weight, up_weight):
        ctx.save_for_backward(gate, up, act)
        ctx.weights = (gate_weight, up_weight)
        return post.view_as(post)

    @staticmethod
    def backward(ctx, grad):
        gate, up, act = ctx.saved_tensors
        gate_weight, up_weight = ctx.weights
        grad_gate = grad * up * _safe_ratio(act, gate) * gate_weight if gate_weight else None
        grad_up = grad * act * up_weight if up_weight else None
        return grad_gate, grad_up, None, None, None, None


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


# ---------------------------------------------------------------------------- hook factories
def _detach(tensor, hook):
    return tensor.detach()


def _scale_gradient(factor: float):
    def hook(tensor, hook):
        return _ScaleGradient.apply(tensor, factor)
    return hook


def _mlp_hooks(adapter: ModelAdapter, layer: int, gate_weight: float, up_weight: float) -> list[Hook]:
    """Hooks for one MLP: remember the pre-activation(s), rewrite ``hook_post``'s backward."""
    arch = adapter.arch
    stash: dict[str, torch.Tensor] = {}

    def remember(key):
        def hook(tensor, hook):
            stash[key] = tensor
        return hook

    pre_name = adapter.mlp_hook(layer, "hook_pre")
    post_name = adapter.mlp_hook(layer, "hook_post")
    hooks: list[Hook] = [(pre_name, remember("pre"))]
    if arch.gated_mlp:
        act_fn = ACTIVATIONS[arch.act_fn]
        hooks.append((adapter.mlp_hook(layer, "hook_pre_linear"), remember("up")))

        def gated_post(tensor, hook):
            gate, up = stash.pop("pre"), stash.pop("up")
            with torch.no_grad():
                act = act_fn(gate)
            return _GatedProduct.apply(gate, up, tensor, act, gate_weight, up_weight)

        hooks.append((post_name, gated_post))
    else:

        def identity_post(tensor, hook):
            return _ElementwiseIdentity.apply(stash.pop("pre"), tensor)

        hooks.append((post_name, identity_post))
    return hooks


def _norm_hooks(adapter: ModelAdapter) -> list[Hook]:
    """Identity rule on normalisation layers: the scale is treated as a constant.

    Usually done by detaching ``hook_scale``. For RMSNorm on a bridge (see
    ``ModelAdapter.edits_norm_output``) the same gradient is produced at the norm output instead:
    with the scale constant, RMSNorm is diagonal, ``∂out_k/∂x_k = w_k/s = out_k/x_k``, which is
    exactly the element-wise identity rule."""
    if not adapter.edits_norm_output:
        return [(name, _detach) for name in adapter.norm_scale_hooks()]
    hooks: list[Hook] = []
    for prefix in adapter.norm_modules():
        stash: dict[str, torch.Tensor] = {}

        def remember(tensor, hook, stash=stash):
            stash["x"] = tensor

        def rule(tensor, hook, stash=stash):
            return _ElementwiseIdentity.apply(stash.pop("x"), tensor)

        hooks += [(f"{prefix}.hook_in", remember), (f"{prefix}.hook_out", rule)]
    return hooks


def rule_hooks(model, rules: str = "attnlrp") -> list[Hook]:
    """The ``(hook_name, hook_fn)`` list realising a rule set on ``model`` (for ``model.hooks``)."""
    rules = check_rules(rules)
    if rules == "gxi":
        return []
    adapter = adapt(model)
    arch = adapter.arch
    hooks: list[Hook] = _norm_hooks(adapter)
    for layer in range(arch.n_layers):
        if rules == "attnlrp":
            hooks += [
                (adapter.attn_hook(layer, "hook_q"), _scale_gradient(0.25)),
                (adapter.attn_hook(layer, "hook_k"), _scale_gradient(0.25)),
                (adapter.attn_hook(layer, "hook_v"), _scale_gradient(0.5)),
            ]
        else:  # cplrp
            hooks += [(adapter.attn_hook(layer, "hook_q"), _detach), (adapter.attn_hook(layer, "hook_k"), _detach)]
        if not arch.attn_only:
            gate_weight, up_weight = (0.5, 0.5) if rules == "attnlrp" else (0.0, 1.0)
            hooks += _mlp_hooks(adapter, layer, gate_weight, up_weight)
    return hooks


def check_rules(rules: str) -> str:
    if not isinstance(rules, str) or rules.lower() not in RULE_SETS:
        raise CageLensError(f"unknown rule set {rules!r}; choose one of {', '.join(RULE_SETS)}")
    return rules.lower()


@contextlib.contextmanager
def lrp(model, rules: str = "attnlrp") -> Iterator:
    """Run everything inside the ``with`` block under an LRP rule set.

    Forward values are unchanged; gradients follow the rules, so ``h * h.grad`` of any activation is
    its LRP relevance. Hooks are removed on exit, also after an exception::

        with cage_lens.lrp(model, "attnlrp"):
            logits, cache = model.run_with_cache(tokens)
    """
    adapter = adapt(model)
    adapter.fired_hooks  # validate the model before installing anything
    with model.hooks(fwd_hooks=rule_hooks(adapter, rules)):
        yield model
