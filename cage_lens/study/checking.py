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

import enum
import functools
import hashlib
import inspect
import re
import sys
import sysconfig
import types
from pathlib import Path
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


class Unfingerprintable(Exception):
    """A checker refers to a value whose state cannot be fingerprinted (named in the message)."""


_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def _installed_code(module_name: str | None) -> bool:
    """Whether a module is installed code (the standard library or site-packages): identified by name,
    its version being that of its package, rather than hashed."""
    module = sys.modules.get(module_name or "")
    origin = getattr(module, "__file__", None)
    if module_name in sys.builtin_module_names or origin is None:
        return module_name not in (None, "__main__")
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return any(Path(origin).resolve().is_relative_to(Path(r).resolve()) for r in roots)


class _Fingerprint:
    """A sha256 of what a checker's verdicts depend on (docs/study.md#resume): the code of its functions
    (bytecode, constants, nested code), their defaults, closure values and the globals they read,
    followed into functions of the user's own modules; an instance's class, ``__call__`` and state.
    Stable across processes (no ids, no salted hashes, sets sorted). Modules, classes and functions of
    installed packages count by name. Anything else raises :class:`Unfingerprintable`."""

    def __init__(self):
        self.done: dict[int, tuple[object, str]] = {}  # id -> (the value, kept alive; its digest)
        self.active: set[int] = set()

    def digest(self, value) -> str:
        return self.encode(value, "the checker")[:32]

    def encode(self, value, where: str) -> str:
        """A sha256 hex digest of ``value``'s content (equal content, equal digest, whatever the path)."""
        if isinstance(value, _PLAIN):
            text = f"{type(value).__name__}:{value!r}"
        elif id(value) in self.done:
            return self.done[id(value)][1]
        elif id(value) in self.active:  # a cycle (a recursive function): named, not followed
            return f"cycle:{type(value).__qualname__}:{getattr(value, '__qualname__', '')}"
        else:
            self.active.add(id(value))
            try:
                text = self._encode(value, where)
            finally:
                self.active.discard(id(value))
        digest = hashlib.sha256(text.encode()).hexdigest()
        if not isinstance(value, _PLAIN):
            self.done[id(value)] = (value, digest)
        return digest

    def _encode(self, value, where: str) -> str:
        if isinstance(value, (list, tuple)):
            return f"{type(value).__name__}[" + ",".join(self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)) + "]"
        if isinstance(value, (set, frozenset)):
            return f"{type(value).__name__}{{" + ",".join(sorted(self.encode(v, f"{where} item") for v in value)) + "}"
        if isinstance(value, dict):
            items = sorted(f"{self.encode(k, where)}:{self.encode(v, f'{where}[{k!r}]')}" for k, v in value.items())
            return "dict{" + ",".join(items) + "}"
        if isinstance(value, types.ModuleType):
            return f"module:{value.__name__}"
        if inspect.iscode(value):
            return self._code(value, where)
        if isinstance(value, type):
            return f"class:{value.__module__}.{value.__qualname__}"
        if isinstance(value, enum.Enum):
            return f"enum:{type(value).__qualname__}.{value.name}"
        if isinstance(value, functools.partial):
            return "partial(" + ",".join(self.encode(v, f"{where} (partial)") for v in (value.func, value.args, value.keywords)) + ")"
        if isinstance(value, re.Pattern):
            return f"pattern:{value.pattern!r}/{value.flags}"
        if inspect.ismethod(value):
            return "method(" + self.encode(value.__func__, where) + "," + self.encode(value.__self__, f"{where}.__self__") + ")"
        if inspect.isfunction(value):
            return self._function(value, where)
        if inspect.isbuiltin(value) or isinstance(value, (types.MethodWrapperType, types.WrapperDescriptorType)):
            return f"builtin:{getattr(value, '__module__', None)}.{getattr(value, '__qualname__', value)}"
        return self._instance(value, where)

    def _code(self, code, where: str) -> str:
        consts = ",".join(self.encode(c, f"{where} (constant)") for c in code.co_consts)
        return f"code:{code.co_code.hex()}:{code.co_names}:{code.co_freevars}:[{consts}]"

    def _function(self, fn, where: str) -> str:
        name = f"{fn.__module__}.{fn.__qualname__}"
        if _installed_code(fn.__module__):
            return f"function:{name}"
        parts = [f"function:{name}", self.encode(fn.__code__, f"{name} (code)"),
                 self.encode(fn.__defaults__, f"the defaults of {name}"),
                 self.encode(fn.__kwdefaults__, f"the keyword defaults of {name}")]
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name bound later)
                content = None
            parts.append(f"{var}=" + self.encode(content, f"the closure variable {var!r} of {name}"))
        for glob in sorted(_global_names(fn.__code__)):
            if glob in fn.__globals__:
                parts.append(f"{glob}=" + self.encode(fn.__globals__[glob], f"the global {glob!r} read by {name}"))
        return "(" + ";".join(parts) + ")"

    def _instance(self, value, where: str) -> str:
        array = _array_bytes(value)
        if array is not None:
            return array
        cls = type(value)
        parts = [f"instance:{cls.__module__}.{cls.__qualname__}"]
        call = getattr(cls, "__call__", None)
        if inspect.isfunction(call):
            parts.append(self.encode(call, f"{cls.__qualname__}.__call__"))
        state = _state(value)
        if state is None:
            raise Unfingerprintable(f"{where} is a {cls.__module__}.{cls.__qualname__}, whose state cannot be fingerprinted")
        parts.append(self.encode(state, f"{where} (its attributes)"))
        return "(" + ";".join(parts) + ")"


