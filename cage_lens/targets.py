"""What is explained: a scalar per batch row computed from the logits at one position
(see docs/failure.md#targets).

Modes: ``"logit"`` (logit of the target, minus the contrast logit when a contrast is given),
``"logprob"`` (log-probability; with a contrast the difference of log-probabilities, which equals the
logit difference), ``"demean"`` (target logit minus the mean logit), ``"topk_avg"`` (target logit
minus the mean of the top-k logits, k = 10) — or any callable ``f(logits[batch, vocab]) -> [batch]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import torch
from jaxtyping import Float, Int

from cage_lens.errors import InputError
from cage_lens.inputs import TOKENIZER_LOCK, as_int, encode, unknown_words

__all__ = ["TARGET_MODES", "TokenSpec", "Target", "resolve_token", "resolve_tokens"]

TARGET_MODES = ("logit", "logprob", "demean", "topk_avg")
TokenSpec = Union[str, int, torch.Tensor, None]


def resolve_token(model, token: TokenSpec, role: str = "target") -> int | None:
    """A single vocabulary id from a string (exactly one token, known to the vocabulary), an int, a
    numpy integer or a one-element integer tensor."""
    if token is None:
        return None
    if isinstance(token, torch.Tensor) and token.numel() != 1:
        raise InputError(f"{role} tensor must hold a single token id, got shape {tuple(token.shape)}")
    token_id = as_int(token)
    if token_id is not None:
        d_vocab = model.cfg.d_vocab
        if not 0 <= token_id < d_vocab:
            raise InputError(f"{role} id {token_id} is outside the vocabulary [0, {d_vocab})")
        return token_id
    if not isinstance(token, str):
        raise InputError(f"{role} must be a token string or id, got {type(token).__name__}")
    if token == "":
        raise InputError(f"{role} is an empty string")
    ids = encode(model, token, prepend_bos=False).tolist()
    if len(ids) != 1:
        with TOKENIZER_LOCK:
            pieces = model.to_str_tokens(token, prepend_bos=False)
        raise InputError(
            f"{role} {token!r} is not a single token: it splits into {len(ids)} tokens {pieces}. "
            "Pass one token (check the leading space) or its id."
        )
    if unknown_words(model, token):
        unk = getattr(model.tokenizer, "unk_token", "<unk>")
        raise InputError(
            f"{role} {token!r} is not in the model's vocabulary (it would become {unk!r}). "
            "Pass a token the vocabulary contains, or its id."
        )
    return ids[0]


def resolve_tokens(model, token, batch: int, role: str) -> list[int | None]:
    """One id per batch row; a list gives one entry per row."""
    if isinstance(token, (list, tuple)):
        if len(token) != batch:
            raise InputError(f"{role} has {len(token)} entries but the batch has {batch} rows")
        return [resolve_token(model, t, role) for t in token]
    if isinstance(token, (torch.Tensor, np.ndarray)) and token.ndim == 1 and len(token) > 1:
        return resolve_tokens(model, token.tolist(), batch, role)
    return [resolve_token(model, token, role)] * batch


@dataclass
class Target:
    """A resolved target: ids per row (``None`` = the model's own top-1 prediction), mode, contrast."""

    target_ids: list[int | None]
    contrast_ids: list[int | None]
    mode: str | Callable = "logit"
    top_k: int = 10
    #: display names of the contrast tokens (for errors raised after the forward pass)
    contrast_names: dict[int, str] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model, batch: int, target=None, contrast=None, mode="logit", top_k: int = 10) -> "Target":
        if callable(target) and not isinstance(target, torch.Tensor):
            if contrast is not None:
                raise InputError("contrast= cannot be combined with a callable target")
            return cls([None] * batch, [None] * batch, mode=target, top_k=top_k)
        if not callable(mode) and mode not in TARGET_MODES:
            raise InputError(f"unknown target mode {mode!r}; choose one of {', '.join(TARGET_MODES)} or pass a callable")
        if contrast is not None and mode in ("demean", "topk_avg"):
            raise InputError(f"mode {mode!r} already subtracts a baseline; it cannot be combined with contrast=")
        if not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive int, got {top_k!r}")
        spec = cls(
            resolve_tokens(model, target, batch, "target"),
            resolve_tokens(model, contrast, batch, "contrast"),
            mode=mode,
            top_k=top_k,
        )
        spec.contrast_names = {c: _token_name(model, c) for c in spec.contrast_ids if c is not None}
        spec._check_distinct("target")
        return spec

    def _check_distinct(self, what: str) -> None:
        """``target − contrast`` of one token with itself is zero by construction (every relevance zero,
        the input share 0/0): refuse it."""
        for row, (t, c) in enumerate(zip(self.target_ids, self.contrast_ids)):
            if t is not None and t == c:
                where = f" in row {row}" if len(self.target_ids) > 1 else ""
                token = self.contrast_names.get(c, str(c))
                if what == "target":
                    raise InputError(
                        f"target and contrast are the same token {token}{where}: target − contrast is zero by "
                        "construction. Pass a different contrast token."
                    )
                raise InputError(
                    f"the model's top-1 prediction{where} is the contrast token {token} itself: target − contrast "
                    "would be zero by construction. Pass target= (the token to explain against the contrast)."
                )

    def fill_predictions(self, logits: Float[torch.Tensor, "batch vocab"]) -> None:
        """Rows without an explicit target explain the model's own top-1 token (which must differ from
        the row's contrast token)."""
        top1 = logits.argmax(-1).tolist()
        self.target_ids = [t if t is not None else top1[i] for i, t in enumerate(self.target_ids)]
        self._check_distinct("prediction")

    def __call__(self, logits: Float[torch.Tensor, "batch vocab"]) -> Float[torch.Tensor, "batch"]:
        if callable(self.mode):
            value = self.mode(logits)
            if not isinstance(value, torch.Tensor) or value.shape != logits.shape[:1]:
                raise InputError(
                    f"a callable target must return a [batch] tensor, got "
                    f"{getattr(value, 'shape', type(value).__name__)}"
                )
            return value
        self.fill_predictions(logits.detach())
        rows = torch.arange(logits.shape[0], device=logits.device)
        ids: Int[torch.Tensor, "batch"] = torch.tensor(self.target_ids, device=logits.device)
        scores = logits.log_softmax(-1) if self.mode == "logprob" else logits
        value = scores[rows, ids]
        if any(c is not None for c in self.contrast_ids):
            if any(c is None for c in self.contrast_ids):
                raise InputError("give a contrast token for every row or for none")
            value = value - scores[rows, torch.tensor(self.contrast_ids, device=logits.device)]
        elif self.mode == "demean":
            value = value - logits.mean(-1)
        elif self.mode == "topk_avg":
            value = value - logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values.mean(-1)
        return value

    def describe(self, model=None) -> str:
        if callable(self.mode):
            return f"custom target {getattr(self.mode, '__name__', 'callable')}"

        def name(i):
            return "top-1" if i is None else _token_name(model, i)

        t = ", ".join(sorted({name(i) for i in self.target_ids}))
        c = [i for i in self.contrast_ids if i is not None]
        text = f"{self.mode}({t})"
        if c:
            text += " − " + f"{self.mode}(" + ", ".join(sorted({name(i) for i in c})) + ")"
        elif self.mode == "demean":
            text += " − mean logit"
        elif self.mode == "topk_avg":
            text += f" − mean top-{self.top_k} logit"
        return text


def _token_name(model, token_id: int) -> str:
    """``'mary'`` (the decoded token, quoted and escaped by ``repr``) or the bare id without a model."""
    if model is not None:
        try:
            return repr(model.to_string(torch.tensor([token_id])))
        except Exception:  # noqa: BLE001 - display only
            pass
    return str(token_id)
