"""The autograd pieces that realise LRP rules: forward values untouched, local gradients changed
(layer 2 of :mod:`cage_lens.core`; docs/rules.md#autograd-pieces).

Each piece is a small ``torch.autograd.Function`` whose forward returns its input (as a view) and
whose backward applies one rule factor. :mod:`cage_lens.core.realise` places them on a model's hook
points according to a :class:`~cage_lens.core.rulesets.RuleSet`.
"""

from __future__ import annotations

import torch

__all__ = ["safe_ratio", "ScaleGradient", "ElementwiseIdentity", "CenteredIdentity", "GatedProduct", "RoutedGradient"]


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
    ``∂post_k/∂pre_k = post_k/pre_k``.

    ``pre`` and ``post`` themselves are saved and the ratio is formed in the backward (the same
    operations, so the same values): both are tensors autograd keeps anyway (the residual stream a
    norm reads, the input the next linear layer saves), where a saved ratio would be one more
    ``[pos, d]`` tensor per norm until the backward (docs/rules.md#memory)."""

    @staticmethod
    def forward(ctx, pre, post, factor=1.0):
        ctx.save_for_backward(pre, post)
        ctx.factor = factor
        return post.view_as(post)

    @staticmethod
    def backward(ctx, grad):
        pre, post = ctx.saved_tensors
        return grad * safe_ratio(post, pre) * ctx.factor, None, None


class CenteredIdentity(torch.autograd.Function):
    """LayerNorm ``post = w ⊙ (x − mean x)/σ + b`` with ``σ`` held constant: forward returns
    ``post``; backward sends ``C (f ⊙ grad)`` to ``x`` with ``f = (post − b)/(x − mean x) = w/σ``
    and ``C`` the centring map (symmetric), i.e. the exact gradient of the normalisation with its
    scale detached (Ali et al. 2022). As :class:`ElementwiseIdentity`, ``f`` is formed in the backward
    from the saved ``x`` and ``post``."""

    @staticmethod
    def forward(ctx, x, post, bias):
        ctx.save_for_backward(x, post, bias)
        return post.view_as(post)

    @staticmethod
    def backward(ctx, grad):
        x, post, bias = ctx.saved_tensors
        centred = x - x.mean(-1, keepdim=True)
        shifted = post if bias is None else post - bias
        scaled = grad * safe_ratio(shifted, centred)
        return scaled - scaled.mean(-1, keepdim=True), None, None


class GatedProduct(torch.autograd.Function):
    """``post = act(gate) · up`` (plus, on some TL components, a bias added after the product).
    Backward: ``gate_weight`` of the product's relevance to the gate branch (through the identity
    rule on ``act``, or its derivative under the gradient rule) and ``up_weight`` to the linear
    branch (Achtibat et al. 2024, uniform rule on the product).

    ``act`` and ``act_grad`` must come without autograd history (an edge from them into the forward's
    graph would keep that graph alive until the backward)."""

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


