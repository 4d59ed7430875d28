"""Base attribution methods for generation graphs (CAGE, Walker & Ewetz 2025), one common signature.

Every method is a callable ``method(model, tokens, n_prompt, **options) -> table`` where ``tokens`` is
``[1, T]`` (prompt followed by the continuation, ``T = P + Y``) and ``table`` is ``[Y, T]``: row ``t``
explains the log-probability of the generated token ``tokens[0, P + t]`` given the positions before it,
with one score per earlier position (columns ``>= P + t`` are zero: causality). Any user callable
with this signature is a valid CAGE base method.

Exact and fast: causal masking makes the prediction of token ``t`` independent of
later tokens. The LRP family (``attnlrp``, ``cplrp``, ``input_x_gradient``) therefore runs ONE
batch-1 forward over the teacher-forced sequence per chunk of rows (truncated to the longest
prefix the chunk needs), unembeds only the explained positions, and runs ONE backward vectorised
over the chunk's rows (``torch.autograd.grad(..., is_grads_batched=True)``). A chunk holds at most
``chunk_size`` rows, fewer when their vectorised backward would not fit the memory, and long prompts
run in the long-context pass as ``attribute`` does (:func:`plan_table`, docs/estimate.md). Integrated gradients
replicates the sequence over a batch (one copy per row and quadrature node), the perturbation
methods batch their perturbed copies. The numbers equal the naive per-step loop
(:func:`naive_table`) up to floating-point summation order.

Options shared by all built-ins: ``chunk_size`` (rows or sequences per batched pass, bounds memory) and, for
the perturbation methods, ``spans`` (the units left out; default one span per token). The LRP family
also takes ``long_context`` (``None``: chosen from the estimate; ``True``/``False``: that pass, run even
when the estimate says it does not fit).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from cage_lens.core import engine, recompute
from cage_lens.core.adapter import ModelAdapter, adapt
from cage_lens.core.certificate import certify_or_warn
from cage_lens.core.engine import Capture, run_attribution, select_logits
from cage_lens.core.hooks import PointHook, installed, session
from cage_lens.core.recompute import long_context as long_context_mode
from cage_lens.core.rulesets import RuleSet, resolve_rules
from cage_lens.errors import CageLensError, InputError, NumericalError
from cage_lens.generation.spans import Span, check_tiling, token_spans
from cage_lens.planning import check_long_context, forward_in_row_chunks, plan_cage_table
from cage_lens.inputs import TokenBatch, check_number, check_token_ids, single_sequence, special_token_id
from cage_lens.targets import Target, resolve_token

__all__ = [
    "METHODS", "Method", "get_method", "register", "attnlrp", "cplrp", "input_x_gradient",
    "integrated_gradients", "attention", "attention_x_ig", "occlusion", "clp", "naive_table",
    "eos_id", "sequence_logprobs",
]

Method = Callable[..., Float[torch.Tensor, "Y T"]]
METHODS: dict[str, Method] = {}

#: rows (LRP family: rows per shared forward) or sequences per batched pass
DEFAULT_CHUNK = 8


def register(name: str) -> Callable[[Method], Method]:
    """Decorator adding a method to the registry under ``name``."""

    def add(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return add


def get_method(method: str | Method) -> Method:
    """A registered method by name, or the user's callable itself."""
    if callable(method):
        return method
    if method not in METHODS:
        raise CageLensError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)} or pass a callable")
    return METHODS[method]


# ---------------------------------------------------------------------------- shared helpers
def check_sequence(model, tokens, n_prompt: int) -> tuple[Int[torch.Tensor, "1 T"], int]:
    """Validate ``tokens [1, T]`` (through the input gate, :func:`cage_lens.inputs.single_sequence`) and
    ``n_prompt``; return the tokens (long, CPU) and ``Y = T − P``."""
    tokens = single_sequence(model, tokens, "a CAGE base method (tokens [1, T])")
    T = tokens.shape[1]
    n_prompt = check_number(n_prompt, "n_prompt", low=1, integer=True)
    if n_prompt >= T:
        raise InputError(
            f"the continuation is empty: the sequence has {T} tokens and the prompt {n_prompt}; "
            "nothing was generated to explain"
        )
    return tokens, T - n_prompt


def eos_id(model) -> int:
    """The EOS id used as the deletion baseline (as in the CAGE paper); falls back to BOS, then 0."""
    return special_token_id(model, "eos_token_id", "bos_token_id")


