"""Is a continuation still correct? Checkers, reference answers and their verdicts.

A checker is any callable ``checker(record, text) -> verdict`` where ``text`` is the continuation
generated so far (decoded) and the verdict is one of

* ``"open"`` (or ``True``): ``text`` can still be extended to a correct answer;
* ``"wrong"`` (or ``False``): it can no longer be correct — the last token is the deviation point;
* ``"correct"``: ``text`` is a complete, correct answer (generation stops, no failure).

Without a checker every record needs an ``answer``, compared token by token (see
docs/study.md#deviation). A checker that raises, or returns anything else, marks the case as skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from typing import Any, Callable

from cage_lens.errors import InputError

__all__ = ["OPEN", "WRONG", "CORRECT", "CheckerError", "verdict", "describe_checker", "continuation_text"]

OPEN, WRONG, CORRECT = "open", "wrong", "correct"
_VERDICTS = {True: OPEN, False: WRONG, OPEN: OPEN, WRONG: WRONG, CORRECT: CORRECT}


class CheckerError(Exception):
    """The checker raised or returned something that is not a verdict (the case is skipped)."""


def verdict(checker: Callable, record, text: str) -> str:
    try:
        value = checker(record, text)
    except Exception as err:  # noqa: BLE001 - any failure of user code skips the case, with its reason
        raise CheckerError(f"the checker raised {type(err).__name__}: {err} (on continuation {text!r})") from err
    if isinstance(value, bool) or (isinstance(value, str) and value in _VERDICTS):
        return _VERDICTS[value]
    raise CheckerError(f"the checker returned {value!r} for continuation {text!r}; return True/'open', "
                       "False/'wrong' or 'correct'")


def _code_digest(code) -> str:
    """Bytecode and constants of a function, nested code objects included (names of globals too)."""
    h = hashlib.sha256(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        h.update(_code_digest(const).encode() if inspect.iscode(const) else repr(const).encode())
    return h.hexdigest()[:16]


def describe_checker(checker: Callable | None) -> dict | None:
    """What identifies a checker between runs: its qualified name, plus its code for Python functions,
    plus ``repr`` for dataclass instances. A resumed study with a different description is refused."""
    if checker is None:
        return None
    if not callable(checker):
        raise InputError(f"checker must be a callable checker(record, text) -> verdict, got {type(checker).__name__}")
    if inspect.isfunction(checker) or inspect.ismethod(checker):
        fn = checker.__func__ if inspect.ismethod(checker) else checker
        return {"name": f"{fn.__module__}.{fn.__qualname__}", "code": _code_digest(fn.__code__)}
    cls = type(checker)
    out: dict[str, Any] = {"name": f"{cls.__module__}.{cls.__qualname__}"}
    call = getattr(cls, "__call__", None)
    if inspect.isfunction(call):
        out["code"] = _code_digest(call.__code__)
    if dataclasses.is_dataclass(checker):
        out["repr"] = repr(checker)
    return out


def continuation_text(tokenizer, prompt_ids: list[int], generated_ids: list[int]) -> str:
    """The continuation as text: ``decode(prompt + generated)`` with ``decode(prompt)`` removed, so that
    tokenizers which join words with spaces give ``" mary"`` rather than ``"mary"``. When the decoded
    prompt is not a prefix of the decoded whole, the generated ids are decoded alone."""
    if not generated_ids:
        return ""
    whole = tokenizer.decode(list(prompt_ids) + list(generated_ids))
    head = tokenizer.decode(list(prompt_ids))
    if whole.startswith(head):
        return whole[len(head):]
    return tokenizer.decode(list(generated_ids))
