"""Errors raised by cage_lens. All are ``ValueError`` subclasses so plain ``except ValueError`` works."""


class CageLensError(ValueError):
    """Base class: a problem with what was passed to cage_lens, explained in words."""


class UnsupportedModelError(CageLensError):
    """The model does not expose what the LRP rules need (hooks, config fields, architecture)."""


class InputError(CageLensError):
    """Bad prompt, token, position or batch shape."""


class NumericalError(CageLensError):
    """Relevance came out NaN or infinite."""


class InsufficientMemoryError(CageLensError):
    """A run predicted not to fit the memory available (``cage_lens.estimate``), refused before it starts."""


def first_line(err: BaseException) -> str:
    """The message on one line: its first line (with the next one when the first ends in a colon)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
