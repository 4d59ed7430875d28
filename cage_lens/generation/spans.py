"""Token spans: a built-in sentence splitter, tiling checks and block sums of attribution tables.

A *span* is a half-open token range ``(start, end)``. Span lists used as graph nodes must *tile* the
sequence: sorted, non-empty, contiguous, from 0 to its length (sentence granularity sums token scores
inside each (generated sentence × source sentence) block: docs/cage.md#granularity).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float

from cage_lens.errors import InputError
from cage_lens.inputs import check_number

__all__ = ["Span", "split_sentences", "span_pairs", "check_tiling", "token_spans", "block_sum", "span_of"]

Span = tuple[int, int]

SENTENCE_END = (".", "!", "?", ";", "\n")


def split_sentences(str_tokens: Sequence[str], start: int = 0) -> list[Span]:
    """Spans of sentences over ``str_tokens`` (offset by ``start``): a sentence ends after a token whose
    text ends with ``. ! ? ;`` or a newline. A trailing piece without an end mark is its own sentence.
    No model download: a rule-based splitter, enough for the zoo and for prose."""
    spans, begin = [], 0
    for i, tok in enumerate(str_tokens):
        if tok.rstrip(" ").endswith(SENTENCE_END) or tok.endswith("\n"):
            spans.append((start + begin, start + i + 1))
            begin = i + 1
    if begin < len(str_tokens):
        spans.append((start + begin, start + len(str_tokens)))
    return spans


def span_pairs(spans, what: str = "spans") -> list[Span]:
    """``spans`` as ``(start, end)`` pairs of ints (numpy integers accepted; floats, NaN and other
    shapes refused rather than rounded)."""
    try:
        items = list(spans)
    except TypeError:
        raise InputError(f"{what} must be a list of (start, end) pairs, got {type(spans).__name__}") from None
    out = []
    for i, span in enumerate(items):
        try:
            pair = list(span)
        except TypeError:
            pair = []
        if len(pair) != 2:
            raise InputError(f"{what}[{i}] = {span!r} is not a (start, end) pair")
        out.append(tuple(check_number(x, f"{what}[{i}]", integer=True) for x in pair))
    return out


def check_tiling(spans: Sequence[Sequence[int]], length: int, what: str = "spans", start: int = 0) -> list[Span]:
    """Validate that ``spans`` tile ``[start, length)`` exactly; return them as a list of int pairs."""
    out: list[Span] = []
    expected = start
    for i, (a, b) in enumerate(span_pairs(spans, what)):
        if a != expected:
            gap = "overlaps the previous span" if a < expected else f"leaves tokens {expected}..{a - 1} uncovered"
            raise InputError(f"{what} do not tile the sequence: {what}[{i}] = ({a}, {b}) {gap}")
        if b <= a:
            raise InputError(f"{what}[{i}] = ({a}, {b}) is empty or reversed")
        out.append((a, b))
        expected = b
    if expected != length:
        raise InputError(
            f"{what} do not tile the sequence: they end at token {expected} but the sequence has {length} tokens"
        )
    return out


def token_spans(start: int, end: int) -> list[Span]:
    """One span per token."""
    return [(i, i + 1) for i in range(start, end)]


def span_of(spans: Sequence[Span], position: int) -> int:
    """Index of the span containing ``position``."""
    for i, (a, b) in enumerate(spans):
        if a <= position < b:
            return i
    raise InputError(f"position {position} is in none of the spans")


def block_sum(
    table: Float[torch.Tensor, "row pos"], n_prompt: int, spans: Sequence[Span], n_prompt_spans: int
) -> Float[torch.Tensor, "row node"]:
    """Sum a token table (row t explains generated token ``n_prompt + t``) into a span table whose row i
    explains generated span ``n_prompt_spans + i``. Blocks on or above the diagonal (a generated span
    explaining itself or a later span) are zero: edges point strictly forward in time."""
    n_spans = len(spans)
    col = torch.zeros(table.shape[1], n_spans, dtype=table.dtype)
    for j, (a, b) in enumerate(spans):
        col[a:b, j] = 1
    per_token_row = table @ col  # [Y, n_spans]
    gen_spans = spans[n_prompt_spans:]
    out = torch.zeros(len(gen_spans), n_spans, dtype=table.dtype)
    for i, (a, b) in enumerate(gen_spans):
        out[i] = per_token_row[a - n_prompt : b - n_prompt].sum(0)
        out[i, n_prompt_spans + i :] = 0
    return out
