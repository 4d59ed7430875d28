"""Errors raised by cage_lens. All are ``ValueError`` subclasses so plain ``except ValueError`` works."""


class CageLensError(ValueError):
    """Base class: a problem with what was passed to cage_lens, explained in words."""


class UnsupportedModelError(CageLensError):
    """The model does not expose what the LRP rules need (hooks, config fields, architecture)."""


class InputError(CageLensError):
    """Bad prompt, token, position or batch shape."""


class NumericalError(CageLensError):
    """Relevance came out NaN or infinite."""