def baseline_id(model, baseline: str | int) -> int:
    """The deletion baseline: ``"eos"`` (:func:`eos_id`) or a token id / single token in the vocabulary."""
    return eos_id(model) if isinstance(baseline, str) and baseline == "eos" else resolve_token(model, baseline, "baseline")


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    size = check_number(size, "chunk_size", low=1, integer=True)
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _forward_backward(
    adapter: ModelAdapter, tokens: Int[torch.Tensor, "B L"], positions: list[int], target_ids: list[int],
    rules: "str | RuleSet", pre_hooks: Sequence = (),
) -> tuple[Capture, dict[str, torch.Tensor]]:
    """One forward under ``rules`` (``pre_hooks`` first: integrated gradients scales the embeddings
    there) and one backward of Σ_rows log p(target_row | position_row), via the engine's
    :func:`cage_lens.core.engine.run_attribution`."""
    target = Target.build(adapter.model, tokens.shape[0], target=target_ids, mode="logprob")
    batch = TokenBatch(tokens, [tokens.shape[1]] * tokens.shape[0])
    _, capture, grads = run_attribution(adapter, batch, positions, target, rules, (), pre_hooks)
    return capture, grads


def _finite(table: torch.Tensor, method: str) -> torch.Tensor:
    if not torch.isfinite(table).all():
        raise NumericalError(f"{method} produced NaN or inf scores; try float32/float64 weights")
    return table


