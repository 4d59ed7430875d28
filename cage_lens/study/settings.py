"""Settings of a failure study: everything that changes its numbers, recorded in the store's manifest."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from cage_lens.errors import InputError
from cage_lens.inputs import check_number

__all__ = ["StudySettings"]

_RULES = ("attnlrp", "cplrp", "gxi")
_LEVELS = ("block", "half", "heads", "neurons")


@dataclass(frozen=True)
class StudySettings:
    """``rules``: LRP rules of the attribution; ``top_k``: contrast candidates per model (10 in Tan et
    al.); ``min_delta``: cases with Δℓ ≤ this are dropped (counted as ``low_delta``); ``max_new_tokens``:
    greedy steps without a verdict before a case is ``undecided`` (reference answers stop after their
    own length); ``chunk_size``: records per shard (and per batched forward/backward); ``graph``: also
    build a pruned cross-layer graph per case with ``graph_levels`` / ``graph_options``;
    ``stop_at_eos``: an EOS token ends the continuation; ``cases_from``: a model name — every other
    model explains that model's cases instead of its own (paired comparisons); ``prepend_bos``: as in
    :func:`cage_lens.attribute`."""

    rules: str = "attnlrp"
    top_k: int = 10
    min_delta: float = 1.0
    max_new_tokens: int = 32
    chunk_size: int = 16
    graph: bool = False
    graph_levels: str = "half"
    graph_options: dict = field(default_factory=dict)
    stop_at_eos: bool = True
    cases_from: str | None = None
    prepend_bos: bool | None = None

    def __post_init__(self):
        if self.rules not in _RULES:
            raise InputError(f"rules must be one of {', '.join(_RULES)}, got {self.rules!r}")
        for name in ("top_k", "max_new_tokens", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        # NaN would switch the Δℓ filter off (Δℓ <= nan is never true) and make the store unresumable
        object.__setattr__(self, "min_delta", check_number(self.min_delta, "min_delta"))
        if self.graph_levels not in _LEVELS:
            raise InputError(f"graph_levels must be one of {', '.join(_LEVELS)}, got {self.graph_levels!r}")
        if not isinstance(self.graph_options, dict):
            raise InputError(f"graph_options must be a dict of circuit_graph keyword arguments, got {self.graph_options!r}")
        forbidden = {"target", "contrast", "rules", "levels", "inputs", "position", "mode"} & set(self.graph_options)
        if forbidden:
            raise InputError(f"graph_options cannot set {sorted(forbidden)}: the study sets them per case")
        for key, value in self.graph_options.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"graph_options[{key!r}] must be finite, got {value!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["min_delta"] = float(self.min_delta)
        return out
