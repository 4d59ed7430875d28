"""Cross-layer edges between consecutive residual states (SPEC §2.2), two ways with identical numbers.

The edge from node (s, i) to node (t, j) is ``A[j, i] = Σ_k h_s(i,k) ∂⟨h_t(j), g_t(j)⟩/∂h_s(i,k)`` with
``g_t(j) = ∂target/∂h_t(j)`` (gradients under the LRP rules) held fixed.

- :func:`autograd_edge_rows` is the reference, the paper's batch-packed multi-target backpropagation:
  the prompt is replicated B times, replica b re-roots ``h_s`` as a leaf and its objective is
  ``⟨h_t(j_b), g_t(j_b)⟩``, so one backward call yields B rows of ``A``.
- :func:`fast_edge_rows` is the closed form of SPEC §2.4 from one forward and one backward pass:
  norms and MLPs are token-local, so only attention mixes tokens, and its edges are head sums of
  attention weights times value-projected dot products with stored gradients, plus the key/query
  paths when the rules let relevance through the softmax.

Plain Gradient×Input (``"gxi"``) does not detach the norm scale; the closed form stays exact because
``Σ_k x_k ∂n(x)/∂x_k`` of ``n(x) = C x / sqrt(var(Cx) + ε)`` is ``(n(x) − b)·ε/σ²`` (σ the norm's
scale): the bias-free parts ``v⁰, k⁰, q⁰`` are multiplied by ``ρ = ε/σ²`` (ρ = 1 when the scale is
detached, as in AttnLRP and CP-LRP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int

from cage_lens.adapter import ModelAdapter
from cage_lens.attribution import Capture
from cage_lens.errors import InputError, NumericalError, UnsupportedModelError
from cage_lens.rules import rule_hooks
from cage_lens.targets import Target

__all__ = [
    "Level", "Transition", "Plan", "ForwardState", "LEVEL_MODES", "state_levels", "transitions", "plan",
    "capture_state", "fast_edge_rows", "autograd_edge_rows",
]

LEVEL_MODES = ("block", "half", "heads", "neurons")

# gradient factors of the value path and of the query/key paths (SPEC §2.3, §2.4)
_VALUE_FACTOR = {"attnlrp": 0.5, "cplrp": 1.0, "gxi": 1.0}
_QK_FACTOR = {"attnlrp": 0.25, "cplrp": 0.0, "gxi": 1.0}


# ---------------------------------------------------------------------------- levels
@dataclass
class Level:
    """One node level. Residual states: ``"embeddings"`` (input of block 0), ``"resid_mid.{l}"`` (after
    the attention half of block l), ``"resid_post.{l}"`` (output of block l); units: ``"heads.{l}"``
    (head outputs ``hook_z``), ``"neurons.{l}"`` (MLP activations ``hook_post``). Nodes are flattened:
    node n sits at token ``pos[n]`` with head/neuron ``unit[n]`` (-1 for residual states)."""

    name: str
    kind: str
    layer: int
    hook: str  # the TL hook point holding this level's activations
    relevance: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    unit: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.relevance.shape[0]


@dataclass(frozen=True)
class Transition:
    """Edges from ``source`` to ``target``. Kinds: ``"attention"`` (residual → residual through the
    attention of ``layer``), ``"local"`` (resid_mid → resid_post through a token-local MLP: diagonal),
    ``"head_in"`` (residual → head outputs), ``"head_out"`` (heads → residual, diagonal per token),
    ``"skip"`` (the residual connection around the attention sublayer: diagonal), ``"neuron_in"``
    (resid_mid → MLP neurons, token-local), ``"neuron_out"`` (neurons → resid_post, token-local) and
    ``"mlp_skip"`` (the residual connection around the MLP: diagonal)."""

    source: Level
    target: Level
    layer: int
    kind: str


def state_levels(adapter: ModelAdapter, levels: str) -> list[Level]:
    """Residual levels of ``"block"`` or ``"half"`` mode (attention-only models have no resid_mid)."""
    if levels not in ("block", "half"):
        raise InputError(f"unknown level mode {levels!r}; state levels are 'block' or 'half'")
    out = [Level("embeddings", "embeddings", -1, adapter.block(0, "hook_resid_pre"))]
    for layer in range(adapter.arch.n_layers):
        if levels == "half" and not adapter.arch.attn_only:
            out.append(Level(f"resid_mid.{layer}", "resid_mid", layer, adapter.block(layer, "hook_resid_mid")))
        out.append(Level(f"resid_post.{layer}", "resid_post", layer, adapter.block(layer, "hook_resid_post")))
    return out


def transitions(levels: Sequence[Level]) -> list[Transition]:
    out = []
    for source, target in zip(levels[:-1], levels[1:]):
        local = source.kind == "resid_mid" and target.kind == "resid_post"
        out.append(Transition(source, target, target.layer, "local" if local else "attention"))
    return out


@dataclass
class Plan:
    levels: list[Level]
    transitions: list[Transition]


def _with_state_nodes(level: Level, state: "ForwardState") -> Level:
    relevance = state.relevance(level.hook).cpu()  # node bookkeeping lives on the CPU
    level.relevance, level.pos = relevance, torch.arange(relevance.shape[0])
    level.unit = torch.full_like(level.pos, -1)
    return level


def _with_head_nodes(level: Level, att: "AttentionState") -> Level:
    """Head nodes, flat index ``head · pos + position``; relevance ``Σ_d z ⊙ ∂target/∂z``."""
    relevance = (att.z * att.g_z).sum(-1).T.cpu()  # [head, pos]
    n_heads, n_pos = relevance.shape
    level.relevance = relevance.reshape(-1)
    level.pos = torch.arange(n_pos).repeat(n_heads)
    level.unit = torch.arange(n_heads).repeat_interleave(n_pos)
    return level


def _resid_level(adapter: ModelAdapter, kind: str, layer: int, state: "ForwardState") -> Level:
    return _with_state_nodes(Level(f"{kind}.{layer}", kind, layer, adapter.block(layer, f"hook_{kind}")), state)


def plan(adapter: ModelAdapter, state: "ForwardState", mode: str, neurons_top_k: int = 4) -> Plan:
    """Levels (with node relevance) and transitions of a graph in ``mode``. With ``"heads"`` each
    attention sublayer becomes ``source → heads.l`` (per-head edges), ``heads.l → out`` (diagonal: head
    relevance) and ``source → out`` (the residual connection); ``out`` is resid_mid (resid_post on
    attention-only models)."""
    if mode in ("block", "half"):
        levels = [_with_state_nodes(lv, state) for lv in state_levels(adapter, mode)]
        return Plan(levels, transitions(levels))
    if mode == "neurons":
        return _neuron_plan(adapter, state, neurons_top_k)
    if mode != "heads":
        raise InputError(f"unknown levels {mode!r}; choose one of {', '.join(LEVEL_MODES)}")
    arch = adapter.arch
    source = _with_state_nodes(state_levels(adapter, "block")[0], state)
    levels, steps = [source], []
    for layer in range(arch.n_layers):
        heads = _with_head_nodes(Level(f"heads.{layer}", "heads", layer, adapter.attn_hook(layer, "hook_z")), state.layers[layer])
        out = _resid_level(adapter, "resid_post" if arch.attn_only else "resid_mid", layer, state)
        steps += [Transition(source, heads, layer, "head_in"), Transition(heads, out, layer, "head_out"),
                  Transition(source, out, layer, "skip")]
        levels += [heads, out]
        if not arch.attn_only:
            post = _resid_level(adapter, "resid_post", layer, state)
            steps.append(Transition(out, post, layer, "local"))
            levels.append(post)
            out = post
        source = out
    return Plan(levels, steps)


def _with_neuron_nodes(level: Level, mlp: "MLPState", top_k: int) -> Level:
    """The ``top_k`` neurons of each token by |relevance|, flat index ``position · top_k + rank``."""
    n_pos, d_mlp = mlp.relevance.shape
    k = min(top_k, d_mlp)
    units = mlp.relevance.abs().topk(k, dim=-1).indices                     # [pos, k]
    level.relevance = mlp.relevance.gather(-1, units).reshape(-1).cpu()
    level.pos = torch.arange(n_pos).repeat_interleave(k)
    level.unit = units.reshape(-1).cpu()
    return level


def _neuron_plan(adapter: ModelAdapter, state: "ForwardState", top_k: int) -> Plan:
    """Each MLP becomes ``resid_mid → neurons.l`` (token-local), ``neurons.l → resid_post`` (neuron
    relevance) and ``resid_mid → resid_post`` (residual connection); neurons outside the top-k of
    their token are left out (their relevance is not drawn)."""
    if adapter.arch.attn_only:
        raise InputError("levels='neurons' needs MLPs but the model is attention-only")
    if not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"neurons_top_k must be a positive int, got {top_k!r}")
    source = _with_state_nodes(state_levels(adapter, "block")[0], state)
    levels, steps = [source], []
    for layer in range(adapter.arch.n_layers):
        mid = _resid_level(adapter, "resid_mid", layer, state)
        neurons = _with_neuron_nodes(Level(f"neurons.{layer}", "neurons", layer, adapter.mlp_hook(layer, "hook_post")),
                                     state.mlps[layer], top_k)
        post = _resid_level(adapter, "resid_post", layer, state)
        steps += [Transition(source, mid, layer, "attention"), Transition(mid, neurons, layer, "neuron_in"),
                  Transition(neurons, post, layer, "neuron_out"), Transition(mid, post, layer, "mlp_skip")]
        levels += [mid, neurons, post]
        source = post
    return Plan(levels, steps)


# ---------------------------------------------------------------------------- one forward + backward
@dataclass
class AttentionState:
    """What the closed form needs from one attention layer (batch row 0, rotary already applied)."""

    x: Float[torch.Tensor, "pos d_model"]          # resid_pre
    g_out: Float[torch.Tensor, "pos d_model"]      # gradient at resid_mid (resid_post if attention-only)
    q: Float[torch.Tensor, "pos head d_head"]
    k: Float[torch.Tensor, "pos kv_head d_head"]
    v: Float[torch.Tensor, "pos kv_head d_head"]
    z: Float[torch.Tensor, "pos head d_head"]
    g_z: Float[torch.Tensor, "pos head d_head"]
    q0: Float[torch.Tensor, "pos head d_head"]     # bias-free parts (times ρ under gxi)
    k0: Float[torch.Tensor, "pos kv_head d_head"]
    v0: Float[torch.Tensor, "pos kv_head d_head"]


@dataclass
class MLPState:
    """Per token and neuron: relevance ``post ⊙ ∂target/∂post`` and the edge from resid_mid into it."""

    relevance: Float[torch.Tensor, "pos d_mlp"]
    incoming: Float[torch.Tensor, "pos d_mlp"]
    g_post: Float[torch.Tensor, "pos d_mlp"]


@dataclass
class ForwardState:
    """Target value, every residual state with its gradient, and per-layer attention internals."""

    value: float
    tokens: Int[torch.Tensor, "pos"]
    position: int
    target: Target
    rules: str
    resid: dict[str, tuple[torch.Tensor, torch.Tensor]]   # hook name -> (h [pos, d], g [pos, d])
    layers: list[AttentionState]
    attn_scale: float
    mlps: list["MLPState"] = field(default_factory=list)

    def relevance(self, hook: str) -> Float[torch.Tensor, "pos"]:
        h, g = self.resid[hook]
        return (h * g).sum(-1)


def _attn_scale(model, d_head: int) -> float:
    cfg = model.cfg
    if not getattr(cfg, "use_attn_scale", True):
        return 1.0
    scale = getattr(cfg, "attn_scale", None)
    return float(scale) if scale is not None and scale > 0 else math.sqrt(d_head)


@torch.no_grad()
def _bias_parts(adapter: ModelAdapter) -> list[dict[str, torch.Tensor]]:
    """q, k, v of every layer for an all-zero residual input: the constant (bias) part of the affine
    map resid_pre → q/k/v when the norm scale is held fixed (LN(0) = b, RMS(0) = 0)."""
    arch, rec = adapter.arch, Capture()
    hooks: list = []
    zero = lambda t, hook: torch.zeros_like(t)  # noqa: E731
    for layer in range(arch.n_layers):
        hooks.append((adapter.block(layer, "hook_resid_pre"), zero))
        hooks += [(adapter.attn_hook(layer, n), rec.hook(f"{layer}.{n}")) for n in ("hook_q", "hook_k", "hook_v")]
        if not arch.attn_only:  # on a bridge hook_resid_mid feeds only the MLP: exactly what is zeroed here
            hooks.append((adapter.block(layer, "hook_resid_mid"), zero))
            hooks += [(adapter.mlp_hook(layer, n), rec.hook(f"{layer}.{n}")) for n in _mlp_inputs(arch)]
    with adapter.model.hooks(fwd_hooks=hooks):
        adapter.model(torch.zeros((1, 1), dtype=torch.long, device=adapter.device))
    return [{n[len(f"{layer}."):]: t[0, 0] for n, t in rec.tensors.items() if n.startswith(f"{layer}.")}
            for layer in range(arch.n_layers)]


def _mlp_inputs(arch) -> tuple[str, ...]:
    """The pre-activation hooks feeding each MLP neuron (gate and linear branch when gated)."""
    return ("hook_pre", "hook_pre_linear") if arch.gated_mlp else ("hook_pre",)


def _norm_eps(adapter: ModelAdapter) -> float:
    return float(getattr(adapter.model.cfg, "eps", 1e-5))


def _record_hooks(adapter: ModelAdapter, rules: str, rec: Capture, names: Sequence[str]) -> list:
    """Recording hooks for the residual states ``names`` and every layer's attention internals."""
    arch = adapter.arch
    rotary = arch.positional == "rotary"
    hooks = [(name, rec.hook(name)) for name in names]
    for layer in range(arch.n_layers):
        for n in ("hook_q", "hook_k", "hook_v", "hook_z") + (("hook_rot_q", "hook_rot_k") if rotary else ()):
            hooks.append((adapter.attn_hook(layer, n), rec.hook(adapter.attn_hook(layer, n))))
        if arch.normalization is not None and rules == "gxi":
            for ln in ("ln1", "ln2") if not arch.attn_only else ("ln1",):
                hooks.append((adapter.block(layer, f"{ln}.hook_scale"), rec.hook(adapter.block(layer, f"{ln}.hook_scale"))))
    return hooks


