"""The LRP engine: installing hooks for one call, capture, the gradient call and finiteness checks.

Every gradient-based computation in cage_lens (``attribute``, the CAGE tables of
:mod:`cage_lens.methods`, the graph state of :mod:`cage_lens.graph`, the certificate) goes through
here, so these guarantees hold everywhere (docs/rules.md#engine):

- **Per-call state, thread-guarded hooks.** Hooks are registered directly on the hook points and
  modules for the duration of one call and act only in the thread that installed them; a forward
  run by another thread meanwhile passes through them untouched. They never go through
  ``model.hooks()``, whose context-level bookkeeping is shared by all threads.
- **One cage_lens call per model at a time** (a re-entrant lock on the model's adapter): concurrent
  calls return the serial results.
- **Nesting.** The rule sets active in a thread are recorded on the model's adapter: a call whose
  rules are already active (``attribute`` inside ``with lrp(model, same)``) does not apply them a
  second time; different rules inside an active block raise.
- **Autograd is available** even inside ``torch.inference_mode()`` or ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int

from cage_lens.adapter import ModelAdapter
from cage_lens.errors import CageLensError, NumericalError, UnsupportedModelError
from cage_lens.realise import ModuleHook, ModulePreHook, PointHook, realise
from cage_lens.rules import RuleSet, resolve_rules

__all__ = [
    "PointHook", "ModuleHook", "ModulePreHook", "installed", "session", "rules_active", "suspended", "certify_or_warn",
    "Capture", "select_logits", "logits_at", "run_attribution", "check_finite", "gradients",
]


# ---------------------------------------------------------------------------- installing hooks
class Installation:
    """Hooks installed by one call: they act only in the installing thread, and not while suspended."""

    def __init__(self):
        self.owner = threading.get_ident()
        self.suspended = False
        self.handles: list[Callable[[], None]] = []

    def acting(self) -> bool:
        return not self.suspended and threading.get_ident() == self.owner


def _hook_point(adapter: ModelAdapter, point):
    if not isinstance(point, str):
        return point
    try:
        return adapter.hook_points[point]
    except KeyError:
        raise UnsupportedModelError(f"the model has no hook point {point!r}") from None


def _add_point_hook(hook_point, fn: Callable, inst: Installation, first: bool = False) -> Callable[[], None]:
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
        return remove
    # TL 2 HookPoint: a plain torch forward hook (TL 2's add_hook returns no handle)
    torch_handle = hook_point.register_forward_hook(lambda module, inputs, output: guarded(output, hook_point),
                                                    prepend=first)
    return torch_handle.remove


def _add_module_hook(module: torch.nn.Module, fn: Callable, inst: Installation) -> Callable[[], None]:
    def guarded(mod, args, kwargs, output):
        if not inst.acting():
            return None
        return fn(mod, args, kwargs, output)

    return module.register_forward_hook(guarded, with_kwargs=True).remove


def _add_module_pre_hook(module: torch.nn.Module, fn: Callable, inst: Installation) -> Callable[[], None]:
    def guarded(mod, args, kwargs):
        if not inst.acting():
            return None
        return fn(mod, args, kwargs)

    return module.register_forward_pre_hook(guarded, with_kwargs=True).remove


@contextlib.contextmanager
def installed(adapter: ModelAdapter, hooks: Sequence) -> Iterator[Installation]:
    """Install ``hooks`` (PointHook / ModuleHook, in order) for this thread; remove them on exit.

    A ``PointHook`` with ``first=True`` goes ahead of the hooks already on its point. Captures use
    it at the points where the rules keep a tensor for later (a norm's input, an MLP's
    pre-activations): a bridge hook point with a shape conversion hands every hook its own converted
    view, and the rules must compute on the view the capture returned, so that the captured tensor is
    the one the gradient reaches."""
    inst = Installation()
    try:
        for h in hooks:
            if isinstance(h, ModuleHook):
                inst.handles.append(_add_module_hook(h.module, h.fn, inst))
            elif isinstance(h, ModulePreHook):
                inst.handles.append(_add_module_pre_hook(h.module, h.fn, inst))
            else:
                inst.handles.append(_add_point_hook(_hook_point(adapter, h.point), h.fn, inst, h.first))
        yield inst
    finally:
        for remove in reversed(inst.handles):
            remove()


@contextlib.contextmanager
def session(adapter: ModelAdapter, grad: bool = True) -> Iterator[None]:
    """One cage_lens call: the model's lock, autograd on (also under ``torch.inference_mode``)."""
    mode = torch.enable_grad() if grad else torch.no_grad()
    with adapter.lock, torch.inference_mode(False), mode:
        try:
            yield
        except RuntimeError as exc:
            if "Inference tensors" in str(exc):
                raise CageLensError(
                    "the model holds tensors created under torch.inference_mode() (e.g. caches filled by an "
                    "earlier forward there), which autograd cannot use; build or run the model once outside "
                    "inference_mode before computing relevance"
                ) from None
            raise


