"""The LRP engine: rule sets active per thread, capture, the gradient call and finiteness checks
(layer 7 of :mod:`cage_lens.core`; docs/rules.md#engine).

Every gradient-based computation in cage_lens (``attribute``, the CAGE tables of
:mod:`cage_lens.generation.methods`, the graph state of :mod:`cage_lens.circuit.state`, relevance patching,
the certificate) goes through here, on top of the thread-guarded installation of
:mod:`cage_lens.core.hooks`:

- **Nesting.** The rule sets active in a thread are recorded on the model's adapter: a call whose
  rules are already active (``attribute`` inside ``with lrp(model, same)``) does not apply them a
  second time; different rules inside an active block raise.
- **Capture.** Activations are recorded by hooks that return them, and one ``torch.autograd.grad``
  call gives every gradient; the embeddings are re-rooted so relevance exists with frozen weights.
- **Finite values.** A target or relevance that is NaN or infinite raises
  :class:`~cage_lens.NumericalError`.
- **Long context.** ``run_attribution(..., long_context=True)`` runs under
  :func:`cage_lens.core.recompute.long_context` (blocks recomputed in the backward, attention in row
  chunks): the same numbers to rounding, the memory of one layer. The caller decides the mode
  (``attribute`` asks :mod:`cage_lens.estimate`).

The engine does not certify: callers above :mod:`cage_lens.core.certificate` certify the model first.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int

from cage_lens.core.adapter import ModelAdapter
from cage_lens.core.hooks import Installation, PointHook, as_hook, has_position_embedding, installed, session
from cage_lens.core.realise import realise
from cage_lens.core.recompute import long_context as long_context_mode
from cage_lens.core.rulesets import RuleSet, resolve_rules
from cage_lens.errors import CageLensError, NumericalError

__all__ = [
    "rules_active", "suspended", "Capture", "select_logits", "logits_at", "input_roots", "run_attribution",
    "check_finite", "gradients", "residual_state", "residual_captures",
]


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
    select: Callable[[torch.Tensor], torch.Tensor], hooks: Sequence = (), row_chunked: bool = False,
) -> torch.Tensor:
    """``select(logits)`` from one forward with ``hooks`` installed, where ``select`` picks positions
    (``[batch, pos, ·] -> [batch, k, ·]``).

    Where the model has a hook just before the unembedding, ``select`` is applied to the final
    residual instead, so only the needed rows are projected onto the vocabulary (the unembedding is a
    third of GPT-2-small's forward at 50k vocab); the kept rows' values are unchanged because the
    final norm and the unembedding act per position. ``row_chunked`` (for a forward without
    gradients) computes a long sequence's attention in row chunks (:mod:`cage_lens.core.recompute`):
    no layer forms its whole ``heads · pos²`` pattern (docs/long_context.md#forwards-without-gradients)."""
    name, selected = _final_residual_hook(adapter), []

    def select_rows(tensor, hook):
        selected.append(True)
        return select(tensor).contiguous()

    extra = [] if name is None else [PointHook(name, select_rows)]
    chunked = long_context_mode(adapter) if row_chunked else contextlib.nullcontext()
    with installed(adapter, [as_hook(h) for h in hooks] + extra), chunked:
        logits = adapter.model(tokens)
    return logits if selected else select(logits)


def logits_at(
    adapter: ModelAdapter, tokens: Int[torch.Tensor, "batch pos"], positions: Sequence[int], hooks: Sequence = (),
    row_chunked: bool = False,
) -> Float[torch.Tensor, "batch vocab"]:
    """Logits of row ``b`` at ``positions[b]`` (see :func:`select_logits`), with the tokens on the model's device."""
    tokens = tokens.to(adapter.device)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    where = torch.as_tensor(list(positions), device=tokens.device)
    return select_logits(adapter, tokens, lambda x: x[rows, where][:, None], hooks, row_chunked)[:, 0]


def input_roots(adapter: ModelAdapter) -> list[str]:
    """The hook points whose outputs are the model's inputs: token (and position) embeddings."""
    return [adapter.embed_hook] + ([adapter.pos_embed_hook] if has_position_embedding(adapter) else [])


def run_attribution(
    adapter: ModelAdapter,
    batch,
    positions: list[int],
    target,
    rules: "str | RuleSet",
    capture_names: Sequence[str],
    pre_hooks: Sequence = (),
    long_context: bool = False,
) -> tuple[torch.Tensor, Capture, dict[str, torch.Tensor]]:
    """One forward under ``rules`` with capture hooks, one backward. Returns (target value, capture,
    gradients). ``pre_hooks`` run before the captures (integrated gradients scales the embeddings
    there). ``long_context`` recomputes each block in the backward and computes attention in row
    chunks (:mod:`cage_lens.core.recompute`). The caller certifies the model first."""
    roots = input_roots(adapter)
    capture = Capture(list(roots) + list(capture_names), roots=roots)
    mode = long_context_mode(adapter) if long_context else contextlib.nullcontext()
    with session(adapter):
        tokens = batch.tokens.to(adapter.device).clone()
        with rules_active(adapter, rules), mode:
            hooks = [as_hook(h) for h in pre_hooks] + capture.hooks_for(adapter)
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
