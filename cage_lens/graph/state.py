"""One forward under the rules and one backward: everything both edge methods need (docs/graphs.md#state).

:func:`capture_state` records every residual state with its gradient, each layer's attention
internals (queries and keys as they enter the scores, values, head outputs and their gradients)
and, where asked, MLP neurons; then the bias parts of the affine maps the closed form splits off.
With ``low_memory`` the backward is done block by block (one layer's autograd graph alive at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int

from cage_lens import engine
from cage_lens.adapter import ModelAdapter
from cage_lens.engine import ModulePreHook, PointHook
from cage_lens.errors import UnsupportedModelError
from cage_lens.rules import RuleSet, resolve_rules
from cage_lens.targets import Target

__all__ = ["AttentionState", "MLPState", "BranchState", "ForwardState", "capture_state", "StopForward", "stop_after"]


@dataclass
class AttentionState:
    """What the closed form needs from one attention layer (batch row 0, rotary already applied).

    ``g_out`` is the gradient at the attention sublayer's contribution to the residual (equal to the
    gradient at resid_mid, or resid_post in attention-only and parallel blocks)."""

    x: Float[torch.Tensor, "pos d_model"]          # resid_pre
    g_out: Float[torch.Tensor, "pos d_model"]
    q: Float[torch.Tensor, "pos head d_head"]
    k: Float[torch.Tensor, "pos kv_head d_head"]
    v: Float[torch.Tensor, "pos kv_head d_head"]
    z: Float[torch.Tensor, "pos head d_head"]
    g_z: Float[torch.Tensor, "pos head d_head"]
    q0: Float[torch.Tensor, "pos head d_head"]     # bias-free parts (times ρ under the gradient norm rule)
    k0: Float[torch.Tensor, "pos kv_head d_head"]
    v0: Float[torch.Tensor, "pos kv_head d_head"]
    scale: float = 1.0                             # factor on q·k in the scores
    softcap: float | None = None


@dataclass
class MLPState:
    """Per token and neuron: relevance ``post ⊙ ∂target/∂post`` and the edge from resid_mid into it."""

    relevance: Float[torch.Tensor, "pos d_mlp"]
    incoming: Float[torch.Tensor, "pos d_mlp"]
    g_post: Float[torch.Tensor, "pos d_mlp"]


@dataclass
class BranchState:
    """The MLP branch of a parallel block: ``diagonal[j] = Σ_k x_jk ∂⟨mlp_out_j, g_j⟩/∂x_jk``, the
    Gradient×Input of resid_pre through that branch alone."""

    diagonal: Float[torch.Tensor, "pos"]


@dataclass
class ForwardState:
    """Target value, every residual state with its gradient, and per-layer attention internals."""

    value: float
    tokens: Int[torch.Tensor, "pos"]
    position: int
    target: Target
    rules: RuleSet
    resid: dict[str, tuple[torch.Tensor, torch.Tensor]]   # hook name -> (h [pos, d], g [pos, d])
    layers: list[AttentionState]
    mlps: list[MLPState] = field(default_factory=list)
    branches: list[BranchState] = field(default_factory=list)

    def relevance(self, hook: str) -> Float[torch.Tensor, "pos"]:
        h, g = self.resid[hook]
        return (h * g).sum(-1)


# ---------------------------------------------------------------------------- recording
def _mlp_input_name(layer: int) -> str:
    return f"blocks.{layer}.mlp:input"


class _Recorder:
    """Records hook-point outputs and (parallel blocks) the MLP's input as a fresh view, so that
    its gradient is the MLP branch's alone even when one norm output feeds both branches (GPT-J)."""

    def __init__(self, roots: Sequence[str] = ()):
        self.tensors: dict[str, torch.Tensor] = {}
        self.roots = set(roots)

    def point(self, name: str) -> Callable:
        def hook(tensor, hook):
            if name in self.roots:
                tensor = tensor.detach().requires_grad_(True)
            self.tensors[name] = tensor
            return tensor
        return hook

    def module_input(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            if args:
                x = args[0].view_as(args[0])
                self.tensors[name] = x
                return (x,) + tuple(args[1:]), kwargs
            key = next(iter(kwargs))
            x = kwargs[key].view_as(kwargs[key])
            self.tensors[name] = x
            return args, {**kwargs, key: x}
        return hook

    def hooks(self, adapter: ModelAdapter, names: Sequence[str]) -> list:
        out = []
        for name in names:
            if name.endswith(":input"):
                layer = int(name.split(".")[1])
                out.append(ModulePreHook(adapter.model.blocks[layer].mlp, self.module_input(name)))
            else:
                out.append(PointHook(name, self.point(name)))
        return out


def _mlp_inputs(adapter: ModelAdapter, layer: int) -> tuple[str, ...]:
    """The pre-activation hooks feeding each MLP neuron (gate and linear branch when gated)."""
    mlp = adapter.layer(layer).mlp
    return tuple(n for n in (mlp.pre, mlp.pre_linear) if n)


def _attention_names(adapter: ModelAdapter, layer: int) -> list[str]:
    site = adapter.layer(layer)
    names = [site.q, site.k, site.v, site.z]
    return names + [n for n in (site.rot_q, site.rot_k) if n]


def _record_names(adapter: ModelAdapter, resid_names: Sequence[str], neurons: bool) -> list[str]:
    names = list(resid_names)
    for layer in range(adapter.arch.n_layers):
        names += _attention_names(adapter, layer)
        if adapter.arch.parallel:
            names.append(_mlp_input_name(layer))
        if neurons:
            names += [*_mlp_inputs(adapter, layer), adapter.layer(layer).mlp.post]
    return list(dict.fromkeys(names))


def _resid_names(adapter: ModelAdapter) -> list[str]:
    """Residual states and sublayer contributions whose values and gradients are recorded."""
    names = []
    for site in adapter.layers:
        names += [site.resid_pre, site.attn_out]
        if adapter.arch.parallel:
            names.append(site.mlp_out)
        names.append(site.resid_post)
    return list(dict.fromkeys(names))


def _wrt(adapter: ModelAdapter, resid_names: Sequence[str], neurons: bool) -> list[str]:
    names = list(resid_names) + [adapter.layer(l).z for l in range(adapter.arch.n_layers)]
    if adapter.arch.parallel:
        names += [_mlp_input_name(l) for l in range(adapter.arch.n_layers)]
    if neurons:
        names += [n for l in range(adapter.arch.n_layers) for n in (*_mlp_inputs(adapter, l), adapter.layer(l).mlp.post)]
    return names


class StopForward(Exception):
    """Raised once the needed state is recorded: later layers are not needed."""


def stop_after(name: str, captured: dict) -> PointHook:
    def grab(tensor, hook):
        captured["h"] = tensor
        raise StopForward
    return PointHook(name, grab)


def _checked_value(target: Target, logits: torch.Tensor, position: int) -> torch.Tensor:
    return engine.check_finite(target(logits[:, position]), "the target value")


# ---------------------------------------------------------------------------- one pass
def _one_pass_gradients(adapter, tokens, position, target, rules, names, wrt):
    """One forward under the rules and one backward through the whole model."""
    rec = _Recorder(roots=[names[0]])
    with engine.rules_active(adapter, rules), engine.installed(adapter, rec.hooks(adapter, names)):
        value = _checked_value(target, adapter.model(tokens), position)
        grads = engine.gradients(value.sum(), {n: rec.tensors[n] for n in wrt if n in rec.tensors})
    return value, rec.tensors, grads


def _grad_from(name: str, leaves: dict) -> Callable:
    """Hook that switches autograd on from this point of the forward and re-roots the state as a leaf."""
    def hook(tensor, hook):
        torch.set_grad_enabled(True)
        leaf = tensor.detach().requires_grad_(True)
        leaves[name] = leaf
        return leaf
    return hook


def _run_from(adapter: ModelAdapter, tokens: torch.Tensor, layer: int, resid: torch.Tensor):
    """Forward pass that runs block ``layer`` on ``resid``: a HookedTransformer starts there
    (``start_at_layer``); a bridge re-runs from the tokens (its blocks need HF's own inputs)."""
    if adapter.arch.is_bridge:
        return adapter.model(tokens)
    return adapter.model(resid, start_at_layer=layer)


def _layerwise_gradients(adapter, tokens, position, target, rules, names, wrt):
    """The same gradients with one layer's autograd graph alive at a time: a no-grad forward records
    the activations, then the head and each block from the top are re-run from their recorded input,
    with autograd switched on for that block alone (memory O(one layer); time about two forwards on
    a HookedTransformer, O(layers²) block forwards on a bridge)."""
    model, arch = adapter.model, adapter.arch
    rec = _Recorder()
    with torch.no_grad(), engine.rules_active(adapter, rules), engine.installed(adapter, rec.hooks(adapter, names)):
        value = _checked_value(target, model(tokens), position)
    grads: dict[str, torch.Tensor] = {}
    last = adapter.block(arch.n_layers - 1, "hook_resid_post")
    grads[last] = _head_gradient(adapter, tokens, position, target, rules, rec.tensors[last])
    for layer in reversed(range(arch.n_layers)):
        pre, post = adapter.block(layer, "hook_resid_pre"), adapter.block(layer, "hook_resid_post")
        inner = [n for n in wrt if n.startswith(f"blocks.{layer}.") and n not in (pre, post)]
        local, leaves, captured = _Recorder(), {}, {}
        hooks = [PointHook(pre, _grad_from(pre, leaves))] + local.hooks(adapter, inner) + [stop_after(post, captured)]
        with torch.no_grad(), engine.rules_active(adapter, rules):
            try:
                with engine.installed(adapter, hooks):
                    _run_from(adapter, tokens, layer, rec.tensors[pre])
            except StopForward:
                pass
            with torch.enable_grad():
                objective = (captured["h"] * grads[post]).sum()
                found = engine.gradients(objective, {pre: leaves[pre], **{n: local.tensors[n] for n in inner}})
        grads.update(found)
        if layer > 0:
            grads[adapter.block(layer - 1, "hook_resid_post")] = grads[pre]
    return value, rec.tensors, grads


def _head_gradient(adapter, tokens, position, target, rules, resid_last: torch.Tensor) -> torch.Tensor:
    """∂target/∂(last resid_post) under the rules, differentiating only the final norm and unembed."""
    model, last = adapter.model, adapter.block(adapter.arch.n_layers - 1, "hook_resid_post")
    if not adapter.arch.is_bridge:
        leaf = resid_last.detach().requires_grad_(True)
        with torch.enable_grad(), engine.rules_active(adapter, rules):
            logits = model(leaf, start_at_layer=adapter.arch.n_layers)
            return torch.autograd.grad(_checked_value(target, logits, position).sum(), leaf)[0]
    leaves: dict = {}
    with torch.no_grad(), engine.rules_active(adapter, rules), engine.installed(adapter, [PointHook(last, _grad_from(last, leaves))]):
        logits = model(tokens)
        with torch.enable_grad():
            return torch.autograd.grad(_checked_value(target, logits, position).sum(), leaves[last])[0]


# ---------------------------------------------------------------------------- bias parts
@torch.no_grad()
def _bias_parts(adapter: ModelAdapter, n_pos: int) -> list[dict[str, torch.Tensor]]:
    """q, k, v (as they enter the scores), the MLP pre-activations and a parallel block's MLP input,
    of every layer, for an all-zero residual input at each of ``n_pos`` positions: the constant (bias)
    part of the affine maps the closed form splits, rotary included (LN(0) = b, RMS(0) = 0)."""
    arch, rec = adapter.arch, _Recorder()
    zero = lambda t, hook: torch.zeros_like(t)  # noqa: E731
    hooks: list = []
    names: list[str] = []
    for layer in range(arch.n_layers):
        site = adapter.layer(layer)
        hooks.append(PointHook(site.resid_pre, zero))
        layer_names = _attention_names(adapter, layer)
        if adapter.arch.parallel:
            layer_names.append(_mlp_input_name(layer))
        elif not arch.attn_only:  # on a bridge hook_resid_mid feeds only the MLP: exactly what is zeroed here
            hooks.append(PointHook(adapter.block(layer, "hook_resid_mid"), zero))
        if site.mlp is not None and site.mlp.kind != "moe":
            layer_names += list(_mlp_inputs(adapter, layer))
        names += layer_names
    with engine.installed(adapter, hooks + rec.hooks(adapter, names)):
        adapter.model(torch.zeros((1, n_pos), dtype=torch.long, device=adapter.device))
    return [{n[len(f"blocks.{layer}."):]: t[0] for n, t in rec.tensors.items() if n.startswith(f"blocks.{layer}.")}
            for layer in range(arch.n_layers)]


# ---------------------------------------------------------------------------- the state
def capture_state(adapter: ModelAdapter, tokens: Int[torch.Tensor, "pos"], position: int, target: Target,
                  rules: "str | RuleSet", low_memory: bool | None = None, neurons: bool = False) -> ForwardState:
    """One forward under ``rules`` and one backward: everything both edge methods need (MLP neuron
    activations and gradients too with ``neurons``). With ``low_memory`` (default: inputs over 1024
    tokens) the backward is done block by block. The caller certifies the model first."""
    arch = adapter.arch
    rules = resolve_rules(rules)
    resid_names = _resid_names(adapter)
    names = _record_names(adapter, resid_names, neurons)
    wrt = _wrt(adapter, resid_names, neurons)
    if low_memory is None:
        low_memory = tokens.shape[0] > 1024
    gradients = _layerwise_gradients if low_memory else _one_pass_gradients
    with engine.session(adapter):
        batch_tokens = tokens[None].to(adapter.device).clone()
        value, tensors, grads = gradients(adapter, batch_tokens, position, target, rules, names, wrt)
        biases = _bias_parts(adapter, tokens.shape[0])
    act = {n: t[0].detach() for n, t in tensors.items()}
    grad = {n: (torch.zeros_like(act[n]) if grads.get(n) is None else grads[n][0].detach()) for n in wrt if n in act}
    resid = {n: (act[n], grad[n]) for n in resid_names}
    for name in adapter.resid_hooks():
        if name.endswith("hook_resid_mid"):
            site = adapter.layer(int(name.split(".")[1]))
            resid[name] = (act[site.resid_pre] + act[site.attn_out], grad[site.attn_out])
    layers = [_attention_state(adapter, layer, act, grad, biases[layer], rules) for layer in range(arch.n_layers)]
    mlps = [_mlp_state(adapter, layer, act, grad, biases[layer], rules) for layer in range(arch.n_layers)] if neurons else []
    branches = ([_branch_state(adapter, layer, act, grad, biases[layer], rules) for layer in range(arch.n_layers)]
                if arch.parallel else [])
    return ForwardState(
        value=float(value.detach()[0]), tokens=tokens, position=position, target=target, rules=rules,
        resid=resid, layers=layers, mlps=mlps, branches=branches,
    )


def _rho(adapter: ModelAdapter, layer: int, branch: str, x: torch.Tensor, rules: RuleSet) -> torch.Tensor:
    """``ρ = ε/σ²`` per token for the norm feeding ``branch`` under the gradient norm rule (1 when the
    scale is held constant, or when no norm feeds the branch): Gradient×Input of ``n(x) = C x/σ(x)``
    is ``(n(x) − b)·ρ`` (docs/graphs.md#gradient-rule)."""
    site = adapter.input_norm(layer, branch)
    one = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    if rules.norm == "identity" or site is None:
        return one
    centred = x - x.mean(-1, keepdim=True) if site.centred else x
    variance = centred.pow(2).mean(-1, keepdim=True)
    return site.eps / (variance + site.eps)


def _mlp_state(adapter, layer, act, grad, bias, rules) -> MLPState:
    """Neuron relevance and the neuron-input edges ``Σ_p ∂̃target/∂p_n · (p_n − p_n(0)) · ρ`` over the
    pre-activations p feeding neuron n: the Gradient×Input of resid_mid through the affine map
    resid_mid → p (norm scale held fixed; ρ under the gradient rule)."""
    site = adapter.layer(layer)
    mid = act[site.resid_pre] + act[site.attn_out]
    rho = _rho(adapter, layer, "mlp", mid, rules)
    inputs = _mlp_inputs(adapter, layer)
    incoming = sum(grad[n] * (act[n] - bias[n[len(f"blocks.{layer}."):]]) for n in inputs)
    post = site.mlp.post
    return MLPState(relevance=act[post] * grad[post], incoming=incoming * rho, g_post=grad[post])


def _branch_state(adapter, layer, act, grad, bias, rules) -> BranchState:
    site = adapter.layer(layer)
    name = _mlp_input_name(layer)
    rho = _rho(adapter, layer, "mlp", act[site.resid_pre], rules)
    linear = (act[name] - bias[name[len(f"blocks.{layer}."):]]) * rho
    return BranchState(diagonal=(linear * grad[name]).sum(-1))


def _attention_state(adapter, layer, act, grad, bias, rules) -> AttentionState:
    site = adapter.layer(layer)
    local = lambda name: name[len(f"blocks.{layer}."):]  # noqa: E731
    x = act[site.resid_pre]
    rho = _rho(adapter, layer, "attn", x, rules)[:, :, None]   # [pos, 1, 1]
    q_name, k_name = site.rot_q or site.q, site.rot_k or site.k
    if adapter.arch.positional == "rotary" and (site.rot_q is None or q_name not in act):
        raise UnsupportedModelError(
            f"method='fast' needs the rotated queries and keys of blocks.{layer}.attn, which this model does not "
            "expose (hook_rot_q/hook_rot_k); use method='autograd'"
        )
    q, k, v = act[q_name], act[k_name], act[site.v]
    q_bias, k_bias, v_bias = bias[local(q_name)], bias[local(k_name)], bias[local(site.v)]
    if adapter.arch.qk_norm and (rules.norm != "identity" or q_bias.abs().max() > 0 or k_bias.abs().max() > 0):
        raise UnsupportedModelError(
            "method='fast' needs the map resid → q, k to be linear; with q/k norms that holds only under the "
            "identity norm rule and without query/key biases; use method='autograd'"
        )
    scale = adapter.score_scale(layer)
    if scale is None:
        raise UnsupportedModelError(f"method='fast' cannot read the attention score scale of blocks.{layer}; "
                                    "use method='autograd'")
    return AttentionState(
        x=x, g_out=grad[site.attn_out], q=q, k=k, v=v, z=act[site.z], g_z=grad[site.z],
        q0=(q - q_bias) * rho, k0=(k - k_bias) * rho, v0=(v - v_bias) * rho,
        scale=scale, softcap=site.attn_softcap,
    )