# ---------------------------------------------------------------------------- active rule sets
class _Active:
    def __init__(self, rule_set: RuleSet, inst: Installation):
        self.rule_set, self.installation = rule_set, inst


@contextlib.contextmanager
def rules_active(adapter: ModelAdapter, rules: "str | RuleSet") -> Iterator[None]:
    """Make ``rules`` active in this thread: installed unless the same rule set already is; a
    different active rule set is an error (it would be applied on top of this one)."""
    rule_set = resolve_rules(rules)
    tid = threading.get_ident()
    stack = adapter.active.get(tid)
    if stack:
        current = stack[-1].rule_set
        if current == rule_set:
            yield
            return
        raise CageLensError(
            f"rules={rule_set.name!r} was requested inside an active cage_lens.lrp(model, {current.name!r}) block; "
            f"the two would be applied on top of each other. Use rules={current.name!r} there, or call outside the block"
        )
    with installed(adapter, realise(adapter, rule_set).hooks) as inst:
        adapter.active[tid] = [_Active(rule_set, inst)]
        try:
            yield
        finally:
            adapter.active.pop(tid, None)


@contextlib.contextmanager
def suspended(adapter: ModelAdapter) -> Iterator[None]:
    """Set this thread's active rule sets aside (their hooks stop acting) for an inner computation
    that brings its own rules (the certificate)."""
    tid = threading.get_ident()
    stack = adapter.active.pop(tid, None)
    for entry in stack or ():
        entry.installation.suspended = True
    try:
        yield
    finally:
        for entry in stack or ():
            entry.installation.suspended = False
        if stack:
            adapter.active[tid] = stack


def certify_or_warn(adapter: ModelAdapter, strict: bool = True) -> list[str]:
    """Run (once per model) the completeness certificate; refuse an uncertified model unless
    ``strict=False``, which returns the warning to record in the result."""
    from cage_lens.certificate import certify

    cert = certify(adapter)
    if cert.passed:
        return []
    if strict:
        raise cert.error()
    message = f"uncertified model (strict=False): {cert.reason}"
    warnings.warn(message, stacklevel=3)
    return [message]


