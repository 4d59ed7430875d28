"""The input gate: user inputs (string, list of strings, token ids, numeric settings) as checked values.

Every public entry point (``attribute``, ``circuit_graph``, ``explain_failure``, ``cage``, the base
methods of :mod:`cage_lens.generation.methods`, the deletion metrics, relevance patching and its
agreement, studies, the CLI) takes its inputs through this module, so the same checks hold everywhere
(see docs/transformerlens.md#tokenisation); ``tests/test_conformance.py`` drives every entry point
through a table of hostile inputs and fails on a new one that is not registered there:

- no silent truncation: TransformerLens' ``to_tokens`` cuts strings to ``n_ctx`` by default; here a
  string longer than the model's context is refused with its length;
- no silent substitution: a word the tokenizer does not know would become ``<unk>``; it is refused
  with the words named. To explain ``<unk>`` deliberately, pass token ids (``model.to_tokens(...)``):
  ids are taken as they are;
- token ids must be integers inside the vocabulary; numpy integers are accepted wherever ints are;
- one prompt where one is required (:func:`single_prompt`, :func:`single_sequence`), rows of one
  length where positions are compared across rows (:func:`rectangular_tokens`, patching);
- numeric settings are finite numbers inside their range (:func:`check_number`): a NaN threshold
  would otherwise switch a comparison off silently (``x <= nan`` is always false).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from jaxtyping import Int

from cage_lens.errors import InputError

__all__ = [
    "TokenBatch", "to_token_batch", "tokenize", "encode", "unknown_words", "single_prompt", "check_token_ids", "as_int",
    "single_sequence", "rectangular_tokens", "check_number", "resolve_positions", "special_token_id",
    "greedy_continuation",
]

Inputs = Union[str, Sequence[str], torch.Tensor, np.ndarray]


@dataclass
class TokenBatch:
    """Right-padded tokens plus the true length of each row (causal models never look right, so
    right padding leaves every real position's computation unchanged)."""

    tokens: Int[torch.Tensor, "batch pos"]
    lengths: list[int]

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]


# ---------------------------------------------------------------------------- scalars
def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer: an ``int``, a numpy integer, or a one-element
    integer tensor / array. ``None`` for anything else (bools and floats are not token ids)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iu":
        return int(value.item())
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not _non_integer(value.dtype):
        return int(value.item())
    return None


def _non_integer(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex or dtype == torch.bool


def check_number(
    value, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
    high_open: bool = False, integer: bool = False, allow_none: bool = False,
):
    """``value`` as a finite ``float`` (an ``int`` with ``integer=True``) inside ``[low, high]``
    (``low_open`` / ``high_open`` exclude the bound). Bools, NaN, infinities and non-numbers are refused
    with ``name`` in the message; ``None`` passes through when ``allow_none``."""
    if value is None and allow_none:
        return None
    number = as_int(value) if integer else _as_float(value)
    if number is None or not math.isfinite(number):
        kind = "an int" if integer else "a finite number"
        raise InputError(f"{name} must be {kind}{_range_text(low, high, low_open, high_open)}, got {value!r}")
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        raise InputError(f"{name} must lie in {_range_text(low, high, low_open, high_open, bare=True)}, got {value!r}")
    return number


def _as_float(value) -> float | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        return float(value.item())
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool and not value.is_complex():
        return float(value.item())
    return None


def _range_text(low, high, low_open: bool, high_open: bool, bare: bool = False) -> str:
    if low is None and high is None:
        return ""
    left = "-inf" if low is None else f"{low:g}"
    right = "inf" if high is None else f"{high:g}"
    text = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
    return text if bare else f" in {text}"


def special_token_id(model, *attributes: str, default: int = 0) -> int:
    """The first of the tokenizer's ``attributes`` (e.g. ``"eos_token_id"``) that is set, else ``default``."""
    tokenizer = getattr(model, "tokenizer", None)
    for attr in attributes:
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    return default


# ---------------------------------------------------------------------------- strings
#: Hugging Face fast tokenizers are not thread-safe (concurrent calls fail with "Already borrowed"),
#: so every tokenizer call cage_lens makes holds this lock
TOKENIZER_LOCK = threading.RLock()


def encode(model, text: str, prepend_bos: bool | None = None) -> Int[torch.Tensor, "pos"]:
    """``model.to_tokens(text)[0]`` on the CPU, *without* TransformerLens' silent truncation to ``n_ctx``."""
    kwargs = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
    with TOKENIZER_LOCK:
        try:
            tokens = model.to_tokens(text, truncate=False, **kwargs)
        except TypeError:  # a duck-typed model without the truncate option: it cannot truncate either
            tokens = model.to_tokens(text, **kwargs)
    return tokens[0].cpu()


def unknown_words(model, text: str) -> list[str]:
    """The pieces of ``text`` that the model's tokenizer maps to its unknown token (``<unk>``), in order.
    A literal ``<unk>`` written in the text is not counted. Empty when the tokenizer has no unknown
    token (byte-level BPE such as GPT-2's never needs one)."""
    tokenizer = getattr(model, "tokenizer", None)
    unk_id, unk = getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None)
    if unk_id is None:
        return []
    with TOKENIZER_LOCK:
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            pieces = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk_id]
            return [p for p in pieces if p != unk]
        except (NotImplementedError, TypeError, KeyError, ValueError):  # a slow tokenizer has no offsets: count
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return [str(unk)] * max(0, ids.count(unk_id) - (text.count(unk) if unk else 0))


