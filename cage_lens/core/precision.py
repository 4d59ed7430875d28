"""Floating-point precision: unit roundoffs, the rounding error model of the certificate, and exact
float32 copies of 16-bit models (layer 3 of :mod:`cage_lens.core`; docs/rules.md#precision).

A bfloat16 or float16 number converts to float32 exactly, so :func:`upcast_copy` gives the *same
rounded weights* computed in float32: the completeness certificate probes 16-bit models on such a copy
(docs/rules.md#completeness-certificate) and ``precision="float32"`` computes relevance on one. The
user's model is never touched: the copy is a new module tree (a forward in another thread meanwhile
sees the model as it was).
"""

from __future__ import annotations

import copy

import torch

from cage_lens.errors import InputError

__all__ = [
    "UNIT_ROUNDOFF", "LOW_PRECISION", "PRECISIONS", "effective_roundoff", "is_low_precision", "upcast_copy",
    "float32_copy_bytes", "check_precision",
]

#: unit roundoff u (round to nearest: half the distance from 1 to the next number) of each storage dtype
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
#: dtypes whose models the certificate probes on a float32 copy and ``precision="float32"`` upcasts
LOW_PRECISION = (torch.bfloat16, torch.float16)
#: the values of the ``precision=`` option: the model's own dtype, or at least float32
PRECISIONS = ("model", "float32")


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype in LOW_PRECISION


def effective_roundoff(dtype: torch.dtype, contraction: int) -> float:
    """Relative rounding of one stored activation or gradient of a model computing in ``dtype``: the
    rounding to ``dtype`` itself plus the accumulation error of the dot product that produced it
    (matrix products of 16-bit and float32 inputs accumulate in float32, float64 in float64; a sum of
    ``contraction`` terms carries about ``sqrt(contraction)`` roundings of its accumulator under the
    probabilistic model, docs/rules.md#precision)."""
    accumulator = torch.float64 if dtype == torch.float64 else torch.float32
    return UNIT_ROUNDOFF[dtype] + contraction**0.5 * UNIT_ROUNDOFF[accumulator]


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def float32_copy_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of a float32 :func:`upcast_copy` (16-bit ones at 4 bytes per number)."""
    return sum(t.numel() * (4 if is_low_precision(t.dtype) else t.element_size()) for t in _tensors(model))


#: the torch hook dictionaries of a module (keyed by handle id)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _strip_hooks(model: torch.nn.Module, ids: set[int]) -> None:
    """Remove the hooks with handle ids ``ids`` from every module of ``model`` (and from the handle
    lists of TransformerLens hook points)."""
    for module in model.modules():
        for name in _HOOK_DICTS:
            hooks = module.__dict__.get(name)
            for key in ids & set(hooks or ()):
                del hooks[key]
        for name in ("fwd_hooks", "bwd_hooks"):
            handles = module.__dict__.get(name)
            if isinstance(handles, list):
                handles[:] = [h for h in handles if getattr(getattr(h, "hook", None), "id", None) not in ids]


def _bridge_wired_hooks(model: torch.nn.Module) -> set[int]:
    """Handle ids of the hooks a TransformerLens 4 block bridge wires on its submodules in its first
    forward (``_capture_hook_handles``). Their functions hold weak proxies of the block they were
    wired for, so in a copy they would write into, and call hook points of, the *original* model; the
    copy forgets them and wires its own in its first forward (``_capture_hooks_wired``)."""
    ids = set()
    for module in model.modules():
        handles = module.__dict__.get("_capture_hook_handles")
        if isinstance(handles, list):
            ids |= {h.id for h in handles if hasattr(h, "id")}
            module.__dict__["_capture_hook_handles"] = []
            module.__dict__["_capture_hooks_wired"] = False
    return ids


def upcast_copy(model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                without_hooks: set[int] = frozenset()) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters and buffers of a narrower floating dtype are ``dtype``
    (an exact conversion: the same rounded weights and constants), built without an intermediate copy
    in the old dtype (peak: the new tensors). The tokenizer is shared; ``cfg.dtype`` (where the model
    has one: TransformerLens casts attention patterns to it) says ``dtype``; the hooks with handle ids
    ``without_hooks`` (those of running cage_lens calls) are left out, and so are a bridge's self-wired
    ones (see :func:`_bridge_wired_hooks`); the user's own hooks are copied (the functions themselves:
    a hook that refers to a module of the model acts on that module). The model itself is only read."""
    bits = torch.finfo(dtype).bits
    memo: dict[int, object] = {}
    with torch.no_grad():
        for t in _tensors(model):
            if t.is_floating_point() and torch.finfo(t.dtype).bits < bits:
                wide = t.detach().to(dtype)
                memo[id(t)] = torch.nn.Parameter(wide, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else wide
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        memo[id(tokenizer)] = tokenizer
    twin = copy.deepcopy(model, memo)
    _strip_hooks(twin, set(without_hooks) | _bridge_wired_hooks(twin))
    cfg = getattr(twin, "cfg", None)
    old = getattr(cfg, "dtype", None)
    if isinstance(old, torch.dtype) and old.is_floating_point and torch.finfo(old).bits < bits:
        cfg.dtype = dtype
    return twin


def check_precision(precision: str) -> str:
    """The ``precision=`` option, checked."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision
