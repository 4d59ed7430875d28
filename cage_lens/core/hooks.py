"""Hook records and their installation (layer 5 of :mod:`cage_lens.core`; docs/rules.md#engine).

A hook is data until it is installed: :class:`PointHook` (a TransformerLens hook ``fn(tensor, hook)``
on a hook point), :class:`ModuleHook` / :class:`ModulePreHook` (forward hooks on a module without a
hook point). :func:`installed` puts a list of them on one model for the duration of one call:

- **Per-call state, thread-guarded hooks.** Hooks are registered directly on the hook points and
  modules and act only in the thread that installed them; a forward run by another thread meanwhile
  passes through them untouched. They never go through ``model.hooks()``, whose context-level
  bookkeeping is shared by all threads.
- **The backward of a call acts like the call.** A block recomputed in the backward (the long-context
  mode of :mod:`cage_lens.core.recompute`) runs its forward again, and on a GPU autograd runs the
  backward in a device thread: inside :func:`acting_for` the hooks of the installing thread act there too.
- :func:`session` is one cage_lens call: the model's lock (one call per model at a time, so
  concurrent calls return the serial results) and autograd switched on, also inside
  ``torch.inference_mode()`` or ``torch.no_grad()``; what a forward sets on the model's modules is
  put back when it ends, and what bridges keep from each forward is dropped as soon as it is set.

:func:`fired_hooks` finds, once per model state, which hook points actually fire in a forward pass
(``hook_pos_embed`` is listed but silent on rotary bridges).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from cage_lens.core.adapter import ModelAdapter, walk_modules
from cage_lens.errors import CageLensError, UnsupportedModelError

__all__ = [
    "PointHook", "ModuleHook", "ModulePreHook", "as_hook", "Installation", "installed", "acting_for", "session",
    "fired_hooks", "fires", "has_position_embedding", "RETAINED_ATTRIBUTES",
]


# ---------------------------------------------------------------------------- hook records
@dataclass(frozen=True)
class PointHook:
    """A TransformerLens hook ``fn(tensor, hook)`` on a hook point (legacy name or HookPoint object).
    ``first`` installs it ahead of the hooks already there (see :func:`installed`)."""

    point: object
    fn: object
    first: bool = False


@dataclass(frozen=True)
class ModuleHook:
    """A forward hook ``fn(module, args, kwargs, output) -> output | None`` on a module."""

    module: torch.nn.Module
    fn: object


@dataclass(frozen=True)
class ModulePreHook:
    """A forward pre-hook ``fn(module, args, kwargs) -> (args, kwargs) | None`` on a module."""

    module: torch.nn.Module
    fn: object


def as_hook(h) -> "PointHook | ModuleHook | ModulePreHook":
    """A hook record, from a record or a TransformerLens ``(name, fn)`` pair."""
    return h if isinstance(h, (PointHook, ModuleHook, ModulePreHook)) else PointHook(*h)


# ---------------------------------------------------------------------------- installation
#: per thread: the installing threads whose hooks act here too (see :func:`acting_for`)
_ADMITTED = threading.local()


def _admitted() -> tuple[int, ...]:
    return getattr(_ADMITTED, "owners", ())


@contextlib.contextmanager
def acting_for(owner: int) -> Iterator[None]:
    """Inside this block, hooks installed by thread ``owner`` act in the current thread as in their own:
    for the part of a call's work that autograd runs elsewhere (a block recomputed in the backward,
    which on a GPU runs in the device's own thread)."""
    before = _admitted()
    _ADMITTED.owners = before + (owner,)
    try:
        yield
    finally:
        _ADMITTED.owners = before


class Installation:
    """Hooks installed by one call: they act only in the installing thread (and where that thread's
    work is admitted, :func:`acting_for`), and not while suspended."""

    def __init__(self):
        self.owner = threading.get_ident()
        self.suspended = False
        self.handles: list[Callable[[], None]] = []

    def acting(self) -> bool:
        return not self.suspended and (threading.get_ident() == self.owner or self.owner in _admitted())


def _hook_point(adapter: ModelAdapter, point):
    if not isinstance(point, str):
        return point
    try:
        return adapter.hook_points[point]
    except KeyError:
        raise UnsupportedModelError(f"the model has no hook point {point!r}") from None


def _add_point_hook(hook_point, fn: Callable, inst: Installation, first: bool = False):
    """Returns the torch handle id of the hook and the function that removes it."""
    def guarded(tensor, hook):
        if not inst.acting():
            return None
        return fn(tensor, hook)

    if hasattr(hook_point, "hook_conversion"):
        # TL 3/4 HookPoint: add_hook applies the point's shape conversion and lists the handle, which
        # some bridge components consult (has_hooks). Marked permanent so that another thread's
        # reset_hooks() leaves it alone; removed below by handle, never by level.
        handle = hook_point.add_hook(guarded, dir="fwd", is_permanent=True, prepend=first)

        def remove():
            handle.hook.remove()
            with contextlib.suppress(ValueError):
                hook_point.fwd_hooks.remove(handle)
        return handle.hook.id, remove
    # TL 2 HookPoint: a plain torch forward hook (TL 2's add_hook returns no handle)
    torch_handle = hook_point.register_forward_hook(lambda module, inputs, output: guarded(output, hook_point),
                                                    prepend=first)
    return torch_handle.id, torch_handle.remove


def _add_module_hook(module: torch.nn.Module, fn: Callable, inst: Installation):
    def guarded(mod, args, kwargs, output):
        if not inst.acting():
            return None
        return fn(mod, args, kwargs, output)

    handle = module.register_forward_hook(guarded, with_kwargs=True)
    return handle.id, handle.remove


def _add_module_pre_hook(module: torch.nn.Module, fn: Callable, inst: Installation):
    def guarded(mod, args, kwargs):
        if not inst.acting():
            return None
        return fn(mod, args, kwargs)

    handle = module.register_forward_pre_hook(guarded, with_kwargs=True)
    return handle.id, handle.remove


def _installer(adapter: ModelAdapter, h, inst: Installation):
    if isinstance(h, ModuleHook):
        return _add_module_hook(h.module, h.fn, inst)
    if isinstance(h, ModulePreHook):
        return _add_module_pre_hook(h.module, h.fn, inst)
    return _add_point_hook(_hook_point(adapter, h.point), h.fn, inst, h.first)


@contextlib.contextmanager
def installed(adapter: ModelAdapter, hooks: Sequence) -> Iterator[Installation]:
    """Install ``hooks`` (PointHook / ModuleHook, in order) for this thread; remove them on exit.

    A ``PointHook`` with ``first=True`` goes ahead of the hooks already on its point. Captures use
    it at the points where the rules keep a tensor for later (a norm's input, an MLP's
    pre-activations): a bridge hook point with a shape conversion hands every hook its own converted
    view, and the rules must compute on the view the capture returned, so that the captured tensor is
    the one the gradient reaches."""
    inst = Installation()
    ids = []
    try:
        for h in hooks:
            handle_id, remove = _installer(adapter, h, inst)
            adapter.call_hooks.add(handle_id)  # a call's own hooks are not a change of the model's state
            ids.append(handle_id)
            inst.handles.append(remove)
        yield inst
    finally:
        for remove in reversed(inst.handles):
            remove()
        # the removers reach the hooks and the hooks this installation: a reference cycle that would keep
        # everything the hooks captured (a call's activations) alive until Python's cyclic collector runs
        inst.handles.clear()
        adapter.call_hooks.difference_update(ids)


@contextlib.contextmanager
def session(adapter: ModelAdapter, grad: bool = True) -> Iterator[None]:
    """One cage_lens call: the model's lock, autograd on (also under ``torch.inference_mode``)."""
    mode = torch.enable_grad() if grad else torch.no_grad()
    with adapter.lock, torch.inference_mode(False), mode, _attributes_kept(adapter):
        try:
            with installed(adapter, [as_hook(r) for r in adapter.repairs()]):  # ModelAdapter.repairs
                yield
        except RuntimeError as exc:
            if "Inference tensors" in str(exc):
                raise CageLensError(
                    "the model holds tensors created under torch.inference_mode() (e.g. caches filled by an "
                    "earlier forward there), which autograd cannot use; build or run the model once outside "
                    "inference_mode before computing relevance"
                ) from None
            raise


#: per thread: the models with an open session (only the outermost session of a model restores)
_THIS_THREAD = threading.local()

