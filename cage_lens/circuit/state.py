"""One forward under the rules and one backward: everything both edge methods need (docs/graphs.md#closed-form).

:func:`capture_state` records every residual state with its gradient, each layer's attention
internals (queries and keys as they enter the scores, values, head outputs and their gradients)
and, where asked, MLP neurons; then the bias parts of the affine maps the closed form splits off.
With ``long_context`` the pass runs in the engine's long-context mode (blocks recomputed in the backward,
attention in row chunks: the memory of one layer; docs/long_context.md). Nothing is stored that can
be formed when it is needed: the bias-free parts ``q⁰, k⁰, v⁰`` and the state between attention and
MLP are computed from what is stored, when an edge asks for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int

from cage_lens.core import engine
from cage_lens.core.adapter import ModelAdapter, visible_keys
from cage_lens.core.engine import Capture
from cage_lens.core.hooks import ModulePreHook, PointHook, installed, session
from cage_lens.core.hooks import fires as hook_fires
from cage_lens.core.recompute import long_context as long_context_mode
from cage_lens.core.rulesets import RuleSet, resolve_rules
from cage_lens.targets import Target

__all__ = ["AttentionState", "MLPState", "BranchState", "ForwardState", "capture_state", "StopForward", "stop_after"]


@dataclass
class AttentionState:
    """What the closed form needs from one attention layer (batch row 0, rotary already applied).

    ``g_out`` is the gradient at the attention sublayer's contribution to the residual (equal to the
    gradient at resid_mid, or resid_post in attention-only and parallel blocks). The bias-free parts
    ``v0``, ``q0``, ``k0`` (times ρ under the gradient norm rule) are formed on access from the stored
    values and their constant parts ``*_bias`` (``[1, …]`` when the same at every position)."""

    x: Float[torch.Tensor, "pos d_model"]          # resid_pre
    g_out: Float[torch.Tensor, "pos d_model"]
    v: Float[torch.Tensor, "pos kv_head d_head"]
    z: Float[torch.Tensor, "pos head d_head"]
    g_z: Float[torch.Tensor, "pos head d_head"]
    v_bias: Float[torch.Tensor, "pos kv_head d_head"]
    rho: Float[torch.Tensor, "pos"]
    q: Float[torch.Tensor, "pos head d_head"] | None = None    # as they enter the scores (rotated)
    k: Float[torch.Tensor, "pos kv_head d_head"] | None = None
    q_bias: Float[torch.Tensor, "pos head d_head"] | None = None
    k_bias: Float[torch.Tensor, "pos kv_head d_head"] | None = None
    scale: float = 1.0                             # factor on q·k in the scores
    softcap: float | None = None
    window: int | None = None                      # sliding window: each query sees this many positions up to its own
    scores: Float[torch.Tensor, "head pos pos"] | None = None   # q·k·scale when q, k are not observable
    pattern: Float[torch.Tensor, "head pos pos"] | None = None  # captured where a position bias (ALiBi) enters
    problem: str | None = None                     # why the closed form cannot be used here
    plain: bool = False                            # no bias and ρ = 1: the bias-free parts are the values

    def _bias_free(self, t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return t if self.plain else (t - bias) * self.rho[:, None, None]

    @property
    def v0(self) -> Float[torch.Tensor, "pos kv_head d_head"]:
        return self._bias_free(self.v, self.v_bias)

    @property
    def q0(self) -> Float[torch.Tensor, "pos head d_head"] | None:
        return None if self.q is None else self._bias_free(self.q, self.q_bias)

    @property
    def k0(self) -> Float[torch.Tensor, "pos kv_head d_head"] | None:
        return None if self.k is None else self._bias_free(self.k, self.k_bias)


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


class Residuals(Mapping):
    """Residual hook name → ``(h [pos, d], g [pos, d])``; ``resid_mid`` is formed on access as
    ``resid_pre + attn_out`` with the gradient of ``attn_out`` (see :func:`cage_lens.core.engine.residual_state`),
    so a graph does not keep a second copy of every block's inner state."""

    def __init__(self, act: dict, grad: dict, mids: dict[str, tuple[str, str]]):
        self.stored = {n: (act[n], grad[n]) for n in act}
        self.mids = mids

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name in self.mids:
            (pre, _), (out, g_out) = self.stored[self.mids[name][0]], self.stored[self.mids[name][1]]
            return pre + out, g_out
        return self.stored[name]

    def __iter__(self):
        return iter([*self.stored, *self.mids])

    def __len__(self) -> int:
        return len(self.stored) + len(self.mids)


@dataclass
class ForwardState:
    """Target value, every residual state with its gradient, and per-layer attention internals."""

    value: float
    tokens: Int[torch.Tensor, "pos"]
    position: int
    target: Target
    rules: RuleSet
    resid: Residuals   # hook name -> (h [pos, d], g [pos, d])
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
            source = args[0] if args else kwargs[next(iter(kwargs))]
            x = source.view_as(source)
            self.tensors[name] = x
            if args:
                return (x,) + tuple(args[1:]), kwargs
            return args, {**kwargs, next(iter(kwargs)): x}
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
    """Attention hooks recorded for the closed form: v, z, and q and k as they enter the scores —
    the rotated queries and keys where they are exposed (then not the unrotated ones: every layer's
    copy of those was a fifth of a graph's memory), else q, k and the rotary tables, else the scores."""
    site = adapter.layer(layer)

    def fires(name):
        return hook_fires(adapter, name)
    names = [site.v, site.z]
    if adapter.arch.positional == "rotary" and fires(site.rot_q) and fires(site.rot_k):
        return names + [site.rot_q, site.rot_k]
    names += [site.q, site.k]
    if adapter.arch.positional == "rotary":
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


# ---------------------------------------------------------------------------- one pass
def _one_pass_gradients(adapter, tokens, position, target, rules, names, wrt):
    """One forward under the rules and one backward through the whole model."""
    rec = _Recorder(roots=[names[0]])
    with engine.rules_active(adapter, rules):
        logits = engine.logits_at(adapter, tokens, [position], rec.hooks(adapter, names))  # one row of logits
        value = engine.check_finite(target(logits), "the target value")
        grads = engine.gradients(value.sum(), {n: rec.tensors[n] for n in wrt if n in rec.tensors})
    return value, rec.tensors, grads


# ---------------------------------------------------------------------------- bias parts
def _bias_parts(adapter: ModelAdapter, n_pos: int) -> list[dict[str, torch.Tensor]]:
    """q, k, v (as they enter the scores), the MLP pre-activations and a parallel block's MLP input,
    of every layer, for an all-zero residual input at each of ``n_pos`` positions: the constant (bias)
    part of the affine maps the closed form splits, rotary included (LN(0) = b, RMS(0) = 0).

    With a zero residual every position computes the same numbers up to the rotation of q and k, so
    one position is run and broadcast (``[1, …]``); only a rotary model whose parts are not all zero
    (q/k biases, a LayerNorm bias) runs all ``n_pos`` positions, in the long-context mode so that no
    full attention pattern is formed for it."""
    parts = _bias_forward(adapter, 1)
    rotates = adapter.arch.positional == "rotary"
    if rotates and any(bool(t.any()) for layer in parts for t in layer.values()):
        with long_context_mode(adapter):
            return _bias_forward(adapter, n_pos)
    return parts