def _checked_value(target: Target, logits: torch.Tensor, position: int) -> torch.Tensor:
    value = target(logits[:, position])
    if not torch.isfinite(value).all():
        raise NumericalError(f"the target value is not finite: {value.tolist()}")
    return value


def _one_pass_gradients(adapter, tokens, position, target, rules, resid_names, wrt):
    """One forward under the rules and one backward through the whole model."""
    rec = Capture(roots=[resid_names[0]])
    with torch.enable_grad(), adapter.model.hooks(fwd_hooks=rule_hooks(adapter, rules) + _record_hooks(adapter, rules, rec, resid_names)):
        value = _checked_value(target, adapter.model(tokens), position)
        grads = torch.autograd.grad(value.sum(), [rec.tensors[n] for n in wrt], allow_unused=True)
    return value, rec.tensors, dict(zip(wrt, grads))


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


def _layerwise_gradients(adapter, tokens, position, target, rules, resid_names, wrt):
    """The same gradients with one layer's autograd graph alive at a time: a no-grad forward records
    the activations, then the head and each block from the top are re-run from their recorded input,
    with autograd switched on for that block alone (memory O(one layer); time about two forwards on
    a HookedTransformer, O(layers²) block forwards on a bridge)."""
    model, arch = adapter.model, adapter.arch
    rec = Capture()
    with torch.no_grad(), model.hooks(fwd_hooks=rule_hooks(adapter, rules) + _record_hooks(adapter, rules, rec, resid_names)):
        value = _checked_value(target, model(tokens), position)
    grads: dict[str, torch.Tensor] = {}
    last = adapter.block(arch.n_layers - 1, "hook_resid_post")
    grads[last] = _head_gradient(adapter, tokens, position, target, rules, rec.tensors[last])
    for layer in reversed(range(arch.n_layers)):
        pre, post = adapter.block(layer, "hook_resid_pre"), adapter.block(layer, "hook_resid_post")
        inner = [n for n in wrt if n.startswith(f"blocks.{layer}.") and n not in (pre, post)]
        local, leaves = Capture(), {}
        captured: dict = {}
        hooks = rule_hooks(adapter, rules) + [(pre, _grad_from(pre, leaves))] + [(n, local.hook(n)) for n in inner]
        with torch.no_grad():
            try:
                with model.hooks(fwd_hooks=hooks + [_stop_after(post, captured)]):
                    _run_from(adapter, tokens, layer, rec.tensors[pre])
            except _StopForward:
                pass
            with torch.enable_grad():
                objective = (captured["h"] * grads[post]).sum()
                found = torch.autograd.grad(objective, [leaves[pre]] + [local.tensors[n] for n in inner], allow_unused=True)
        grads.update(zip([pre] + inner, found))
        if layer > 0:
            grads[adapter.block(layer - 1, "hook_resid_post")] = grads[pre]
    return value, rec.tensors, grads