#: attributes in which TransformerLens components keep a tensor of their last forward: TL 4's
#: ``JointQKVAttentionBridge`` keeps every layer's attention pattern, ``[batch, head, pos, pos]``, with
#: its autograd history, which would hold ``layers · heads · pos²`` numbers until the call ends
RETAINED_ATTRIBUTES = ("_pattern",)


@contextlib.contextmanager
def _attributes_kept(adapter: ModelAdapter) -> Iterator[None]:
    """Put back every tensor attribute that a forward inside the outermost session of this thread set
    on a module of the model (a bridge keeps each attention's last pattern, ``_pattern``, which under a
    cage_lens call would hold autograd history and make ``copy.deepcopy(model)`` fail): the user's
    model keeps what it held before the call (docs/transformerlens.md#the-users-model-stays-the-users).
    A :data:`RETAINED_ATTRIBUTES` entry is put back as soon as the module's forward returns, so that a
    long prompt does not keep every layer's pattern alive through the backward
    (docs/long_context.md#what-the-model-keeps)."""
    model = adapter.model
    open_sessions = _THIS_THREAD.__dict__.setdefault("models", set())
    if id(model) in open_sessions:  # an inner session: the outermost one restores
        yield
        return
    before = [(module, dict(module.__dict__)) for _, module in walk_modules(model)]
    retaining = [(module, saved) for module, saved in before if any(name in saved for name in RETAINED_ATTRIBUTES)]
    open_sessions.add(id(model))
    try:
        with installed(adapter, [ModuleHook(module, _put_back(saved)) for module, saved in retaining]):
            yield
    finally:
        open_sessions.discard(id(model))
        for module, saved in before:
            _restore_tensor_attributes(module, saved)


def _put_back(saved: dict) -> Callable:
    def hook(module, args, kwargs, output):
        for name in RETAINED_ATTRIBUTES:
            if name in saved:
                module.__dict__[name] = saved[name]
    return hook


_MISSING = object()


def _restore_tensor_attributes(module: torch.nn.Module, saved: dict) -> None:
    attributes = module.__dict__
    for name, value in list(attributes.items()):
        old = saved.get(name, _MISSING)
        if old is value or not isinstance(value, torch.Tensor):
            continue
        if old is _MISSING:
            del attributes[name]
        else:
            attributes[name] = old


# ---------------------------------------------------------------------------- which hooks fire
def fired_hooks(adapter: ModelAdapter) -> frozenset[str]:
    """Hook names that actually fire in a forward pass of ``adapter.model`` (``hook_pos_embed`` is
    listed but silent on rotary bridges; MoE experts fire only when routed to, so those are not
    required to). Found once per model state with a short probe and kept on the adapter."""
    if adapter.fired is None:
        adapter.fired = _probe_fired(adapter)
        adapter.settle()
    return adapter.fired


def _probe_fired(adapter: ModelAdapter) -> frozenset[str]:
    fired: set[str] = set()
    candidates = adapter.required_hooks() + ([adapter.pos_embed_hook] if adapter.pos_embed_hook else [])
    candidates = [n for n in dict.fromkeys(candidates + adapter.optional_hooks()) if n in adapter.hook_points]

    def recorder(name):
        def hook(tensor, hook):
            fired.add(name)
        return hook

    probe = torch.zeros((1, 2), dtype=torch.long, device=adapter.device)
    with session(adapter, grad=False), installed(adapter, [PointHook(n, recorder(n)) for n in candidates]):
        adapter.model(probe)
    routed = adapter.expert_hooks()
    silent = [n for n in adapter.required_hooks() if n not in fired and n not in routed]
    if silent:
        raise UnsupportedModelError(f"these hook points exist but never fire in a forward pass: {', '.join(silent[:6])}")
    return frozenset(fired)


def fires(adapter: ModelAdapter, name: str | None) -> bool:
    """Whether the hook point ``name`` fires in a forward pass (see :func:`fired_hooks`)."""
    return name is not None and name in fired_hooks(adapter)


def has_position_embedding(adapter: ModelAdapter) -> bool:
    """Whether the model adds a learned position embedding that fires (not rotary, not ALiBi)."""
    return fires(adapter, adapter.pos_embed_hook)