@torch.no_grad()
def _bias_forward(adapter: ModelAdapter, n_pos: int) -> list[dict[str, torch.Tensor]]:
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
                  rules: "str | RuleSet", long_context: bool = False, neurons: bool = False) -> ForwardState:
    """One forward under ``rules`` and one backward: everything both edge methods need (MLP neuron
    activations and gradients too with ``neurons``). With ``long_context`` the pass runs in the
    engine's long-context mode (docs/long_context.md). The caller certifies the model first."""
    arch = adapter.arch
    rules = resolve_rules(rules)
    resid_names = _resid_names(adapter)
    names = _record_names(adapter, resid_names, neurons)  # probes which hooks fire before anything is replaced
    wrt = _wrt(adapter, resid_names, neurons)
    mode = long_context_mode(adapter) if long_context else contextlib.nullcontext()
    with session(adapter):
        batch_tokens = tokens[None].to(adapter.device).clone()
        with mode:
            value, tensors, grads = _one_pass_gradients(adapter, batch_tokens, position, target, rules, names, wrt)
        biases = _bias_parts(adapter, tokens.shape[0])
    act = {n: t[0].detach() for n, t in tensors.items()}
    del tensors
    grad = {n: (torch.zeros_like(act[n]) if grads.get(n) is None else grads[n][0].detach()) for n in wrt if n in act}
    del grads
    mids = {}
    for name in adapter.resid_hooks():
        if name.endswith("hook_resid_mid"):
            site = adapter.layer(int(name.split(".")[1]))
            mids[name] = (site.resid_pre, site.attn_out)
    resid = Residuals({n: act[n] for n in resid_names}, grad, mids)
    layers = [_attention_state(adapter, layer, act, grad, biases[layer], rules) for layer in range(arch.n_layers)]
    mlps = [_mlp_state(adapter, layer, act, grad, biases[layer], rules) for layer in range(arch.n_layers)] if neurons else []
    branches = ([_branch_state(adapter, layer, act, grad, biases[layer], rules) for layer in range(arch.n_layers)]
                if arch.parallel else [])
    return ForwardState(
        value=float(value.detach()[0]), tokens=tokens, position=position, target=target, rules=rules,
        resid=resid, layers=layers, mlps=mlps, branches=branches,
    )


def _rho_is_one(adapter: ModelAdapter, layer: int, branch: str, rules: RuleSet) -> bool:
    return rules.norm == "identity" or adapter.input_norm(layer, branch) is None


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
    x = x.expand(cos.shape[0], *x.shape[1:]) if x.shape[0] == 1 else x   # a constant part, the same at every position
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], dim=-1)
    return torch.cat([rot * cos[:, None] + half * sin[:, None], rest], dim=-1)


def _expand_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    return t if t.shape[1] == n_heads else t.repeat_interleave(n_heads // t.shape[1], dim=1)


def _visible_scores(scores: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[head, query, key]`` scores with the entries no query attends to zeroed (they may hold −inf)."""
    n = scores.shape[-1]
    return scores.masked_fill(~visible_keys(torch.arange(n, device=scores.device), n, window), 0.0)


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
    window = adapter.attention_window(layer)
    recomputed = _visible_scores(torch.einsum("qhd,khd->hqk", q, _expand_heads(k, q.shape[1])) * adapter.score_scale(layer),
                                 window)
    captured = _visible_scores(scores, window)
    if float((recomputed - captured).abs().max()) > 1e-5 * max(float(captured.abs().max()), 1e-30):
        return None  # not the rotary convention assumed here
    return q, k, _rotate_half(bias[local(site.q)], cos, sin), _rotate_half(bias[local(site.k)], cos, sin)


def _attention_state(adapter, layer, act, grad, bias, rules) -> AttentionState:
    site = adapter.layer(layer)
    local = lambda name: name[len(f"blocks.{layer}."):]  # noqa: E731
    x = act[site.resid_pre]
    rho = _rho(adapter, layer, "attn", x, rules)[:, 0]   # [pos]
    state = AttentionState(
        x=x, g_out=grad[site.attn_out], v=act[site.v], z=act[site.z], g_z=grad[site.z], v_bias=bias[local(site.v)],
        rho=rho, scale=adapter.score_scale(layer) or 1.0, softcap=site.attn_softcap,
        window=adapter.attention_window(layer),
    )
    state.plain = not bool(state.v_bias.any()) and _rho_is_one(adapter, layer, "attn", rules)
    state.problem = _fast_problem(adapter, layer)
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
        state.scores = _visible_scores(scores, state.window)   # bias-free q, k: the scores are ⟨q, k⟩·scale
        return state
    q, k, q_bias, k_bias = found
    if adapter.arch.qk_norm and (rules.norm != "identity" or q_bias.abs().max() > 0 or k_bias.abs().max() > 0):
        state.problem = ("the map resid → q, k is linear with q/k norms only under the identity norm rule and "
                         "without query/key biases")
        return state
    state.q, state.k, state.q_bias, state.k_bias = q, k, q_bias, k_bias
    state.plain = state.plain and not bool(q_bias.any()) and not bool(k_bias.any())
    return state


def _fast_problem(adapter: ModelAdapter, layer: int) -> str | None:
    if adapter.score_scale(layer) is None:
        return f"the attention score scale of blocks.{layer} cannot be read"
    return None