def _head_gradient(adapter, tokens, position, target, rules, resid_last: torch.Tensor) -> torch.Tensor:
    """∂target/∂(last resid_post) under the rules, differentiating only the final norm and unembed."""
    model, last = adapter.model, adapter.block(adapter.arch.n_layers - 1, "hook_resid_post")
    if not adapter.arch.is_bridge:
        leaf = resid_last.detach().requires_grad_(True)
        with torch.enable_grad(), model.hooks(fwd_hooks=rule_hooks(adapter, rules)):
            logits = model(leaf, start_at_layer=adapter.arch.n_layers)
            return torch.autograd.grad(_checked_value(target, logits, position).sum(), leaf)[0]
    leaves: dict = {}
    with torch.no_grad(), model.hooks(fwd_hooks=rule_hooks(adapter, rules) + [(last, _grad_from(last, leaves))]):
        logits = model(tokens)
        with torch.enable_grad():
            return torch.autograd.grad(_checked_value(target, logits, position).sum(), leaves[last])[0]


def capture_state(adapter: ModelAdapter, tokens: Int[torch.Tensor, "pos"], position: int, target: Target,
                  rules: str, low_memory: bool | None = None, neurons: bool = False) -> ForwardState:
    """One forward under ``rules`` and one backward: everything both edge methods need (MLP neuron
    activations and gradients too with ``neurons``). With ``low_memory`` (default: inputs over 1024
    tokens) the backward is done block by block."""
    arch, model = adapter.arch, adapter.model
    resid_names = list(dict.fromkeys([adapter.block(0, "hook_resid_pre")] + adapter.resid_hooks()[1:]))
    mlp_names = [adapter.mlp_hook(l, n) for l in range(arch.n_layers) for n in _mlp_inputs(arch) + ("hook_post",)] if neurons else []
    wrt = resid_names + [adapter.attn_hook(l, "hook_z") for l in range(arch.n_layers)] + mlp_names
    if low_memory is None:
        low_memory = tokens.shape[0] > 1024
    gradients = _layerwise_gradients if low_memory else _one_pass_gradients
    value, tensors, grads = gradients(adapter, tokens[None].to(adapter.device), position, target, rules,
                                      resid_names + mlp_names, wrt)
    act = {n: t[0].detach() for n, t in tensors.items()}
    grad = {n: (torch.zeros_like(act[n]) if grads.get(n) is None else grads[n][0].detach()) for n in wrt}
    resid = {n: (act[n], grad[n]) for n in resid_names}
    biases = _bias_parts(adapter)
    rotary = arch.positional == "rotary"
    layers = [_attention_state(adapter, layer, act, grad, biases[layer], rules, rotary) for layer in range(arch.n_layers)]
    mlps = [_mlp_state(adapter, layer, act, grad, biases[layer], rules) for layer in range(arch.n_layers)] if neurons else []
    return ForwardState(
        value=float(value.detach()[0]), tokens=tokens, position=position, target=target, rules=rules,
        resid=resid, layers=layers, attn_scale=_attn_scale(model, arch.d_head), mlps=mlps,
    )