def unknown_words_problem(model, text: str, role: str) -> str | None:
    """One line naming the words of ``text`` that would silently become the unknown token, or ``None``."""
    words = unknown_words(model, text)
    if not words:
        return None
    unk = getattr(model.tokenizer, "unk_token", "<unk>")
    named = ", ".join(repr(w) for w in dict.fromkeys(words))
    return f"{role} has {len(words)} word(s) the model's vocabulary does not contain: {named} (each would become {unk!r})"


def _refuse_unknown(model, text: str, role: str) -> None:
    problem = unknown_words_problem(model, text, role)
    if problem:
        unk = getattr(model.tokenizer, "unk_token", "<unk>")
        raise InputError(f"{problem}. Use known words, or pass token ids (model.to_tokens(...)) to explain {unk!r} deliberately.")


def tokenize(
    model, text: str, prepend_bos: bool | None = None, role: str = "the prompt", allow_unknown: bool = False
) -> Int[torch.Tensor, "pos"]:
    """One prompt as token ids, checked: not empty, not longer than the model's context (nothing is
    truncated), no word silently replaced by ``<unk>`` (unless ``allow_unknown``)."""
    if not isinstance(text, str):
        raise InputError(f"{role} is a {type(text).__name__}; expected a string")
    if not text.strip():
        raise InputError(f"{role} is empty: there is nothing to explain")
    tokens = encode(model, text, prepend_bos)
    n_ctx = int(model.cfg.n_ctx)
    if len(tokens) > n_ctx:
        raise InputError(
            f"{role} is {len(tokens)} tokens long but the model's context (n_ctx) is {n_ctx}; "
            f"TransformerLens would silently cut it to the first {n_ctx}. Shorten it."
        )
    if not allow_unknown:
        _refuse_unknown(model, text, role)
    return tokens


