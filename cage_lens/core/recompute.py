"""The long-context mode: blocks recomputed in the backward, attention computed in row chunks
(layer 6 of :mod:`cage_lens.core`; docs/long_context.md).

One attribution keeps, by default, what autograd saves for the backward of every layer: each
attention pattern (``heads · pos²`` numbers per layer) among them. :func:`long_context` trades a
second forward for that memory:

- **Per-block recomputation.** Every block runs under non-reentrant activation checkpointing: the
  forward keeps each block's inputs only, and the backward runs one block's forward again just before
  its backward, so one layer's saved tensors are alive at a time. The recomputation runs the rule
  hooks again on the same values (every rule keeps forward values and is a function of them), so
  the gradients are those of the default path — the captures are no longer installed then, so
  nothing is recorded twice — and the hooks of the calling thread act in the thread autograd
  recomputes in (:func:`~cage_lens.core.hooks.acting_for`: a device runs the backward in its own thread).
- **Row-chunked attention.** Inside an attention module the score product ``q·kᵀ`` is not computed:
  it becomes a *deferred* ``[…, query, key]`` tensor, and what TransformerLens does with it row by
  row (scale, soft-cap, mask, softmax, casts, the NaN scrub) is recorded. When the deferred pattern
  meets ``· v``, the product is computed a few query rows at a time, and its backward recomputes each
  chunk's pattern: ``heads · rows · pos`` numbers at a time instead of ``heads · pos²``. Anything else
  done to a deferred tensor computes it in full first (the default path's memory, the same numbers),
  and a layer whose scores or pattern are hooked (a soft-cap rule, a capture) is computed in full, as
  is one whose whole attention backward is small (below :data:`EAGER_MULTIPLE` budgets). Where the
  forward finds a chunk's rows give every key from its last row on probability zero (a causal mask),
  the chunk's backward reads only the keys before (docs/long_context.md#causal-chunks).

Both change only where and when numbers are computed, never which: the results equal the default
path's to rounding (docs/long_context.md#equal-to-the-default-path).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from cage_lens.core.adapter import ModelAdapter
from cage_lens.core.hooks import Installation, acting_for
from cage_lens.core.memory import (CPU_ATTENTION_BUDGET, EAGER_MULTIPLE, ROW_CHUNK_ENTRY_BYTES, attention_budget,
                                   available_memory, causal_key_extent)

__all__ = ["long_context", "default_budget", "ATTENTION_BUDGET", "EAGER_MULTIPLE"]

#: bytes of one chunk's ``[…, rows, key]`` intermediates of the row-chunked attention on the CPU (on an
#: accelerator: :func:`default_budget`)
ATTENTION_BUDGET = CPU_ATTENTION_BUDGET


@contextlib.contextmanager
def long_context(adapter: ModelAdapter, attention_budget: int | None = None) -> Iterator[None]:
    """For the duration: every block of ``adapter.model`` recomputed in the backward and every attention
    computed in row chunks of at most ``attention_budget`` bytes (default :func:`default_budget`; see
    the module docstring). Acts only for the calling thread's work; a forward of another thread
    meanwhile runs as without it."""
    attention_budget = default_budget(adapter) if attention_budget is None else attention_budget
    inst = Installation()
    replaced: list[torch.nn.Module] = []
    try:
        for block in adapter.model.blocks:
            _replace_forward(block, _checkpointed(block.forward, inst), replaced)
            attention = getattr(block, "attn", None)
            if isinstance(attention, torch.nn.Module):
                _replace_forward(attention, _row_chunked(attention, attention.forward, inst, attention_budget), replaced)
        yield
    finally:
        for module in replaced:
            module.__dict__.pop("forward", None)


def default_budget(adapter: ModelAdapter) -> int:
    """The row chunks' bytes on the model's device: :data:`ATTENTION_BUDGET` on the CPU, more on an
    accelerator with memory to spare (:func:`cage_lens.core.memory.attention_budget`, which the
    planner counts too)."""
    device = adapter.device
    return attention_budget(device, available_memory(str(device)), ATTENTION_BUDGET)


def _replace_forward(module: torch.nn.Module, forward: Callable, replaced: list) -> None:
    # straight into the instance dict: a bridge component's __setattr__ forwards attributes to the HF module
    object.__setattr__(module, "forward", forward)
    replaced.append(module)


# ---------------------------------------------------------------------------- per-block recomputation
#: keyword arguments through which Hugging Face passes a key/value cache down: the recomputation would
#: append to it a second time, and one attribution pass needs none
_CACHE_ARGUMENTS = ("layer_past", "past_key_value", "past_key_values", "cache", "past_kv_cache_entry")


def _is_cache(value) -> bool:
    """A Hugging Face key/value cache, which some blocks take positionally (GPT-2's second argument)."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    return cache_utils is not None and isinstance(value, cache_utils.Cache)


def _checkpointed(forward: Callable, inst: Installation) -> Callable:
    def run_block(*args, **kwargs):
        if not (torch.is_grad_enabled() and inst.acting()):
            return forward(*args, **kwargs)
        args = tuple(None if _is_cache(a) else a for a in args)
        for key in _CACHE_ARGUMENTS:
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        calls = [0]

        def once_more(*a, **k):
            calls[0] += 1
            if calls[0] == 1:   # the forward itself
                return forward(*a, **k)
            with acting_for(inst.owner):   # in the backward, possibly in a device thread
                return forward(*a, **k)

        return checkpoint(once_more, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return run_block


# ---------------------------------------------------------------------------- row-chunked attention
def _hooked(module: torch.nn.Module, name: str) -> bool:
    point = getattr(module, name, None)
    return isinstance(point, torch.nn.Module) and bool(point._forward_hooks or point._forward_pre_hooks)


def _row_chunked(attention: torch.nn.Module, forward: Callable, inst: Installation, budget: int) -> Callable:
    def run_attention(*args, **kwargs):
        if not inst.acting() or _hooked(attention, "hook_attn_scores") or _hooked(attention, "hook_pattern"):
            return forward(*args, **kwargs)
        with _DeferScores(budget):
            return forward(*args, **kwargs)
    return run_attention


@dataclass
class _Node:
    """One recorded operation on deferred rows: ``func(*args, **kwargs)`` where an argument is a
    :class:`_Ref` (an earlier node or an input, row-sliced or whole) or a constant."""

    func: Callable
    args: tuple
    kwargs: dict
    shape: torch.Size
    dtype: torch.dtype


@dataclass(frozen=True)
class _Ref:
    kind: str      # "node" or "input"
    index: int
    rows: bool     # an input sliced to the chunk's rows


@dataclass
class _Plan:
    """The recorded computation of the deferred tensors of one score product: its nodes (the first is
    the product ``inputs[0] @ inputs[1]`` on the rows) and the real tensors they read."""

    n_rows: int
    budget: int
    nodes: list[_Node] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)

    def input_ref(self, tensor: torch.Tensor, rows: bool) -> _Ref:
        for i, t in enumerate(self.inputs):
            if t is tensor:
                return _Ref("input", i, rows)
        self.inputs.append(tensor)
        return _Ref("input", len(self.inputs) - 1, rows)

    def chunk(self, node: int) -> int:
        shape = self.nodes[node].shape
        per_row = max(1, shape[:-2].numel() * shape[-1] * ROW_CHUNK_ENTRY_BYTES)
        return max(1, min(self.n_rows, self.budget // per_row))

    def evaluate(self, node: int, start: int, stop: int, fetch: Callable[[_Ref], torch.Tensor],
                 observe: "Callable[[int, torch.Tensor], None] | None" = None) -> torch.Tensor:
        """Rows ``start:stop`` of node ``node``; ``fetch`` gives an input (its rows when ``ref.rows``), and
        ``observe`` sees every node's value as it is computed. Nodes are computed in recording order (each
        reads only earlier ones), and each value is dropped after its last reader, so a chunk holds few
        ``[…, rows, key]`` tensors at a time."""
        needed, stack = set(), [node]
        while stack:
            i = stack.pop()
            if i not in needed:
                needed.add(i)
                stack += [r.index for r in _refs(self.nodes[i]) if r.kind == "node"]
        last_reader = {}
        for i in sorted(needed):
            for r in _refs(self.nodes[i]):
                if r.kind == "node":
                    last_reader[r.index] = i
        values: dict[int, torch.Tensor] = {}
        for i in sorted(needed):
            n = self.nodes[i]
            values[i] = n.func(*_resolve(n.args, values, fetch), **_resolve(n.kwargs, values, fetch))
            if observe is not None:
                observe(i, values[i])
            for r in _refs(n):
                if r.kind == "node" and last_reader[r.index] == i and r.index != node:
                    values.pop(r.index, None)
        return values[node]


# No recursive closures in this module: a nested function that calls itself is a reference cycle
# (function ↔ closure cell) that keeps what it captures (a plan and its q, k, v) alive until Python's
# cyclic collector runs, which a backward, allocating few Python objects, rarely triggers.
def _refs(n: _Node) -> list[_Ref]:
    return _nested((n.args, tuple(n.kwargs.values())), _Ref)


def _nested(values, kind: type) -> list:
    """The items of type ``kind`` anywhere in nested lists and tuples."""
    out, stack = [], [values]
    while stack:
        a = stack.pop()
        if isinstance(a, kind):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            stack += reversed(a)
    return out


def _resolve(arg, values: dict, fetch: Callable):
    if isinstance(arg, _Ref):
        return fetch(arg) if arg.kind == "input" else values[arg.index]
    if isinstance(arg, dict):
        return {k: _resolve(v, values, fetch) for k, v in arg.items()}
    if isinstance(arg, (list, tuple)):
        return type(arg)(_resolve(a, values, fetch) for a in arg)
    return arg


class _Deferred(torch.Tensor):
    """A ``[…, query, key]`` tensor that is not computed: node ``node`` of ``plan``. Any operation the
    plan cannot take row by row computes it in full first; an operation that reaches the dispatcher
    without passing :meth:`__torch_function__` is refused rather than run on a tensor without data."""

    plan: _Plan
    node: int

    @staticmethod
    def __new__(cls, plan: _Plan, node: int):
        spec = plan.nodes[node]
        device = plan.inputs[0].device
        out = torch.Tensor._make_wrapper_subclass(cls, spec.shape, dtype=spec.dtype, device=device)
        out.plan, out.node = plan, node
        return out

    def __repr__(self) -> str:  # noqa: D105 (no data to print)
        return f"_Deferred(shape={tuple(self.shape)}, dtype={self.dtype}, node={self.node})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        with torch._C.DisableTorchFunctionSubclass():
            if name == "__get__" or name in _METADATA:
                return func(*args, **kwargs)
            deferred = _deferred_args(args, kwargs)
            plan = deferred[0].plan
            if any(d.plan is not plan for d in deferred):
                return func(*_materialized(args), **_materialized(kwargs))
            if name in _MATMUL and len(args) == 2 and isinstance(args[0], _Deferred) and _is_values(args[0], args[1]):
                return _attend(args[0], args[1])
            recorded = _record(plan, func, name, args, kwargs)
            if recorded is not None:
                return recorded
            return func(*_materialized(args), **_materialized(kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            f"cage_lens long-context mode: deferred attention scores reached {func} without passing "
            "__torch_function__; run without the long-context mode"
        )


#: read-only facts about a tensor, answered by the wrapper itself
_METADATA = {"size", "dim", "numel", "is_floating_point", "is_complex", "element_size", "stride", "__len__",
             "get_device", "is_contiguous", "requires_grad_"}
_MATMUL = {"matmul", "__matmul__"}
#: operations that act on each row of ``[…, query, key]`` separately: element-wise, casts, and ``softmax``
#: (and reductions) along the key axis
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "true_divide", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
    "__truediv__", "__rtruediv__", "__neg__", "neg", "tanh", "exp", "abs", "where", "masked_fill", "isnan", "isinf",
    "isneginf", "isposinf", "logical_not", "__invert__", "__and__", "__or__", "eq", "ne", "lt", "le", "gt", "ge",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "zeros_like", "ones_like", "full_like", "nan_to_num",
    "to", "type_as", "float", "double", "half", "bfloat16", "clone", "contiguous", "detach", "clamp", "clamp_min",
    "clamp_max", "maximum", "minimum", "sigmoid",
}
_IN_PLACE = {
    "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "masked_fill_": "masked_fill",
    "nan_to_num_": "nan_to_num", "clamp_": "clamp", "tanh_": "tanh", "__iadd__": "add", "__isub__": "sub",
    "__imul__": "mul", "__itruediv__": "div",
}
_ALONG_KEYS = {"softmax", "log_softmax", "_softmax"}
_REDUCTIONS = {"all", "any", "amax", "amin", "sum", "logsumexp"}
_SOFTMAX = {"softmax", "_softmax"}
_ACROSS_KEYS = _ALONG_KEYS | _REDUCTIONS


def _deferred_args(args, kwargs) -> list[_Deferred]:
    return _nested((args, tuple(kwargs.values())), _Deferred)


def _materialize(d: _Deferred) -> torch.Tensor:
    plan = d.plan
    with torch._C.DisableTorchFunctionSubclass():
        return plan.evaluate(d.node, 0, plan.n_rows, lambda ref: plan.inputs[ref.index])


def _materialized(value):
    if isinstance(value, _Deferred):
        return _materialize(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_materialized(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialized(v) for k, v in value.items()}
    return value


def _key_axis(dim, ndim: int) -> bool:
    return dim is not None and not isinstance(dim, (list, tuple)) and int(dim) % ndim == ndim - 1


def _row_local(name: str, args, kwargs, ndim: int) -> bool:
    if name in _ELEMENTWISE:
        return not (name == "to" and any(isinstance(a, torch.Tensor) for a in args[1:]))
    if name in _ALONG_KEYS:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        return _key_axis(dim, ndim)
    if name in _REDUCTIONS:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        return bool(keep) and _key_axis(dim, ndim)
    if name == "dropout":
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        return p == 0 or not training
    return False


def _record(plan: _Plan, func, name: str, args, kwargs) -> "_Deferred | None":
    """Record ``func`` as a node when it acts row by row; ``None`` when it does not."""
    in_place = name in _IN_PLACE
    ndim = len(plan.nodes[0].shape)
    if not _row_local(_IN_PLACE.get(name, name), args, kwargs, ndim):
        return None
    if in_place:
        func = getattr(torch.Tensor, _IN_PLACE[name])

    node_args, node_kwargs = _as_ref(plan, args), {k: _as_ref(plan, v) for k, v in kwargs.items()}
    # shape and dtype from the first row (also proves the operation runs on these arguments)
    probe = _Node(func, node_args, node_kwargs, torch.Size(()), torch.float32)
    plan.nodes.append(probe)
    with torch.no_grad():
        sample = plan.evaluate(len(plan.nodes) - 1, 0, 1, lambda r: _input_rows(plan, r, 0, 1))
    if sample.dim() < 2 or sample.shape[-2] != 1:
        plan.nodes.pop()
        return None
    probe.shape, probe.dtype = torch.Size((*sample.shape[:-2], plan.n_rows, sample.shape[-1])), sample.dtype
    if in_place:
        target = args[0]
        if not isinstance(target, _Deferred):
            plan.nodes.pop()
            return None
        target.node = len(plan.nodes) - 1
        return target
    return _Deferred(plan, len(plan.nodes) - 1)


def _as_ref(plan: _Plan, a):
    """An argument of a recorded operation: a deferred tensor or a real tensor as a :class:`_Ref`, else itself."""
    if isinstance(a, _Deferred):
        return _Ref("node", a.node, False)
    if isinstance(a, torch.Tensor):
        rows = a.dim() >= 2 and a.shape[-2] == plan.n_rows and plan.n_rows > 1
        return plan.input_ref(a, rows)
    if isinstance(a, (list, tuple)):
        return type(a)(_as_ref(plan, x) for x in a)
    return a


def _input_rows(plan: _Plan, ref: _Ref, start: int, stop: int) -> torch.Tensor:
    t = plan.inputs[ref.index]
    return t[..., start:stop, :] if ref.rows else t


def _is_values(d: _Deferred, v) -> bool:
    return (isinstance(v, torch.Tensor) and not isinstance(v, _Deferred) and v.dim() == d.dim()
            and v.shape[-2] == d.shape[-1])


class _DeferScores(TorchFunctionMode):
    """Inside one attention forward: ``q @ kᵀ`` of two ``[batch, head, pos, d_head]``-shaped operands
    becomes a deferred tensor (see the module docstring)."""

    def __init__(self, budget: int):
        super().__init__()
        self.budget = budget

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (getattr(func, "__name__", "") in _MATMUL and not kwargs and len(args) == 2 and _score_operands(*args)
                and _eager_bytes(*args) > EAGER_MULTIPLE * self.budget):
            q, k_t = args
            plan = _Plan(n_rows=q.shape[-2], budget=self.budget)
            root = _Node(torch.matmul, (_Ref("input", 0, True), _Ref("input", 1, False)), {},
                         torch.broadcast_shapes(q.shape[:-2], k_t.shape[:-2]) + (q.shape[-2], k_t.shape[-1]),
                         torch.result_type(q, k_t))
            plan.inputs += [q, k_t]
            plan.nodes.append(root)
            return _Deferred(plan, 0)
        return func(*args, **kwargs)


def _eager_bytes(q: torch.Tensor, k_t: torch.Tensor) -> int:
    """What one layer's eager attention backward holds: a few float32 ``[batch, head, query, key]`` tensors."""
    shape = torch.broadcast_shapes(q.shape[:-2], k_t.shape[:-2])
    return shape.numel() * q.shape[-2] * k_t.shape[-1] * ROW_CHUNK_ENTRY_BYTES


def _score_operands(a, b) -> bool:
    return (type(a) is torch.Tensor and type(b) is torch.Tensor and a.dim() == 4 and b.dim() == 4
            and a.shape[-1] == b.shape[-2] and a.shape[-2] > 1 and b.shape[-1] > 1 and a.is_floating_point())


def _attend(d: _Deferred, v: torch.Tensor) -> torch.Tensor:
    plan = d.plan
    return _RowChunkedProduct.apply(_Structure(plan.nodes, d.node, plan.n_rows, plan.chunk(d.node)), v, *plan.inputs)


@dataclass(frozen=True)
class _Structure:
    """A plan without its tensors (what the autograd node keeps besides its saved tensors)."""

    nodes: list
    node: int
    n_rows: int
    chunk: int

    def plan(self) -> _Plan:
        return _Plan(self.n_rows, 0, list(self.nodes))

    def chunks(self) -> list[tuple[int, int]]:
        """Each chunk's rows, ``(start, stop)``."""
        return [(start, min(self.n_rows, start + self.chunk)) for start in range(0, self.n_rows, self.chunk)]

    @property
    def n_keys(self) -> int:
        return self.nodes[0].shape[-1]

    def softmaxes(self) -> set[int]:
        return {i for i, n in enumerate(self.nodes) if _name(n.func) in _SOFTMAX}

    def may_cut_keys(self) -> bool:
        """A self-attention (as many keys as query rows) whose only operation across keys is a softmax."""
        return self.n_keys == self.n_rows and not any(_name(n.func) in _ACROSS_KEYS - _SOFTMAX for n in self.nodes)

    def is_key_cut(self, ref: _Ref, tensor: torch.Tensor, keys: int) -> bool:
        """Whether the backward of a chunk that reads ``keys`` keys reads this input's first ``keys`` entries
        of its last axis: every input along the key axis but the query rows (``inputs[0]``, of the root
        product ``q @ kᵀ``, whose last axis is the head's)."""
        return (keys < self.n_keys and ref.kind == "input" and ref.index != 0 and tensor.dim() >= 1
                and tensor.shape[-1] == self.n_keys)

    def key_cut(self, ref: _Ref, tensor: torch.Tensor, keys: int) -> torch.Tensor:
        return tensor[..., :keys] if self.is_key_cut(ref, tensor, keys) else tensor


def _name(func) -> str:
    return getattr(func, "__name__", "")


class _RowChunkedProduct(torch.autograd.Function):
    """``pattern @ v`` with the pattern computed ``chunk`` query rows at a time in the forward and
    recomputed the same way in the backward (flash-attention style, with TransformerLens' own
    operations in between). Where the forward finds a chunk's rows blind to every key from its last
    row on (a causal mask: :class:`_CausalTail`), its backward reads only the keys before."""

    @staticmethod
    def forward(ctx, structure: _Structure, v: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        plan = structure.plan()
        plan.inputs = list(inputs)
        parts, extents = [], []
        for start, stop in structure.chunks():
            tail = _CausalTail(structure, stop)
            pattern = plan.evaluate(structure.node, start, stop, lambda r: _input_rows(plan, r, start, stop), tail)
            parts.append(torch.matmul(pattern, v))
            extents.append(causal_key_extent(stop, structure.n_keys) if tail.blind else structure.n_keys)
        ctx.structure, ctx.extents = structure, extents
        ctx.save_for_backward(v, *inputs)
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        structure = ctx.structure
        v, *inputs = ctx.saved_tensors
        plan = structure.plan()
        plan.inputs = inputs
        needs = ctx.needs_input_grad[1:]
        # an input every chunk reads whole (k, v) gets a gradient from each chunk: summed in float32, in
        # place into the first computed chunk's (a copy: under a backward vectorised over rows, the CAGE
        # table's ``is_grads_batched``, gradients carry a row dimension the saved tensors lack), so that a 16-bit
        # model's sum over hundreds of chunks is not rounded to 8 bits at every step
        whole: dict[int, torch.Tensor] = {}
        by_rows: dict[int, dict[int, torch.Tensor]] = {}
        # largest first: each chunk's blocks then fit the next, smaller one
        for (start, stop), keys in reversed(list(zip(structure.chunks(), ctx.extents))):
            leaves: dict[_Ref, torch.Tensor] = {}

            def fetch(ref: _Ref) -> torch.Tensor:
                if ref not in leaves:
                    leaf = structure.key_cut(ref, _input_rows(plan, ref, start, stop), keys).detach()
                    leaves[ref] = leaf.requires_grad_(needs[1 + ref.index] and leaf.is_floating_point())
                return leaves[ref]

            with torch.enable_grad():
                v_leaf = v[..., :keys, :].detach().requires_grad_(needs[0])
                out = torch.matmul(plan.evaluate(structure.node, start, stop, fetch), v_leaf)
                wrt = ([v_leaf] if needs[0] else []) + [t for t in leaves.values() if t.requires_grad]
                if not wrt:
                    continue
                found = dict(zip(map(id, wrt), torch.autograd.grad(out, wrt, grad_out[..., start:stop, :],
                                                                    allow_unused=True)))
            key_axes = [(0, v_leaf, False, -2)] + [
                (1 + r.index, t, r.rows, -1 if structure.is_key_cut(r, inputs[r.index], keys) else None)
                for r, t in leaves.items()]
            for index, leaf, rows, key_axis in key_axes:
                g = found.get(id(leaf))
                if g is None:
                    continue
                if keys == structure.n_keys:
                    key_axis = None
                elif key_axis is not None and (rows or index not in whole):
                    g, key_axis = _keys_padded(g, key_axis, structure.n_keys), None
                if rows:
                    by_rows.setdefault(index, {})[start] = g
                elif index not in whole:
                    whole[index] = g.to(torch.promote_types(g.dtype, torch.float32), copy=True)
                elif key_axis is None:
                    whole[index].add_(g)
                else:
                    whole[index].narrow(key_axis, 0, keys).add_(g)
        grads = []
        for index, (t, need) in enumerate(zip([v, *inputs], needs)):
            summed = whole.get(index)
            parts = [None if summed is None else summed.to(t.dtype), _joined_rows(by_rows.get(index), t, structure)]
            parts = [part for part in parts if part is not None]
            grads.append(None if not need else sum(parts[1:], parts[0]) if parts else torch.zeros_like(t))
        return (None, *grads)


class _CausalTail:
    """Watches one chunk's evaluation in the forward: ``blind`` stays true while every softmax over the keys
    and the pattern itself are exactly zero from key ``stop`` on — the chunk's rows then neither read nor
    pass gradient to those keys (a softmax's gradient at a zero probability is zero), so its backward may
    leave them out. Only for a structure whose sole operation across keys is the softmax
    (:meth:`_Structure.may_cut_keys`): a sum or maximum over keys would change without the tail."""

    def __init__(self, structure: _Structure, stop: int):
        self.stop, self.watched = stop, structure.softmaxes() | {structure.node}
        self.blind = structure.may_cut_keys() and stop < structure.n_keys

    def __call__(self, node: int, value: torch.Tensor) -> None:
        if self.blind and node in self.watched:
            self.blind = not bool(value[..., self.stop:].any())


def _keys_padded(g: torch.Tensor, key_axis: int, n_keys: int) -> torch.Tensor:
    """A gradient over the first keys extended with zeros to all ``n_keys`` (along ``key_axis``, -1 or -2)."""
    missing = n_keys - g.shape[key_axis]
    return torch.nn.functional.pad(g, (0, missing) if key_axis == -1 else (0, 0, 0, missing))


def _joined_rows(chunks: "dict[int, torch.Tensor] | None", like: torch.Tensor, structure: _Structure):
    """The gradient of a row-sliced input from its chunks' gradients (zeros where a chunk gave none)."""
    if not chunks:
        return None
    pieces = []
    for start, stop in structure.chunks():
        pieces.append(chunks[start] if start in chunks else torch.zeros_like(like[..., start:stop, :]))
    return torch.cat(pieces, dim=-2)