# ---------------------------------------------------------------------------- capture and gradients
class Capture:
    """Forward hooks that record activations so one backward call can return all their gradients.

    The ``roots`` (the embedding outputs) are re-rooted (detached, ``requires_grad``) so relevance
    exists even when the model's parameters are frozen; nothing flows into ``W_E`` (and no ``.grad``
    is written into the user's parameters: gradients are taken with ``torch.autograd.grad``).
    Every hook returns the tensor it recorded: a bridge hook point with a shape conversion
    (``hook_z``, ``hook_q`` …) hands the hook a reshaped copy and computes on with it only when the
    hook returns it, so returning it keeps the recorded tensor in the graph.
    """

    def __init__(self, names: Sequence[str] = (), roots: Sequence[str] = ()):
        self.names = list(dict.fromkeys(names))
        self.roots = set(roots)
        self.tensors: dict[str, torch.Tensor] = {}

    def hook(self, name: str) -> Callable:
        def record(tensor, hook):
            if name in self.roots:
                tensor = tensor.detach().requires_grad_(True)
            self.tensors[name] = tensor
            return tensor
        return record

    def hooks_for(self, adapter: ModelAdapter) -> list[PointHook]:
        return [PointHook(name, self.hook(name), first=adapter.is_stash_point(name)) for name in self.names]

    def gradients(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        names = [n for n in self.names if n in self.tensors]
        return gradients(value, {n: self.tensors[n] for n in names})

    def relevance(self, grads: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """Gradient × input of one captured activation, not yet summed over features."""
        return self.tensors[name].detach() * grads[name]


def gradients(value: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``∂value/∂t`` for every captured tensor (zeros where ``value`` does not depend on it)."""
    names = [n for n, t in tensors.items() if t.requires_grad]
    grads = torch.autograd.grad(value, [tensors[n] for n in names], allow_unused=True) if names else []
    found = dict(zip(names, grads))
    return {n: (torch.zeros_like(t) if found.get(n) is None else found[n]) for n, t in tensors.items()}


def check_finite(value: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(value).all():
        raise NumericalError(
            f"{what} is not finite ({value.flatten()[:4].tolist()} …); check the model for overflow "
            "(try float32/float64) and that the target is finite"
        )
    return value


# ---------------------------------------------------------------------------- forward with row selection
def _final_residual_hook(adapter: ModelAdapter) -> str | None:
    """The last hook before the unembedding, where rows can be selected before the vocab projection."""
    for name in ("unembed.hook_in", "ln_final.hook_normalized"):
        if name in adapter.hook_points:
            return name
    return None


def select_logits(
    adapter: ModelAdapter, tokens: Int[torch.Tensor, "batch pos"],
    select: Callable[[torch.Tensor], torch.Tensor], hooks: Sequence = (),
) -> torch.Tensor:
    """``select(logits)`` from one forward with ``hooks`` installed, where ``select`` picks positions
    (``[batch, pos, ·] -> [batch, k, ·]``).

    Where the model has a hook just before the unembedding, ``select`` is applied to the final
    residual instead, so only the needed rows are projected onto the vocabulary (the unembedding is a
    third of GPT-2-small's forward at 50k vocab); the kept rows' values are unchanged because the
    final norm and the unembedding act per position."""
    name, selected = _final_residual_hook(adapter), []

    def select_rows(tensor, hook):
        selected.append(True)
        return select(tensor).contiguous()

    extra = [] if name is None else [PointHook(name, select_rows)]
    with installed(adapter, [_as_hook(h) for h in hooks] + extra):
        logits = adapter.model(tokens)
    return logits if selected else select(logits)


def _as_hook(h):
    return h if isinstance(h, (PointHook, ModuleHook, ModulePreHook)) else PointHook(*h)


def logits_at(
    adapter: ModelAdapter, tokens: Int[torch.Tensor, "batch pos"], positions: Sequence[int], hooks: Sequence = ()
) -> Float[torch.Tensor, "batch vocab"]:
    """Logits of row ``b`` at ``positions[b]`` (see :func:`select_logits`)."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    where = torch.as_tensor(list(positions), device=tokens.device)
    return select_logits(adapter, tokens, lambda x: x[rows, where][:, None], hooks)[:, 0]


def input_roots(adapter: ModelAdapter) -> list[str]:
    """The hook points whose outputs are the model's inputs: token (and position) embeddings."""
    return [adapter.embed_hook] + ([adapter.pos_embed_hook] if adapter.has_position_embedding else [])


def run_attribution(
    adapter: ModelAdapter,
    batch,
    positions: list[int],
    target,
    rules: "str | RuleSet",
    capture_names: Sequence[str],
    pre_hooks: Sequence = (),
) -> tuple[torch.Tensor, Capture, dict[str, torch.Tensor]]:
    """One forward under ``rules`` with capture hooks, one backward. Returns (target value, capture,
    gradients). ``pre_hooks`` run before the captures (integrated gradients scales the embeddings
    there). The caller certifies the model first."""
    roots = input_roots(adapter)
    capture = Capture(list(roots) + list(capture_names), roots=roots)
    with session(adapter):
        tokens = batch.tokens.to(adapter.device).clone()
        with rules_active(adapter, rules):
            hooks = [_as_hook(h) for h in pre_hooks] + capture.hooks_for(adapter)
            value = check_finite(target(logits_at(adapter, tokens, positions, hooks)), "the target value")
            grads = capture.gradients(value.sum())
    return value.detach(), capture, grads


def residual_state(adapter: ModelAdapter, tensors: dict, grads: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, ∂target/∂h)`` of one residual point. ``resid_mid`` is ``resid_pre + attn_out`` with the
    gradient of ``attn_out`` (the only consumer of ``attn_out`` is that residual sum), never the
    ``hook_resid_mid`` hook point, which on some bridges feeds only the MLP."""
    if name.endswith("hook_resid_mid"):
        layer = int(name.split(".")[1])
        site = adapter.layer(layer)
        h = tensors[site.resid_pre].detach() + tensors[site.attn_out].detach()
        return h, grads[site.attn_out]
    return tensors[name].detach(), grads[name]


def residual_captures(adapter: ModelAdapter) -> list[str]:
    """The hook points to capture for every residual point of :meth:`ModelAdapter.resid_hooks`."""
    names = []
    for name in adapter.resid_hooks():
        if name.endswith("hook_resid_mid"):
            site = adapter.layer(int(name.split(".")[1]))
            names += [site.resid_pre, site.attn_out]
        else:
            names.append(name)
    return list(dict.fromkeys(names))