def _mlp_state(adapter, layer, act, grad, bias, rules) -> "MLPState":
    """Neuron relevance and the neuron-input edges ``Σ_p ∂̃target/∂p_n · (p_n − p_n(0)) · ρ`` over the
    pre-activations p feeding neuron n: the Gradient×Input of resid_mid through the affine map
    resid_mid → p (norm scale held fixed; ρ = ε/σ² under gxi, see the module docstring)."""
    arch = adapter.arch
    rho = torch.ones(1, dtype=act[adapter.mlp_hook(layer, "hook_post")].dtype)
    if rules == "gxi" and arch.normalization is not None:
        rho = (_norm_eps(adapter) / act[adapter.block(layer, "ln2.hook_scale")].reshape(-1, 1).pow(2))
    incoming = sum(grad[adapter.mlp_hook(layer, n)] * (act[adapter.mlp_hook(layer, n)] - bias[n]) for n in _mlp_inputs(arch))
    post = adapter.mlp_hook(layer, "hook_post")
    return MLPState(relevance=act[post] * grad[post], incoming=incoming * rho, g_post=grad[post])


def _attention_state(adapter, layer, act, grad, bias, rules, rotary) -> AttentionState:
    arch = adapter.arch
    a = lambda n: act[adapter.attn_hook(layer, n)]  # noqa: E731
    out_hook = adapter.block(layer, "hook_resid_post" if arch.attn_only else "hook_resid_mid")
    rho = torch.ones(a("hook_v").shape[0], 1, 1, dtype=a("hook_v").dtype, device=a("hook_v").device)
    if rules == "gxi" and arch.normalization is not None:
        scale = act[adapter.block(layer, "ln1.hook_scale")].reshape(-1)
        rho = (_norm_eps(adapter) / scale.pow(2))[:, None, None]
    if rotary:
        if bias["hook_q"].abs().max() > 0 or bias["hook_k"].abs().max() > 0:
            raise UnsupportedModelError(
                "method='fast' does not support rotary attention with query/key biases; use method='autograd'"
            )
        q, k = a("hook_rot_q"), a("hook_rot_k")
        q0, k0 = q * rho, k * rho
    else:
        q, k = a("hook_q"), a("hook_k")
        q0, k0 = (q - bias["hook_q"]) * rho, (k - bias["hook_k"]) * rho
    return AttentionState(
        x=act[adapter.block(layer, "hook_resid_pre")], g_out=grad[out_hook],
        q=q, k=k, v=a("hook_v"), z=a("hook_z"), g_z=grad[adapter.attn_hook(layer, "hook_z")],
        q0=q0, k0=k0, v0=(a("hook_v") - bias["hook_v"]) * rho,
    )