# ---------------------------------------------------------------------------- token ids
def check_token_ids(model, ids, role: str = "the token tensor") -> Int[torch.Tensor, "batch pos"]:
    """Integer ids ``[pos]`` or ``[batch, pos]`` (tensor, numpy array or list of ints) inside the
    vocabulary and the context, as a ``[batch, pos]`` long tensor on the CPU."""
    if isinstance(ids, (list, tuple)) and ids and all(as_int(i) is not None for i in ids):
        ids = np.asarray([as_int(i) for i in ids])
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise InputError(f"{role} must hold integer ids, got numpy dtype {ids.dtype}")
        ids = torch.as_tensor(ids)
    if not isinstance(ids, torch.Tensor):
        raise InputError(f"{role} must hold token ids, got {type(ids).__name__}")
    if _non_integer(ids.dtype):
        raise InputError(f"{role} must hold integer ids, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise InputError(f"{role} must be [pos] or [batch, pos], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise InputError(f"{role} is empty")
    d_vocab, n_ctx = int(model.cfg.d_vocab), int(model.cfg.n_ctx)
    if int(ids.min()) < 0 or int(ids.max()) >= d_vocab:
        raise InputError(f"token ids must lie in [0, {d_vocab}); got range [{int(ids.min())}, {int(ids.max())}]")
    if ids.shape[1] > n_ctx:
        raise InputError(f"the input has {ids.shape[1]} tokens but the model's context (n_ctx) is {n_ctx}")
    return ids.long().cpu()


def to_token_batch(model, inputs: Inputs, prepend_bos: bool | None = None) -> TokenBatch:
    """A prompt, a list of prompts (right-padded) or token ids as a checked :class:`TokenBatch`."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        tokens = check_token_ids(model, inputs)
        return TokenBatch(tokens, [tokens.shape[1]] * tokens.shape[0])
    if isinstance(inputs, str):
        rows = [tokenize(model, inputs, prepend_bos)]
    elif isinstance(inputs, (list, tuple)):
        if not inputs:
            raise InputError("no inputs given (empty list)")
        rows = [tokenize(model, text, prepend_bos, role=f"inputs[{i}]") for i, text in enumerate(inputs)]
    else:
        raise InputError(f"inputs must be a string, a list of strings or a token tensor, got {type(inputs).__name__}")
    lengths = [len(r) for r in rows]
    pad = special_token_id(model, "pad_token_id", "eos_token_id", "bos_token_id")
    tokens = torch.full((len(rows), max(lengths)), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return TokenBatch(tokens, lengths)


def single_prompt(model, inputs: Inputs, prepend_bos: bool | None, what: str) -> Int[torch.Tensor, "1 pos"]:
    """The tokens of exactly one prompt; ``what`` (e.g. ``"cage"``) names the caller in the error."""
    batch = to_token_batch(model, inputs, prepend_bos)
    if batch.batch != 1:
        raise InputError(f"{what} explains one prompt at a time; got a batch of {batch.batch}. Call it once per prompt.")
    return batch.tokens


def single_sequence(model, ids, what: str, role: str = "tokens") -> Int[torch.Tensor, "1 pos"]:
    """One row of token ids ``[pos]`` or ``[1, pos]`` (tensor, numpy array or list of ints), checked by
    :func:`check_token_ids`; ``what`` names the caller in the error for a batch."""
    if not isinstance(ids, (torch.Tensor, np.ndarray, list, tuple)):
        raise InputError(f"{role} must be token ids ([pos] or [1, pos]), got {type(ids).__name__}")
    tokens = check_token_ids(model, ids, role=role)
    if tokens.shape[0] != 1:
        raise InputError(
            f"{what} takes one sequence at a time; {role} has a batch of {tokens.shape[0]}. Call it once per sequence."
        )
    return tokens


def rectangular_tokens(model, inputs, prepend_bos: bool | None = None, role: str = "tokens") -> Int[torch.Tensor, "batch pos"]:
    """Token rows of one length, as patching needs (it compares position ``i`` of every row and of two
    runs): a ``[batch, pos]`` id tensor or array checked by :func:`check_token_ids`, or a prompt / list
    of prompts tokenised by :func:`tokenize` (nothing truncated, no ``<unk>`` substituted, not empty)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        rows = [tokenize(model, t, prepend_bos, role=f"{role}[{i}]" if len(inputs) > 1 else "the prompt")
                for i, t in enumerate(inputs)]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise InputError(
                f"the prompts have different token lengths {lengths}; a patching batch must be rectangular "
                "(TransformerLens patches position i of every row). Batch prompts of equal length."
            )
        return torch.stack(rows)
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        if inputs.ndim != 2:
            raise InputError(
                f"{role} must be [batch, pos] (TransformerLens' patching contract), got shape {tuple(inputs.shape)}"
            )
        return check_token_ids(model, inputs, role=role)
    raise InputError(
        f"{role} must be a prompt, a non-empty list of prompts or a [batch, pos] token tensor, got "
        f"{type(inputs).__name__ if not isinstance(inputs, (list, tuple)) or inputs else 'an empty list'}"
    )


def resolve_positions(position, lengths: list[int]) -> list[int]:
    """Explained position per row; negative values count from each row's last real token."""
    positions = position if isinstance(position, (list, tuple)) else [position] * len(lengths)
    if len(positions) != len(lengths):
        raise InputError(f"position has {len(positions)} entries but the batch has {len(lengths)} rows")
    out = []
    for p, n in zip(positions, lengths):
        q = as_int(p)
        if q is None:
            raise InputError(f"position must be an int, got {type(p).__name__}")
        p, q = q, q + n if q < 0 else q
        if not 0 <= q < n:
            raise InputError(f"position {p} is outside the prompt of {n} tokens (valid: -{n} to {n - 1})")
        out.append(q)
    return out


# ---------------------------------------------------------------------------- generation
def greedy_continuation(
    model, tokens: Int[torch.Tensor, "1 pos"], max_new_tokens: int, stop_at_eos: bool = False
) -> Int[torch.Tensor, "1 pos"]:
    """Prompt plus up to ``max_new_tokens`` greedy tokens, with plain ``model(tokens)`` calls (portable
    across TL versions). Stops at the model's context length, and after emitting EOS when
    ``stop_at_eos`` (the EOS token is kept)."""
    from cage_lens.core.adapter import adapt

    tokens = tokens.to(adapt(model).device)
    eos = special_token_id(model, "eos_token_id", "bos_token_id")
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if tokens.shape[1] >= int(model.cfg.n_ctx):
                break
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            if stop_at_eos and int(nxt) == eos:
                break
    return tokens.cpu()
