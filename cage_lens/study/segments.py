"""Character spans of prompt tokens, and which tokens make up each segment (docs/study.md#segments).

Alignment: the tokenizer's offset mapping of the prompt (``return_offsets_mapping``), used only when
its ids equal the ids the model was run on (with or without the BOS token TransformerLens prepends).
Otherwise each token's decoded text is searched for in the prompt, left to right (``"decoded"``). A
token belongs to a segment when its character span overlaps the segment's ``[start, end)``; tokens
after the prompt (the generated prefix) form ``_generated``, unsegmented prompt tokens ``_other``.
Special tokens (BOS, chat-template tokens) belong to no segment.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["token_char_spans", "segment_members"]

Span = tuple[int, int]


def _offsets(tokenizer, prompt: str, prompt_ids: Sequence[int]) -> list[Span | None] | None:
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        return None
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if ids == list(prompt_ids):
        return offsets
    if ids == list(prompt_ids[1:]):
        return [None] + offsets
    return None


def _decoded(tokenizer, prompt: str, prompt_ids: Sequence[int], special: set[int]) -> list[Span | None] | None:
    spans: list[Span | None] = []
    cursor = 0
    for tid in prompt_ids:
        if tid in special:
            spans.append(None)
            continue
        piece = tokenizer.decode([tid]).strip()
        if not piece:
            spans.append((cursor, cursor))
            continue
        at = prompt.find(piece, cursor)
        if at < 0 or prompt[cursor:at].strip():  # skipping over non-space text: the alignment broke
            return None
        spans.append((at, at + len(piece)))
        cursor = at + len(piece)
    return spans


def token_char_spans(tokenizer, prompt: str, prompt_ids: Sequence[int], special: set[int]) -> tuple[list[Span | None] | None, str]:
    """Character span of every prompt token (``None`` for special tokens) and the method used
    (``"offsets"``, ``"decoded"``), or ``(None, reason)`` when neither aligns."""
    spans = _offsets(tokenizer, prompt, prompt_ids)
    if spans is not None:
        return [None if tid in special else s for tid, s in zip(prompt_ids, spans)], "offsets"
    spans = _decoded(tokenizer, prompt, prompt_ids, special)
    if spans is not None:
        return spans, "decoded"
    return None, "failed: the prompt's tokens could not be located in its text"


def segment_members(
    segments: dict[str, Span], spans: Sequence[Span | None], n_tokens: int
) -> dict[str, list[int]]:
    """Token positions of each segment, plus ``_generated`` (positions ≥ the prompt's length) and
    ``_other`` (prompt tokens in no segment). Positions of special tokens appear nowhere."""
    members: dict[str, list[int]] = {name: [] for name in segments}
    other = []
    for pos, span in enumerate(spans):
        if span is None:
            continue
        a, b = span
        hit = False
        for name, (s, e) in segments.items():
            if (a < e and b > s) or (a == b and s <= a < e):
                members[name].append(pos)
                hit = True
        if not hit:
            other.append(pos)
    members["_other"] = other
    members["_generated"] = list(range(len(spans), n_tokens))
    return members