# ---------------------------------------------------------------------------- fast closed form (SPEC §2.4)
def _expand_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[pos, kv_head, d] -> [pos, head, d]: query head h reads kv head h // (n_heads / n_kv_heads)."""
    return t if t.shape[1] == n_heads else t.repeat_interleave(n_heads // t.shape[1], dim=1)


def _row_chunk(n_heads: int, n_pos: int, itemsize: int, budget_bytes: int) -> int:
    return max(1, min(n_pos, budget_bytes // max(1, 6 * n_heads * n_pos * itemsize)))


def fast_edge_rows(state: ForwardState, transition: Transition, rows: Int[torch.Tensor, "row"],
                   budget_bytes: int = 256 * 2**20) -> Float[torch.Tensor, "row source"]:
    """Rows ``A[j, :]`` of one transition by the closed form (flat node indices), processed in chunks
    of rows so the ``[head, chunk, pos]`` intermediates stay within ``budget_bytes``."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    att = state.layers[transition.layer]
    n_pos = att.x.shape[0]
    if transition.kind == "local":
        return _diagonal_rows(state.relevance(transition.source.hook), rows)
    if transition.kind == "skip":
        return _diagonal_rows((att.x * att.g_out).sum(-1), rows)
    if transition.kind == "mlp_skip":
        mid, _ = state.resid[transition.source.hook]
        return _diagonal_rows((mid * state.resid[transition.target.hook][1]).sum(-1), rows)
    if transition.kind == "neuron_in":
        level, incoming = transition.target, state.mlps[transition.layer].incoming.cpu()
        out = torch.zeros(len(rows), n_pos, dtype=att.x.dtype)
        out[torch.arange(len(rows)), level.pos[rows]] = incoming[level.pos[rows], level.unit[rows]]
        return out
    if transition.kind == "neuron_out":
        level = transition.source
        columns = rows[:, None] * (level.size // n_pos) + torch.arange(level.size // n_pos)[None, :]  # [row, k]
        out = torch.zeros(len(rows), level.size, dtype=att.x.dtype)
        out.scatter_(1, columns, level.relevance[columns])
        return out
    if transition.kind == "head_out":
        out = torch.zeros(len(rows), transition.source.relevance.shape[0], dtype=att.x.dtype)
        columns = torch.arange(att.q.shape[1])[None, :] * n_pos + rows[:, None]  # [row, head]
        out.scatter_(1, columns, transition.source.relevance[columns])
        return out
    positions, heads = (rows % n_pos, rows // n_pos) if transition.kind == "head_in" else (rows, None)
    out = torch.zeros(len(rows), n_pos, dtype=att.x.dtype, device=att.x.device)
    step = _row_chunk(att.q.shape[1], n_pos, att.x.element_size(), budget_bytes)
    for start in range(0, len(rows), step):
        chunk = positions[start:start + step].to(att.x.device)
        per_head = _head_terms(att, chunk, state.rules, state.attn_scale)   # [head, row, pos]
        if heads is None:
            out[start:start + step] = _with_skip(per_head.sum(0), att, chunk)
        else:
            out[start:start + step] = per_head[heads[start:start + step], torch.arange(len(chunk))]
    return out


def _diagonal_rows(values: Float[torch.Tensor, "pos"], rows: torch.Tensor) -> torch.Tensor:
    """Token-local transitions (MLP with its norm, residual connection): ``A[j, i] = δ_ij values[j]``."""
    values = values.cpu()
    out = torch.zeros(len(rows), values.shape[0], dtype=values.dtype)
    out[torch.arange(len(rows)), rows] = values[rows]
    return out


def _with_skip(edges: torch.Tensor, att: AttentionState, rows: torch.Tensor) -> torch.Tensor:
    edges[torch.arange(len(rows)), rows] += (att.x[rows] * att.g_out[rows]).sum(-1)  # δ_ij ⟨x_j, g_j⟩
    return edges


def _head_terms(att: AttentionState, rows: torch.Tensor, rules: str, attn_scale: float) -> torch.Tensor:
    """Per-head attention edges ``[head, row, pos]`` without the residual connection (SPEC §2.4)."""
    n_heads, n_pos = att.q.shape[1], att.x.shape[0]
    k, v = _expand_kv(att.k, n_heads), _expand_kv(att.v, n_heads)
    k0, v0 = _expand_kv(att.k0, n_heads), _expand_kv(att.v0, n_heads)
    q, q0, g_z = att.q[rows], att.q0[rows], att.g_z[rows]                   # [row, head, d]
    causal = torch.arange(n_pos, device=rows.device)[None, :] <= rows[:, None]  # [row, pos]
    scores = torch.einsum("rhd,phd->hrp", q, k) / attn_scale
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)           # [head, row, pos]
    _check_pattern(pattern, v, att.z[rows])
    u = torch.einsum("phd,rhd->hrp", v, g_z)                                 # ⟨v_h(i) W_O, g_j⟩
    u0 = torch.einsum("phd,rhd->hrp", v0, g_z)
    edges = _VALUE_FACTOR[rules] * pattern * u0
    qk_factor = _QK_FACTOR[rules]
    if qk_factor:
        score_grad = pattern * (u - (pattern * u).sum(-1, keepdim=True))     # D_h[j, i]
        key_path = score_grad * torch.einsum("rhd,phd->hrp", q, k0) / attn_scale
        query_path = (score_grad * torch.einsum("rhd,phd->hrp", q0, k) / attn_scale).sum(-1)  # [head, row]
        edges = edges + qk_factor * key_path
        edges[:, torch.arange(len(rows)), rows] += qk_factor * query_path
    return edges


def _check_pattern(pattern: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> None:
    """The recomputed attention must reproduce the model's own head outputs ``z``; otherwise the
    model computes attention in a way the closed form does not know (soft-capping, ALiBi, …)."""
    recomputed = torch.einsum("hrp,phd->rhd", pattern, v)
    tol = 1e-5 if z.dtype == torch.float64 else 1e-3  # HF eager attention runs softmax in float32
    err = float((recomputed - z).abs().max()) / max(float(z.abs().max()), 1e-30)
    if not err <= tol:
        raise UnsupportedModelError(
            f"method='fast' cannot reproduce this model's attention (relative error {err:.2g}); "
            "use method='autograd'"
        )


# ---------------------------------------------------------------------------- autograd reference
class _StopForward(Exception):
    """Raised once the target state is recorded: later layers are not needed."""


def _reroot_hooks(adapter: ModelAdapter, source: Level, leaves: list) -> list:
    """Hooks that make ``h_s`` a fresh leaf. resid_mid is re-rooted through ``hook_attn_out``
    (``resid_mid = resid_pre + (leaf − resid_pre)``) because on a bridge ``hook_resid_mid`` only
    feeds the MLP branch (SPEC §3 pitfall 2)."""
    if source.kind == "embeddings":
        name = adapter.block(0, "hook_resid_pre")
    elif source.kind == "resid_post" and source.layer + 1 < adapter.arch.n_layers:
        name = adapter.block(source.layer + 1, "hook_resid_pre")
    else:
        name = None
    if name is not None:
        def reroot(tensor, hook):
            leaf = tensor.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf
        return [(name, reroot)]
    if source.kind != "resid_mid":
        raise InputError(f"no transition starts at {source.name}")
    stash: dict = {}

    def keep_pre(tensor, hook):
        stash["pre"] = tensor.detach()

    def reroot_mid(tensor, hook):
        leaf = (stash["pre"] + tensor.detach()).requires_grad_(True)
        leaves.append(leaf)
        return leaf - stash["pre"]
    return [(adapter.block(source.layer, "hook_resid_pre"), keep_pre),
            (adapter.block(source.layer, "hook_attn_out"), reroot_mid)]


def _stop_after(name: str, captured: dict) -> tuple:
    def grab(tensor, hook):
        captured["h"] = tensor
        raise _StopForward
    return (name, grab)


def _reroot_z(name: str, leaves: list) -> tuple:
    def reroot(tensor, hook):
        leaf = tensor.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf
    return (name, reroot)


def _target_of(state: ForwardState, transition: Transition, rows: torch.Tensor):
    """(hook to stop at, function: captured activation [B, ...] → per-replica value whose gradient
    gives row b) for the target level of ``transition``."""
    n_pos = state.tokens.shape[0]
    if transition.target.kind == "neurons":
        g_post = state.mlps[transition.layer].g_post
        positions, units = transition.target.pos[rows], transition.target.unit[rows]
        replica = torch.arange(len(rows))
        return transition.target.hook, lambda post: (post[replica, positions, units] * g_post[positions, units]).sum()
    if transition.target.kind == "heads":
        g_z = state.layers[transition.layer].g_z
        heads, positions = rows // n_pos, rows % n_pos
        replica = torch.arange(len(rows))
        return transition.target.hook, lambda z: (z[replica, positions, heads] * g_z[positions, heads]).sum()
    _, g = state.resid[transition.target.hook]
    replica = torch.arange(len(rows))
    return transition.target.hook, lambda h: (h[replica, rows] * g[rows]).sum()


def autograd_edge_rows(adapter: ModelAdapter, state: ForwardState, transition: Transition,
                       rows: Int[torch.Tensor, "row"], batch_size: int = 16) -> Float[torch.Tensor, "row source"]:
    """Reference rows ``A[j, :]`` by batch-packed multi-target backpropagation: ``batch_size``
    replicas of the prompt per backward call, replica b's objective ``⟨h_t(j_b), g_t(j_b)⟩``.
    Head outputs are re-rooted at ``hook_z``; the residual-connection edges ("skip") are those with
    every head output detached."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    n_pos = state.tokens.shape[0]
    source = transition.source
    z_hook = adapter.attn_hook(transition.layer, "hook_z")
    n_source = source.relevance.shape[0] if source.relevance is not None else n_pos
    out = torch.zeros(len(rows), n_source, dtype=state.layers[0].x.dtype)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        leaves: list = []
        captured: dict = {}
        target_hook, objective = _target_of(state, transition, chunk)
        if source.kind in ("heads", "neurons"):
            extra = [_reroot_z(source.hook, leaves)]
        else:
            extra = _reroot_hooks(adapter, source, leaves)
            if transition.kind == "skip":
                extra.append((z_hook, lambda t, hook: t.detach()))
            if transition.kind == "mlp_skip":
                extra.append((adapter.mlp_hook(transition.layer, "hook_post"), lambda t, hook: t.detach()))
        hooks = rule_hooks(adapter, state.rules) + extra + [_stop_after(target_hook, captured)]
        tokens = state.tokens[None].expand(len(chunk), n_pos).to(adapter.device)
        with torch.enable_grad():
            try:
                with adapter.model.hooks(fwd_hooks=hooks):
                    adapter.model(tokens)
            except _StopForward:
                pass
            (grad,) = torch.autograd.grad(objective(captured["h"]), leaves[-1])
        contribution = (leaves[-1].detach() * grad).sum(-1).cpu()           # [B, pos] or [B, pos, head]
        if source.kind == "heads":
            contribution = contribution.transpose(1, 2).reshape(len(chunk), -1)  # flat head·pos + pos
        elif source.kind == "neurons":
            contribution = (leaves[-1].detach() * grad).cpu()[:, source.pos, source.unit]
        out[start:start + len(chunk)] = contribution
    return out
