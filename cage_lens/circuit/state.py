"""One forward under the rules and one backward: everything both edge methods need (docs/graphs.md#closed-form).

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

from cage_lens.core import engine
from cage_lens.core.adapter import ModelAdapter
from cage_lens.core.engine import Capture
from cage_lens.core.hooks import ModulePreHook, PointHook, installed, session
from cage_lens.core.hooks import fires as hook_fires
from cage_lens.core.rulesets import RuleSet, resolve_rules
from cage_lens.targets import Target

__all__ = ["AttentionState", "MLPState", "BranchState", "ForwardState", "capture_state", "StopForward", "stop_after"]


@dataclass
class AttentionState:
    """What the closed form needs from one attention layer (batch row 0, rotary already applied).

    ``g_out`` is the gradient at the attention sublayer's contribution to the residual (equal to the
    gradient at resid_mid, or resid_post in attention-only and parallel blocks)."""

    x: Float[torch.Tensor, "pos d_model"]          # resid_pre
    g_out: Float[torch.Tensor, "pos d_model"]
    v: Float[torch.Tensor, "pos kv_head d_head"]
    z: Float[torch.Tensor, "pos head d_head"]
    g_z: Float[torch.Tensor, "pos head d_head"]
    v0: Float[torch.Tensor, "pos kv_head d_head"]  # bias-free part (times ρ under the gradient norm rule)
    q: Float[torch.Tensor, "pos head d_head"] | None = None    # as they enter the scores (rotated)
    k: Float[torch.Tensor, "pos kv_head d_head"] | None = None
    q0: Float[torch.Tensor, "pos head d_head"] | None = None
    k0: Float[torch.Tensor, "pos kv_head d_head"] | None = None
    scale: float = 1.0                             # factor on q·k in the scores
    softcap: float | None = None
    scores: Float[torch.Tensor, "head pos pos"] | None = None   # q·k·scale when q, k are not observable
    pattern: Float[torch.Tensor, "head pos pos"] | None = None  # captured where a position bias (ALiBi) enters
    rho: Float[torch.Tensor, "pos"] | None = None
    problem: str | None = None                     # why the closed form cannot be used here


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


class _Recorder(Capture):
    """Records hook-point outputs (the engine's :class:`~cage_lens.core.engine.Capture`) and, for parallel
    blocks, the MLP's input as a fresh view, so that its gradient is the MLP branch's alone even when
    one norm output feeds both branches (GPT-J)."""

    def __init__(self, roots: Sequence[str] = ()):
        super().__init__((), roots)

    point = Capture.hook

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
                out.append(PointHook(name, self.point(name), first=adapter.is_stash_point(name)))
        return out


def _mlp_inputs(adapter: ModelAdapter, layer: int) -> tuple[str, ...]:
    """The pre-activation hooks feeding each MLP neuron (gate and linear branch when gated)."""
    mlp = adapter.layer(layer).mlp
    return tuple(n for n in (mlp.pre, mlp.pre_linear) if n)


def _attention_names(adapter: ModelAdapter, layer: int) -> list[str]:
    """Attention hooks recorded for the closed form: q, k, v, z, and how q and k enter the scores
    (rotated queries and keys where they are exposed, else the rotary tables, else the scores)."""
    site = adapter.layer(layer)

    def fires(name):
        return hook_fires(adapter, name)
    names = [site.q, site.k, site.v, site.z]
    if adapter.arch.positional == "rotary":
        if fires(site.rot_q) and fires(site.rot_k):
            names += [site.rot_q, site.rot_k]
        else:
            names += [n for n in (adapter.attn_hook(layer, "hook_cos"), adapter.attn_hook(layer, "hook_sin"),
                                  adapter.attn_hook(layer, "hook_attn_scores")) if fires(n)]
    elif adapter.arch.positional == "alibi":
        names += [n for n in (adapter.attn_hook(layer, "hook_pattern"),) if fires(n)]
    return names


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
    with engine.rules_active(adapter, rules), installed(adapter, rec.hooks(adapter, names)):
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
    with torch.no_grad(), engine.rules_active(adapter, rules), installed(adapter, rec.hooks(adapter, names)):
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
                with installed(adapter, hooks):
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
    with torch.no_grad(), engine.rules_active(adapter, rules), installed(adapter, [PointHook(last, _grad_from(last, leaves))]):
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
    with installed(adapter, hooks + rec.hooks(adapter, names)):
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
    with session(adapter):
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
    is ``(n(x) − b)·ρ`` (docs/graphs.md#gradient-rule-on-norms)."""
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


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention of GPT-NeoX/Llama) on the first ``cos.shape[-1]``
    dimensions of ``x [pos, head, d_head]``; ``cos``/``sin`` are ``[pos, rotary_dim]``."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], dim=-1)
    return torch.cat([rot * cos[:, None] + half * sin[:, None], rest], dim=-1)


