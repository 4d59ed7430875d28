"""Turning user inputs (string, list of strings, token tensor) into a checked token batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from jaxtyping import Int

from cage_lens.errors import InputError

__all__ = ["TokenBatch", "to_token_batch", "resolve_positions", "special_token_id", "greedy_continuation"]

Inputs = Union[str, Sequence[str], torch.Tensor]


@dataclass
class TokenBatch:
    """Right-padded tokens plus the true length of each row (causal models never look right, so
    right padding leaves every real position's computation unchanged)."""

    tokens: Int[torch.Tensor, "batch pos"]
    lengths: list[int]

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]


def special_token_id(model, *attributes: str, default: int = 0) -> int:
    """The first of the tokenizer's ``attributes`` (e.g. ``"eos_token_id"``) that is set, else ``default``."""
    tokenizer = getattr(model, "tokenizer", None)
    for attr in attributes:
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    return default


def greedy_continuation(
    model, tokens: Int[torch.Tensor, "1 P"], max_new_tokens: int, stop_at_eos: bool = False
) -> Int[torch.Tensor, "1 T"]:
    """Prompt plus up to ``max_new_tokens`` greedy tokens, with plain ``model(tokens)`` calls (portable
    across TL versions). Stops at the model's context length, and after emitting EOS when
    ``stop_at_eos`` (the EOS token is kept)."""
    from cage_lens.adapter import adapt

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


def to_token_batch(model, inputs: Inputs, prepend_bos: bool | None = None) -> TokenBatch:
    """Tokenise with the model's own ``to_tokens`` (default BOS handling unless ``prepend_bos``)."""
    n_ctx, d_vocab = int(model.cfg.n_ctx), int(model.cfg.d_vocab)
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, torch.Tensor):
        if inputs.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool):
            raise InputError(f"a token tensor must hold integer ids, got dtype {inputs.dtype}")
        if inputs.ndim == 1:
            inputs = inputs[None]
        if inputs.ndim != 2:
            raise InputError(f"a token tensor must be [pos] or [batch, pos], got shape {tuple(inputs.shape)}")
        if inputs.shape[1] == 0 or inputs.shape[0] == 0:
            raise InputError("the token tensor is empty")
        if int(inputs.min()) < 0 or int(inputs.max()) >= d_vocab:
            raise InputError(f"token ids must lie in [0, {d_vocab}); got range [{int(inputs.min())}, {int(inputs.max())}]")
        tokens, lengths = inputs.long(), [inputs.shape[1]] * inputs.shape[0]
    elif isinstance(inputs, (list, tuple)):
        if not inputs:
            raise InputError("no inputs given (empty list)")
        rows = []
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise InputError(f"inputs[{i}] is a {type(text).__name__}; expected a string")
            if not text.strip():
                raise InputError(f"inputs[{i}] is an empty prompt")
            kwargs = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
            rows.append(model.to_tokens(text, **kwargs)[0])
        lengths = [len(r) for r in rows]
        tokens = torch.full((len(rows), max(lengths)), special_token_id(model, "pad_token_id", "eos_token_id", "bos_token_id"), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row.cpu()
    else:
        raise InputError(f"inputs must be a string, a list of strings or a token tensor, got {type(inputs).__name__}")
    if tokens.shape[1] > n_ctx:
        raise InputError(f"the input has {tokens.shape[1]} tokens but the model's context (n_ctx) is {n_ctx}")
    return TokenBatch(tokens, lengths)


def resolve_positions(position, lengths: list[int]) -> list[int]:
    """Explained position per row; negative values count from each row's last real token."""
    positions = position if isinstance(position, (list, tuple)) else [position] * len(lengths)
    if len(positions) != len(lengths):
        raise InputError(f"position has {len(positions)} entries but the batch has {len(lengths)} rows")
    out = []
    for p, n in zip(positions, lengths):
        if isinstance(p, torch.Tensor):
            p = int(p.item())
        if not isinstance(p, int) or isinstance(p, bool):
            raise InputError(f"position must be an int, got {type(p).__name__}")
        q = p + n if p < 0 else p
        if not 0 <= q < n:
            raise InputError(f"position {p} is outside the prompt of {n} tokens")
        out.append(q)
    return out
