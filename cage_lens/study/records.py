"""Study records: what a failure study reads, from Python lists, JSONL files or ``datasets`` objects.

A record is ``{"id": optional, "prompt": str, "answer": optional str, "segments": optional
{name: [start_char, end_char]}}``; any other fields are kept in ``Record.extra`` (a checker may read
them). A record that cannot be read is kept as a :class:`Malformed` entry so that the study stores it
as skipped, with the reason, instead of stopping (see docs/study.md#records).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

from cage_lens.errors import InputError

__all__ = ["Record", "Malformed", "Entry", "read_records", "dataset_fingerprint", "RESERVED_SEGMENTS"]

#: names the study gives to tokens outside the record's own segments (see docs/study.md#segments)
RESERVED_SEGMENTS = ("_generated", "_other")


@dataclass(frozen=True)
class Record:
    """One dataset item. ``index`` is its position in the dataset (the store's key with the model)."""

    index: int
    prompt: str
    id: str | None = None
    answer: str | None = None
    segments: dict[str, tuple[int, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def canonical(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer,
                "segments": {k: list(v) for k, v in self.segments.items()}, "extra": self.extra}


@dataclass(frozen=True)
class Malformed:
    """A dataset item that could not be read as a record; stored as a skipped case with ``reason``."""

    index: int
    reason: str
    id: str | None = None
    prompt: str | None = None

    def canonical(self) -> dict:
        return {"malformed": self.reason, "id": self.id, "prompt": self.prompt}


Entry = Union[Record, Malformed]


def _record_id(raw: dict) -> str | None:
    value = raw.get("id")
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def _segments(raw_segments: Any, prompt: str) -> dict[str, tuple[int, int]]:
    if raw_segments is None:
        return {}
    if not isinstance(raw_segments, dict):
        raise InputError(f"segments must be a mapping {{name: [start_char, end_char]}}, got {type(raw_segments).__name__}")
    out = {}
    for name, span in raw_segments.items():
        if span is None:  # a `datasets` struct column fills absent segment names with None
            continue
        if not isinstance(name, str) or not name or name.startswith("_"):
            raise InputError(f"segment name {name!r} must be a non-empty string not starting with '_' "
                             f"(reserved for {', '.join(RESERVED_SEGMENTS)})")
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
            raise InputError(f"segment {name!r} must be [start_char, end_char] (two ints), got {span!r}")
        start, end = span
        if not 0 <= start < end <= len(prompt):
            raise InputError(f"segment {name!r} = [{start}, {end}] is not a non-empty range inside the prompt "
                             f"of {len(prompt)} characters")
        out[name] = (start, end)
    return out


def _jsonable(value: Any) -> Any:
    """Extra fields as JSON (for the dataset fingerprint); anything else by repr."""
    return json.loads(json.dumps(value, default=repr))


def parse_record(index: int, raw: Any) -> Entry:
    """A :class:`Record`, or a :class:`Malformed` entry saying what is wrong with ``raw``."""
    if isinstance(raw, Record):
        return Record(index, raw.prompt, raw.id, raw.answer, dict(raw.segments), dict(raw.extra))
    if not isinstance(raw, dict):
        return Malformed(index, f"record {index} is a {type(raw).__name__}, not a mapping with a 'prompt'")
    rid = _record_id(raw)
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return Malformed(index, f"record {index} has no prompt (a non-empty string)", rid)
    answer = raw.get("answer")
    if answer is not None and (not isinstance(answer, str) or answer == ""):
        return Malformed(index, f"record {index}: answer must be a non-empty string, got {answer!r}", rid, prompt)
    if "id" in raw and raw["id"] is not None and rid is None:
        return Malformed(index, f"record {index}: id must be a string or an int, got {raw['id']!r}", None, prompt)
    try:
        segments = _segments(raw.get("segments"), prompt)
    except InputError as err:
        return Malformed(index, f"record {index}: {err}", rid, prompt)
    extra = {k: _jsonable(v) for k, v in raw.items() if k not in ("id", "prompt", "answer", "segments")}
    return Record(index, prompt, rid, answer, segments, extra)


def _jsonl(path: Path) -> list[Any]:
    items: list[Any] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                items.append(_BadLine(f"line {line_no} of {path.name} is not valid JSON ({err.msg})"))
    return items


@dataclass(frozen=True)
class _BadLine:
    reason: str


def _raw_items(source: Any) -> list[Any]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{str(source)!r} is not a file; pass a JSONL file, a list of records or a datasets.Dataset")
        return _jsonl(path)
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):
        if isinstance(source.column_names, dict):  # a DatasetDict: several splits
            raise InputError(f"got a dataset with splits {list(source.column_names)}; pass one split, e.g. data['test']")
        return [dict(row) for row in source]
    if isinstance(source, (list, tuple)):
        return list(source)
    if isinstance(source, Iterable) and not isinstance(source, (dict, bytes)):
        return list(source)
    raise InputError(f"cannot read records from a {type(source).__name__}; pass a list of dicts, a JSONL path "
                     "or a datasets.Dataset")


def read_records(source: Any) -> list[Entry]:
    """Every item of ``source`` as a :class:`Record` or a :class:`Malformed` entry (duplicate ids too)."""
    items = _raw_items(source)
    if not items:
        raise InputError("the dataset has no records")
    entries: list[Entry] = []
    first_seen: dict[str, int] = {}
    for index, raw in enumerate(items):
        entry = Malformed(index, raw.reason) if isinstance(raw, _BadLine) else parse_record(index, raw)
        if isinstance(entry, Record) and entry.id is not None:
            if entry.id in first_seen:
                entry = Malformed(index, f"record {index} repeats id {entry.id!r} (first used by record "
                                  f"{first_seen[entry.id]})", entry.id, entry.prompt)
            else:
                first_seen[entry.id] = index
        entries.append(entry)
    return entries


def dataset_fingerprint(entries: list[Entry]) -> str:
    """sha256 of the canonical JSON of every entry, in order: a resumed study must read the same data."""
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps(e.canonical(), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()
