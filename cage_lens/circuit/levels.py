"""Node levels of a cross-layer graph and the transitions between them (docs/graphs.md#levels).

Residual states: ``"embeddings"`` (input of block 0), ``"resid_mid.{l}"`` (after the attention half
of block l), ``"resid_post.{l}"`` (output of block l). Units: ``"heads.{l}"`` (head outputs
``hook_z``), ``"neurons.{l}"`` (MLP activations ``hook_post``). Parallel blocks (GPT-NeoX, GPT-J,
Phi-1/2: attention and MLP both read ``resid_pre``) have no state between the branches; their
``"half"`` levels are the two branch outputs ``"attn_out.{l}"`` and ``"mlp_out.{l}"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from cage_lens.core.adapter import ModelAdapter
from cage_lens.errors import InputError

if TYPE_CHECKING:
    from cage_lens.circuit.state import AttentionState, ForwardState, MLPState

__all__ = ["Level", "Transition", "Plan", "LEVEL_MODES", "state_levels", "transitions", "plan"]

LEVEL_MODES = ("block", "half", "heads", "neurons")


@dataclass
class Level:
    """One node level. Nodes are flattened: node n sits at token ``pos[n]`` with head/neuron
    ``unit[n]`` (-1 for residual states and branch outputs). ``hook`` names the activations."""

    name: str
    kind: str
    layer: int
    hook: str
    relevance: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    unit: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.relevance.shape[0]


@dataclass(frozen=True)
class Transition:
    """Edges from ``source`` to ``target``. Kinds:

    - ``"attention"``: residual → residual through the attention of ``layer`` (plus, in a parallel
      block, the token-local MLP branch on the diagonal);
    - ``"local"``: resid_mid → resid_post through a token-local MLP (diagonal);
    - ``"head_in"`` (residual → head outputs), ``"head_out"`` (heads → residual, diagonal per token);
    - ``"skip"``: the residual connection around a sublayer (diagonal);
    - ``"neuron_in"`` (resid_mid → MLP neurons), ``"neuron_out"`` (neurons → resid_post),
      ``"mlp_skip"`` (the residual connection around the MLP);
    - ``"attn_branch"`` (resid_pre → attention output of a parallel block), ``"mlp_branch"``
      (resid_pre → its MLP output, diagonal), ``"branch_out"`` (a branch output → resid_post, diagonal).
    """

    source: Level
    target: Level
    layer: int
    kind: str


@dataclass
class Plan:
    levels: list[Level]
    transitions: list[Transition]


def state_levels(adapter: ModelAdapter, levels: str) -> list[Level]:
    """Residual levels of ``"block"`` or sequential ``"half"`` mode."""
    if levels not in ("block", "half"):
        raise InputError(f"unknown level mode {levels!r}; state levels are 'block' or 'half'")
    out = [Level("embeddings", "embeddings", -1, adapter.block(0, "hook_resid_pre"))]
    for layer in range(adapter.arch.n_layers):
        if levels == "half" and adapter.has_resid_mid:
            out.append(Level(f"resid_mid.{layer}", "resid_mid", layer, adapter.block(layer, "hook_resid_mid")))
        out.append(Level(f"resid_post.{layer}", "resid_post", layer, adapter.block(layer, "hook_resid_post")))
    return out


def transitions(levels: Sequence[Level]) -> list[Transition]:
    out = []
    for source, target in zip(levels[:-1], levels[1:]):
        local = source.kind == "resid_mid" and target.kind == "resid_post"
        out.append(Transition(source, target, target.layer, "local" if local else "attention"))
    return out


# ---------------------------------------------------------------------------- nodes
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


def _with_neuron_nodes(level: Level, mlp: "MLPState", top_k: int) -> Level:
    """The ``top_k`` neurons of each token by |relevance|, flat index ``position · top_k + rank``."""
    n_pos, d_mlp = mlp.relevance.shape
    k = min(top_k, d_mlp)
    units = mlp.relevance.abs().topk(k, dim=-1).indices                     # [pos, k]
    level.relevance = mlp.relevance.gather(-1, units).reshape(-1).cpu()
    level.pos = torch.arange(n_pos).repeat_interleave(k)
    level.unit = units.reshape(-1).cpu()
    return level


def _resid_level(adapter: ModelAdapter, kind: str, layer: int, state: "ForwardState") -> Level:
    return _with_state_nodes(Level(f"{kind}.{layer}", kind, layer, adapter.block(layer, f"hook_{kind}")), state)


def _branch_level(adapter: ModelAdapter, branch: str, layer: int, state: "ForwardState") -> Level:
    """The output of one branch of a parallel block (``attn_out`` or ``mlp_out``)."""
    return _with_state_nodes(Level(f"{branch}.{layer}", branch, layer, adapter.block(layer, f"hook_{branch}")), state)


# ---------------------------------------------------------------------------- plans
def plan(adapter: ModelAdapter, state: "ForwardState", mode: str, neurons_top_k: int = 4) -> Plan:
    """Levels (with node relevance) and transitions of a graph in ``mode`` (docs/graphs.md#levels)."""
    if mode not in LEVEL_MODES:
        raise InputError(f"unknown levels {mode!r}; choose one of {', '.join(LEVEL_MODES)}")
    if adapter.arch.parallel:
        return _parallel_plan(adapter, state, mode)
    if mode in ("block", "half"):
        levels = [_with_state_nodes(lv, state) for lv in state_levels(adapter, mode)]
        return Plan(levels, transitions(levels))
    if mode == "neurons":
        return _neuron_plan(adapter, state, neurons_top_k)
    return _head_plan(adapter, state)


def _head_plan(adapter: ModelAdapter, state: "ForwardState") -> Plan:
    """Each attention sublayer becomes ``source → heads.l`` (per-head edges), ``heads.l → out``
    (diagonal: head relevance) and ``source → out`` (the residual connection); ``out`` is resid_mid
    (resid_post on attention-only models)."""
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


def _neuron_plan(adapter: ModelAdapter, state: "ForwardState", top_k: int) -> Plan:
    """Each MLP becomes ``resid_mid → neurons.l`` (token-local), ``neurons.l → resid_post`` (neuron
    relevance) and ``resid_mid → resid_post`` (residual connection); neurons outside the top-k of
    their token are left out (their relevance is not drawn)."""
    if adapter.arch.attn_only:
        raise InputError("levels='neurons' needs MLPs but the model is attention-only")
    if adapter.arch.moe:
        raise InputError("levels='neurons' is not available for a mixture of experts; use 'block', 'half' or 'heads'")
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


def _parallel_plan(adapter: ModelAdapter, state: "ForwardState", mode: str) -> Plan:
    """Parallel blocks: ``"block"`` is one transition per block (attention edges, the residual
    connection and the MLP branch on the diagonal); ``"half"`` splits it into the branch outputs
    (``source → attn_out.l``, ``source → mlp_out.l``, ``source → resid_post.l`` for the residual
    connection, and each branch output → resid_post.l); ``"heads"`` splits the attention branch into
    heads."""
    if mode == "neurons":
        raise InputError("levels='neurons' is not available for parallel attention + MLP blocks yet; "
                         "use 'block', 'half' or 'heads'")
    source = _with_state_nodes(state_levels(adapter, "block")[0], state)
    levels, steps = [source], []
    for layer in range(adapter.arch.n_layers):
        post = _resid_level(adapter, "resid_post", layer, state)
        if mode == "block":
            steps.append(Transition(source, post, layer, "attention"))
            levels.append(post)
            source = post
            continue
        if mode == "heads":
            attn = _with_head_nodes(Level(f"heads.{layer}", "heads", layer, adapter.attn_hook(layer, "hook_z")),
                                    state.layers[layer])
            attn_steps = [Transition(source, attn, layer, "head_in"), Transition(attn, post, layer, "head_out")]
        else:
            attn = _branch_level(adapter, "attn_out", layer, state)
            attn_steps = [Transition(source, attn, layer, "attn_branch"), Transition(attn, post, layer, "branch_out")]
        mlp = _branch_level(adapter, "mlp_out", layer, state)
        steps += attn_steps + [Transition(source, mlp, layer, "mlp_branch"), Transition(mlp, post, layer, "branch_out"),
                               Transition(source, post, layer, "skip")]
        levels += [attn, mlp, post]
        source = post
    return Plan(levels, steps)