# ---------------------------------------------------------------------------- LRP family
def _vmapped_backward(value: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """Gradients of every entry of ``value [R]`` w.r.t. ``inputs``, stacked on a new leading row axis:
    one backward vectorised over the rows (``is_grads_batched``). A model whose backward contains an
    op without a batching rule (or a vectorised backward that does not fit in memory) falls back to
    one backward per row (same numbers, slower)."""
    seeds = torch.eye(len(value), dtype=value.dtype, device=value.device)
    try:
        return torch.autograd.grad(value, inputs, grad_outputs=seeds, is_grads_batched=True, retain_graph=True,
                                   allow_unused=True)
    except RuntimeError:
        rows = [torch.autograd.grad(v, inputs, retain_graph=True, allow_unused=True) for v in value]
        return tuple(None if g[0] is None else torch.stack(g) for g in zip(*rows))


def _rows_from_one_forward(
    adapter: ModelAdapter, tokens: Int[torch.Tensor, "1 L"], positions: list[int], target_ids: list[int],
    rules: RuleSet, long_context: bool = False,
) -> Float[torch.Tensor, "R L"]:
    """Input relevance of several rows of one sequence from ONE forward (batch 1) and ONE backward
    vectorised over the rows: causal masking makes every row's activations the prefix of the shared
    ones, so only the backward differs per row. ``long_context`` recomputes each block in the backward
    and computes attention in row chunks (:mod:`cage_lens.core.recompute`)."""
    roots = engine.input_roots(adapter)
    capture = Capture(roots, roots=roots)
    target = Target.build(adapter.model, len(positions), target=target_ids, mode="logprob")
    # the vectorised backward carries every row's gradient at once: the row chunks shrink to match
    mode = (long_context_mode(adapter, max(1, recompute.default_budget(adapter) // len(positions))) if long_context
            else contextlib.nullcontext())
    with session(adapter):
        where = torch.tensor(positions, device=adapter.device)
        with engine.rules_active(adapter, rules), mode:
            logits = select_logits(adapter, tokens.to(adapter.device).clone(), lambda x: x[:, where], capture.hooks_for(adapter))[0]
            values = engine.check_finite(target(logits), "a generated token's log-probability")  # [R]
            inputs = [capture.tensors[n] for n in roots]
            grads = _vmapped_backward(values, inputs)
    rel = sum((x.detach() * g).sum(-1) for x, g in zip(inputs, grads) if g is not None)  # [R, 1, L]
    return rel[:, 0].double().cpu()


def plan_table(model, tokens, n_prompt: int, rules: "str | RuleSet", chunk_size: int = DEFAULT_CHUNK,
               long_context: bool | None = None):
    """How an LRP-family table runs (:func:`cage_lens.planning.plan_cage_table`): the pass and the rows
    differentiated at once (at most ``chunk_size``), the fastest that fits the memory available; a table
    that fits neither way is refused before it starts unless ``long_context`` is given."""
    _, Y = check_sequence(model, tokens, n_prompt)
    return _plan_of(model, n_prompt, Y, rules, chunk_size, long_context)


def _plan_of(model, n_prompt: int, Y: int, rules: "str | RuleSet", chunk_size: int, long_context: bool | None):
    check_long_context(long_context)
    chunk_size = check_number(chunk_size, "chunk_size", low=1, integer=True)
    return plan_cage_table(model, n_prompt, Y, rules=resolve_rules(rules), most_rows=chunk_size,
                           long_context=long_context)


def _lrp_table(model, tokens, n_prompt: int, rules: "str | RuleSet", chunk_size: int,
               long_context: bool | None) -> Float[torch.Tensor, "Y T"]:
    adapter = adapt(model)
    adapter.check_eval_mode()
    rules = resolve_rules(rules)
    certify_or_warn(adapter)
    tokens, Y = check_sequence(model, tokens, n_prompt)
    plan = _plan_of(model, n_prompt, Y, rules, chunk_size, long_context)
    table = torch.zeros(Y, tokens.shape[1], dtype=torch.float64)
    for rows in _chunks(range(Y), plan.rows):
        length = n_prompt + rows[-1]  # the longest prefix in the chunk: positions < P + t
        positions = [n_prompt + t - 1 for t in rows]
        targets = tokens[0, [n_prompt + t for t in rows]].tolist()
        rel = _rows_from_one_forward(adapter, tokens[:, :length], positions, targets, rules, plan.long_context)
        for b, t in enumerate(rows):
            table[t, : n_prompt + t] = rel[b, : n_prompt + t]
    return _finite(table, rules.name)


#: the built-in methods that run the LRP engine (their tables are planned by :func:`plan_table`)
LRP_METHODS = {"attnlrp": "attnlrp", "cplrp": "cplrp", "input_x_gradient": "gxi"}


@register("attnlrp")
def attnlrp(model, tokens, n_prompt: int, *, chunk_size: int = DEFAULT_CHUNK,
            long_context: bool | None = None) -> Float[torch.Tensor, "Y T"]:
    """AttnLRP (docs/rules.md) relevance of every earlier position for each generated token's log-prob."""
    return _lrp_table(model, tokens, n_prompt, "attnlrp", chunk_size, long_context)


@register("cplrp")
def cplrp(model, tokens, n_prompt: int, *, chunk_size: int = DEFAULT_CHUNK,
          long_context: bool | None = None) -> Float[torch.Tensor, "Y T"]:
    """CP-LRP (docs/rules.md): no relevance through the softmax."""
    return _lrp_table(model, tokens, n_prompt, "cplrp", chunk_size, long_context)


@register("input_x_gradient")
def input_x_gradient(model, tokens, n_prompt: int, *, chunk_size: int = DEFAULT_CHUNK,
                     long_context: bool | None = None) -> Float[torch.Tensor, "Y T"]:
    """Plain Gradient×Input of the token and position embeddings."""
    return _lrp_table(model, tokens, n_prompt, "gxi", chunk_size, long_context)


def naive_table(model, tokens, n_prompt: int, rules: str = "attnlrp") -> Float[torch.Tensor, "Y T"]:
    """Reference per-step loop: for each generated token, re-run its prefix and do one backward
    (the paper's way; used to test and benchmark the batched table)."""
    from cage_lens.attribution import attribute

    tokens, Y = check_sequence(model, tokens, n_prompt)
    table = torch.zeros(Y, tokens.shape[1], dtype=torch.float64)
    for t in range(Y):
        p = n_prompt + t
        att = attribute(model, tokens[:, :p], target=int(tokens[0, p]), rules=rules, mode="logprob", position=p - 1)
        table[t, :p] = att.input_relevance[0].double().cpu()
    return table


# ---------------------------------------------------------------------------- integrated gradients
def _embedding_of(adapter: ModelAdapter, token_id: int) -> torch.Tensor:
    """The token embedding (output of ``hook_embed``) of one id, read through the hook."""
    seen = {}

    def grab(tensor, hook):
        seen["x"] = tensor.detach()[0, 0].clone()

    with session(adapter, grad=False), installed(adapter, [PointHook(adapter.embed_hook, grab)]):
        adapter.model(torch.tensor([[token_id]], device=adapter.device))
    return seen["x"]


def _gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights on [0, 1] (Captum's default IG quadrature)."""
    steps = check_number(steps, "steps", low=1, integer=True)
    x, w = np.polynomial.legendre.leggauss(steps)
    return (x + 1) / 2, w / 2


def _ig_table(model, tokens, n_prompt, steps, baseline, chunk_size) -> Float[torch.Tensor, "Y T"]:
    adapter = adapt(model)
    adapter.check_eval_mode()
    tokens, Y = check_sequence(model, tokens, n_prompt)
    base_id = baseline_id(model, baseline)
    x0 = _embedding_of(adapter, base_id)
    alphas, weights = _gauss_legendre(steps)
    items = [(t, k) for t in range(Y) for k in range(steps)]
    table = torch.zeros(Y, tokens.shape[1], dtype=torch.float64)
    for chunk in _chunks(items, chunk_size):
        length = n_prompt + max(t for t, _ in chunk)
        alpha = torch.tensor([alphas[k] for _, k in chunk], dtype=x0.dtype, device=x0.device)[:, None, None]

        def interpolate(tensor, hook, alpha=alpha):
            return x0 + alpha * (tensor - x0)

        capture, grads = _forward_backward(
            adapter, tokens[:, :length].expand(len(chunk), -1), [n_prompt + t - 1 for t, _ in chunk],
            tokens[0, [n_prompt + t for t, _ in chunk]].tolist(), "gxi", [(adapter.embed_hook, interpolate)],
        )
        grad = grads[adapter.embed_hook].detach()
        x = capture.tensors[adapter.embed_hook].detach()
        delta = (x - x0) / alpha  # the un-interpolated (x − x0), recovered per row
        contrib = (delta * grad).sum(-1).double().cpu()
        for b, (t, k) in enumerate(chunk):
            table[t, : n_prompt + t] += float(weights[k]) * contrib[b, : n_prompt + t]
    return _finite(table, "integrated_gradients")


@register("integrated_gradients")
def integrated_gradients(
    model, tokens, n_prompt: int, *, steps: int = 20, baseline: str | int = "eos", chunk_size: int = DEFAULT_CHUNK
) -> Float[torch.Tensor, "Y T"]:
    """Integrated Gradients of each generated token's log-prob (the CAGE paper's base method):
    token embeddings interpolated from the EOS embedding (position embeddings kept), Gauss–Legendre
    quadrature with ``steps`` nodes, scores summed over the embedding dimension."""
    return _ig_table(model, tokens, n_prompt, steps, baseline, chunk_size)


# ---------------------------------------------------------------------------- attention
@register("attention")
def attention(model, tokens, n_prompt: int) -> Float[torch.Tensor, "Y T"]:
    """Attention weights of the query position that predicts each generated token, averaged over
    layers and heads (one forward)."""
    adapter = adapt(model)
    tokens, Y = check_sequence(model, tokens, n_prompt)
    names = [adapter.attn_hook(l, "hook_pattern") for l in range(adapter.arch.n_layers)]
    patterns: list[torch.Tensor] = []

    def grab(tensor, hook):
        patterns.append(tensor.detach()[0].double().cpu())  # [head, query, key]

    with session(adapter, grad=False), installed(adapter, [PointHook(n, grab) for n in names]):
        model(tokens.to(adapter.device))
    if len(patterns) != len(names):
        raise CageLensError(f"attention patterns fired in {len(patterns)} of {len(names)} layers")
    mean = torch.stack(patterns).mean(dim=(0, 1))  # [query, key]
    queries = torch.arange(n_prompt - 1, tokens.shape[1] - 1)
    table = mean[queries].clone()
    return table.tril(diagonal=n_prompt - 1)


@register("attention_x_ig")
def attention_x_ig(model, tokens, n_prompt: int, *, steps: int = 20, chunk_size: int = DEFAULT_CHUNK):
    """Attention (mean over layers and heads) times Integrated Gradients, element-wise (a CAGE paper base method)."""
    return attention(model, tokens, n_prompt) * integrated_gradients(model, tokens, n_prompt, steps=steps, chunk_size=chunk_size)


# ---------------------------------------------------------------------------- perturbation
def sequence_logprobs(model, tokens: Int[torch.Tensor, "B T"], n_prompt: int, chunk_size: int = DEFAULT_CHUNK,
                      targets: Int[torch.Tensor, "1 T"] | None = None, full: bool = False):
    """Log-probabilities of ``targets`` (default: the tokens themselves) at every generated position,
    ``[B, Y]``, teacher-forced, in chunks. With ``full=True`` the whole next-token distributions
    ``[B, Y, vocab]`` are returned instead."""
    adapter = adapt(model)
    tokens = check_token_ids(model, tokens, role="tokens")
    n_prompt = check_number(n_prompt, "n_prompt", low=1, high=tokens.shape[1] - 1, integer=True)
    targets = tokens[:1] if targets is None else single_sequence(model, targets, "sequence_logprobs", "targets")
    if targets.shape[1] != tokens.shape[1]:
        raise InputError(f"targets has {targets.shape[1]} tokens but the sequences have {tokens.shape[1]}")
    ids = targets[0, n_prompt:].to(adapter.device)
    out = []
    with session(adapter, grad=False):
        for rows in _chunks(range(tokens.shape[0]), chunk_size):
            chunked = forward_in_row_chunks(model, tokens.shape[1], len(rows))
            logits = select_logits(adapter, tokens[rows].to(adapter.device), lambda x: x[:, n_prompt - 1 : -1],
                                   row_chunked=chunked)
            logits = logits.double().log_softmax(-1)
            out.append(logits.cpu() if full else logits.gather(-1, ids.expand(len(rows), -1)[..., None])[..., 0].cpu())
    return torch.cat(out)


def _occluded(tokens: Int[torch.Tensor, "1 T"], spans: Sequence[Span], baseline: int) -> Int[torch.Tensor, "S T"]:
    """One copy of the sequence per span, that span replaced by the same number of baseline tokens."""
    out = tokens.repeat(len(spans), 1)
    for i, (a, b) in enumerate(spans):
        out[i, a:b] = baseline
    return out


def _spread(scores: Float[torch.Tensor, "S Y"], spans: Sequence[Span], n_prompt: int, T: int) -> Float[torch.Tensor, "Y T"]:
    """Spread each span's score uniformly over its tokens (block sums give back the span score);
    zero at and after each row's own position."""
    table = torch.zeros(scores.shape[1], T, dtype=torch.float64)
    for i, (a, b) in enumerate(spans):
        table[:, a:b] = scores[i][:, None] / (b - a)
    return _causal(table, n_prompt)


def _causal(table: torch.Tensor, n_prompt: int) -> torch.Tensor:
    return table.tril(diagonal=n_prompt - 1)


def _perturbation_spans(spans, T: int) -> list[Span]:
    return token_spans(0, T) if spans is None else check_tiling(spans, T, "spans")


@register("occlusion")
def occlusion(model, tokens, n_prompt: int, *, spans: Sequence[Span] | None = None, baseline: str | int = "eos",
              chunk_size: int = DEFAULT_CHUNK) -> Float[torch.Tensor, "Y T"]:
    """Leave-one-span-out (a CAGE paper base method): replace a span by as many EOS tokens; score of the span for
    generated token t = log p(t | original prefix) − log p(t | perturbed prefix). One teacher-forced
    forward per span gives every row (the prefix of row t only sees the span's part before t).
    A span's score is spread uniformly over its tokens."""
    tokens, Y = check_sequence(model, tokens, n_prompt)
    spans = _perturbation_spans(spans, tokens.shape[1])
    base = baseline_id(model, baseline)
    original = sequence_logprobs(model, tokens, n_prompt)
    perturbed = sequence_logprobs(model, _occluded(tokens, spans, base), n_prompt, chunk_size, targets=tokens)
    return _finite(_spread(original - perturbed, spans, n_prompt, tokens.shape[1]), "occlusion")


@register("clp")
def clp(model, tokens, n_prompt: int, *, spans: Sequence[Span] | None = None, baseline: str | int = "eos",
        chunk_size: int = DEFAULT_CHUNK) -> Float[torch.Tensor, "Y T"]:
    """Contextual leave-one-out with a KL measure (a CAGE paper base method): the same span ablation as
    :func:`occlusion`, scored by KL(p(·| original prefix) ‖ p(·| perturbed prefix)) of the next-token
    distribution at each generated position (≥ 0)."""
    tokens, Y = check_sequence(model, tokens, n_prompt)
    spans = _perturbation_spans(spans, tokens.shape[1])
    base = baseline_id(model, baseline)
    original = sequence_logprobs(model, tokens, n_prompt, full=True)[0]  # [Y, vocab]
    scores = []
    for rows in _chunks(range(len(spans)), chunk_size):
        pert = sequence_logprobs(model, _occluded(tokens, [spans[i] for i in rows], base), n_prompt, chunk_size, full=True)
        scores.append((original.exp() * (original - pert)).sum(-1))  # [S_chunk, Y]
    return _finite(_spread(torch.cat(scores), spans, n_prompt, tokens.shape[1]), "clp")
