"""Optional dependencies of the study (Ray, matplotlib): imported on first use, with a clear error."""

from __future__ import annotations

import importlib

from cage_lens.errors import CageLensError

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(CageLensError):
    """An optional dependency (an extra of the cage-lens package) is not installed."""


def require(module: str, what: str, extra: str):
    """``import module`` or raise :class:`MissingExtraError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs {module.split('.')[0]}: pip install 'cage-lens[{extra}]'") from None