def _expand_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    return t if t.shape[1] == n_heads else t.repeat_interleave(n_heads // t.shape[1], dim=1)


def _causal_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``q·k·scale`` per head ``[head, query, key]`` with the entries above the diagonal zeroed."""
    scores = torch.einsum("qhd,khd->hqk", q, _expand_heads(k, q.shape[1])) * scale
    return scores.tril()


def _queries_and_keys(adapter, layer, act, bias, rules):
    """(q, k, q_bias, k_bias) as they enter the scores, or None when the rotation is not observable;
    and a problem description when the closed form cannot cover this layer."""
    site, local = adapter.layer(layer), (lambda name: name[len(f"blocks.{layer}."):])
    if adapter.arch.positional != "rotary" or (site.rot_q in act and site.rot_k in act):
        q_name, k_name = (site.rot_q, site.rot_k) if adapter.arch.positional == "rotary" else (site.q, site.k)
        return act[q_name], act[k_name], bias[local(q_name)], bias[local(k_name)]
    cos, sin = act.get(adapter.attn_hook(layer, "hook_cos")), act.get(adapter.attn_hook(layer, "hook_sin"))
    scores = act.get(adapter.attn_hook(layer, "hook_attn_scores"))
    if cos is None or sin is None or scores is None:
        return None
    cos, sin = cos.reshape(-1, cos.shape[-1])[-act[site.q].shape[0]:], sin.reshape(-1, sin.shape[-1])[-act[site.q].shape[0]:]
    q, k = _rotate_half(act[site.q], cos, sin), _rotate_half(act[site.k], cos, sin)
    recomputed = _causal_scores(q, k, adapter.score_scale(layer))
    captured = scores.tril()
    if float((recomputed - captured).abs().max()) > 1e-5 * max(float(captured.abs().max()), 1e-30):
        return None  # not the rotary convention assumed here
    return q, k, _rotate_half(bias[local(site.q)], cos, sin), _rotate_half(bias[local(site.k)], cos, sin)


def _attention_state(adapter, layer, act, grad, bias, rules) -> AttentionState:
    site = adapter.layer(layer)
    local = lambda name: name[len(f"blocks.{layer}."):]  # noqa: E731
    x = act[site.resid_pre]
    rho = _rho(adapter, layer, "attn", x, rules)[:, 0]   # [pos]
    v = act[site.v]
    state = AttentionState(
        x=x, g_out=grad[site.attn_out], v=v, z=act[site.z], g_z=grad[site.z],
        v0=(v - bias[local(site.v)]) * rho[:, None, None], scale=adapter.score_scale(layer) or 1.0,
        softcap=site.attn_softcap, rho=rho,
    )
    state.problem = _fast_problem(adapter, layer, rules)
    if state.problem is not None:
        return state
    found = _queries_and_keys(adapter, layer, act, bias, rules)
    pattern_name = adapter.attn_hook(layer, "hook_pattern")
    if adapter.arch.positional == "alibi":
        if pattern_name not in act:
            state.problem = f"the attention pattern of blocks.{layer} (ALiBi) does not fire"
            return state
        state.pattern = act[pattern_name]
    if found is None:
        q_bias, k_bias = bias[local(site.q)], bias[local(site.k)]
        scores = act.get(adapter.attn_hook(layer, "hook_attn_scores"))
        if scores is None or site.attn_softcap or q_bias.abs().max() > 0 or k_bias.abs().max() > 0:
            state.problem = (f"the rotated queries and keys of blocks.{layer} are not observable and the scores alone "
                             "do not determine the edges here (query/key biases or a soft-cap)")
            return state
        state.scores = scores.tril()   # bias-free q, k: the scores are ⟨q, k⟩·scale
        return state
    q, k, q_bias, k_bias = found
    if adapter.arch.qk_norm and (rules.norm != "identity" or q_bias.abs().max() > 0 or k_bias.abs().max() > 0):
        state.problem = ("the map resid → q, k is linear with q/k norms only under the identity norm rule and "
                         "without query/key biases")
        return state
    state.q, state.k = q, k
    state.q0, state.k0 = (q - q_bias) * rho[:, None, None], (k - k_bias) * rho[:, None, None]
    return state


def _fast_problem(adapter: ModelAdapter, layer: int, rules: RuleSet) -> str | None:
    if adapter.score_scale(layer) is None:
        return f"the attention score scale of blocks.{layer} cannot be read"
    return None