def _global_names(code) -> set[str]:
    """Names a code object (and the code nested in it) looks up: globals, and attribute names, which
    are harmless extras when they coincide with a global."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _global_names(const)
    return names


def _state(value) -> dict | None:
    """The attributes of a plain Python object (``__dict__`` and ``__slots__``); None for an object
    whose state lives in C (a compiled tokenizer, a lock …)."""
    classes = [c for c in type(value).__mro__ if c is not object]
    if not hasattr(value, "__dict__") and not any("__slots__" in vars(c) for c in classes):
        return None
    state = dict(vars(value)) if hasattr(value, "__dict__") else {}
    for cls in classes:
        for slot in vars(cls).get("__slots__", ()):
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                state[slot] = getattr(value, slot)
    return state


def _array_bytes(value) -> str | None:
    """dtype, shape and a sha256 of the values of a tensor or numpy array; None for anything else."""
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if hasattr(value, "tobytes") and hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"array:{value.dtype}:{tuple(value.shape)}:{hashlib.sha256(value.tobytes()).hexdigest()}"
    return None


def describe_checker(checker: Callable | None, version: str | None = None) -> dict | None:
    """What identifies a checker between runs (docs/study.md#resume): its qualified name and a
    fingerprint of its code, defaults, closure values and the globals it reads (:class:`_Fingerprint`).
    A checker that cannot be fingerprinted is refused unless ``version`` names its behaviour (a label
    the user changes whenever the checker changes); a resumed study with a different description is
    refused."""
    if checker is None:
        if version is not None:
            raise InputError("checker_version was given without a checker")
        return None
    if not callable(checker):
        raise InputError(f"checker must be a callable checker(record, text) -> verdict, got {type(checker).__name__}")
    if version is not None and (not isinstance(version, str) or not version):
        raise InputError(f"checker_version must be a non-empty string, got {version!r}")
    target = checker.__func__ if inspect.ismethod(checker) else checker
    owner = target if inspect.isfunction(target) else type(checker)
    out: dict[str, Any] = {"name": f"{owner.__module__}.{owner.__qualname__}"}
    try:
        out["fingerprint"] = _Fingerprint().digest(checker)
    except Unfingerprintable as why:
        if version is None:
            raise InputError(
                f"the checker {out['name']} cannot be fingerprinted: {why}; a resumed study could not tell whether "
                "its verdicts changed. Pass checker_version='…' (change it whenever the checker's behaviour changes)"
            ) from None
    if version is not None:
        out["version"] = version
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
