"""Save and load results: one safetensors file per result, with a JSON header (see docs/results.md).

>>> graph.save("graph.safetensors")
>>> graph = cage_lens.load("graph.safetensors")          # or CircuitGraph.load(...)

Tensors are stored bit-exactly in the safetensors body; everything else (strings, numbers, nested
result objects, the provenance in ``meta``) goes into the JSON header, stored under the safetensors
metadata key ``"cage_lens"``. A result is encoded field by field from its dataclass definition, so a
field is never dropped silently: a value that cannot be stored raises. Only the result classes of
:data:`CLASSES` are ever rebuilt from a file (nothing else is imported on load).

:func:`provenance` is what the builders (``attribute``, ``circuit_graph``, ``cage``,
``explain_failure``) put into a result's ``meta``: library versions, model name and architecture,
rules, target and settings.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import json
import os
import tempfile
import types
import typing
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from cage_lens.errors import InputError

__all__ = ["SCHEMA_VERSION", "CLASSES", "Saveable", "save", "load", "read_header", "provenance", "SavedCallable"]

SCHEMA_VERSION = 2
FORMAT = "cage_lens.result"
HEADER_KEY = "cage_lens"
#: the keys of a header, each with the JSON type it must have (docs/results.md#file-format)
HEADER_SCHEMA = {"format": str, "schema_version": int, "kind": str, "written_by": dict, "provenance": dict,
                 "result": dict}
#: the dtypes a file may name (looked up in this table, never as an attribute of torch)
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128)}

# the classes a file may name, and where they live (nothing outside this table is ever imported)
CLASSES = {
    "Attribution": "cage_lens.attribution",
    "NeuronRelevance": "cage_lens.attribution",
    "ConservationReport": "cage_lens.attribution",
    "Target": "cage_lens.targets",
    "RuleSet": "cage_lens.core.rulesets",
    "CircuitGraph": "cage_lens.circuit.graph",
    "LevelNodes": "cage_lens.circuit.graph",
    "EdgeSet": "cage_lens.circuit.graph",
    "GenerationGraph": "cage_lens.generation.graph",
    "FailureExplanation": "cage_lens.failure",
}
RESULT_KINDS = ("Attribution", "CircuitGraph", "GenerationGraph", "FailureExplanation")


def _class(name: str) -> type:
    return getattr(importlib.import_module(CLASSES[name]), name)


# ---------------------------------------------------------------------------- provenance
def library_versions() -> dict[str, str | None]:
    """Installed versions of cage_lens and the libraries that shape its numbers."""
    return dict(_installed_versions())


@functools.lru_cache(maxsize=1)
def _installed_versions() -> dict[str, str | None]:
    # package metadata is read once per process (~4 ms): every result records it
    out = {}
    for package in ("cage-lens", "transformer-lens", "torch", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    if out["cage-lens"] is None:  # running from a source tree without an install
        import cage_lens

        out["cage-lens"] = cage_lens.__version__
    return out


def _zoo_origin(name: str) -> dict | None:
    """``{"model": "ioi-tiny", "checkpoint": "step-100" | None}`` when ``name`` is a zoo directory."""
    path = Path(name)
    if not (path / "zoo.json").is_file():
        return None
    if path.parent.name == "checkpoints":
        return {"model": path.parent.parent.name, "checkpoint": path.name}
    return {"model": path.name, "checkpoint": None}


def model_info(model) -> dict:
    """Name, class, dtype and architecture of a TransformerLens model."""
    from cage_lens.core.adapter import adapt

    cfg = model.cfg
    name = getattr(cfg, "model_name", None)
    tokenizer = getattr(getattr(model, "tokenizer", None), "name_or_path", None)
    if name in (None, "", "custom") and tokenizer:
        name = tokenizer
    return {
        "name": None if name is None else str(name),
        "class": type(model).__name__,
        "original_architecture": getattr(cfg, "original_architecture", None),
        "tokenizer": None if tokenizer is None else str(tokenizer),
        "dtype": str(getattr(cfg, "dtype", None)).removeprefix("torch."),
        "zoo": None if name is None else _zoo_origin(str(name)),
        "architecture": dataclasses.asdict(adapt(model).arch),
    }


def _jsonable(value: Any) -> Any:
    """A JSON-ready rendering of a setting (provenance is a record, not something re-run)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else f"tensor of shape {list(value.shape)}"
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):  # a RuleSet
        return _jsonable(value.to_dict())
    if callable(value):
        return f"callable {_callable_name(value)}"
    if hasattr(value, "tolist") and hasattr(value, "shape"):  # numpy scalars and arrays
        return value.tolist() if getattr(value, "size", 1) <= 64 else f"array of shape {list(value.shape)}"
    return repr(value)


def provenance(model, **settings) -> dict:
    """What produced a result: library versions, the model (name, class, dtype, architecture) and
    the call's settings (rules, target, thresholds …), with a UTC time stamp. JSON-ready."""
    return {
        "versions": library_versions(),
        "model": model_info(model),
        "settings": {k: _jsonable(v) for k, v in settings.items()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------- encoding
def _callable_name(fn) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{module}.{name}" if module else name


class SavedCallable:
    """Stands in for a function that was part of a saved result (a custom target, say). Functions are
    not stored, only their name; calling this refuses and says how to re-attach the function."""

    def __init__(self, name: str):
        self.qualified_name = name
        self.__name__ = name.rsplit(".", 1)[-1]

    def __call__(self, *args, **kwargs):
        raise InputError(
            f"the function {self.qualified_name} was saved by name only; functions are not stored in "
            "result files. Re-run with the function itself to recompute."
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, SavedCallable) and other.qualified_name == self.qualified_name

    def __hash__(self) -> int:
        return hash(self.qualified_name)

    def __repr__(self) -> str:
        return f"SavedCallable({self.qualified_name!r})"


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"{len(self.tensors)}:{path}"
            self.tensors[key] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            name = type(value).__name__
            if name not in CLASSES or _class(name) is not type(value):
                raise InputError(f"cannot save {path}: {type(value).__qualname__} is not a cage_lens result class")
            fields = {f.name: self(getattr(value, f.name), f"{path}.{f.name}")
                      for f in dataclasses.fields(value) if f.init and not f.name.startswith("_")}
            return {"__class__": name, "fields": fields}
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: self(v, f"{path}.{k}") for k, v in value.items()}
            return {"__dict__": [[self(k, f"{path}.key"), self(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [self(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in DTYPES:
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, SavedCallable):
            return {"__callable__": value.qualified_name}
        if callable(value):
            return {"__callable__": _callable_name(value)}
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
            return self(value.item(), path)
        raise InputError(f"cannot save {path}: values of type {type(value).__name__} have no stored form")


_TAGS = {"__tensor__": str, "__class__": str, "__tuple__": list, "__dict__": list, "__dtype__": str, "__callable__": str}


class _Decoder:
    """Rebuilds a result from a header body that :func:`_check_body` accepted; every dataclass it builds
    is checked against its field annotations (:func:`_check_fields`) and value ranges (:data:`_RANGES`)."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: str):
        self.tensors, self.path = tensors, path

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "__tensor__" in value:
            key = value["__tensor__"]
            if key not in self.tensors:
                raise InputError(f"{self.path} is damaged: tensor {key!r} is missing from the file")
            return self.tensors[key]
        if "__class__" in value:
            return self._dataclass(value["__class__"], value["fields"])
        if "__dict__" in value:
            return {self(k): self(v) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(self(v) for v in value["__tuple__"])
        if "__dtype__" in value:
            return DTYPES[value["__dtype__"]]
        if "__callable__" in value:
            return SavedCallable(value["__callable__"])
        return {k: self(v) for k, v in value.items()}

    def _dataclass(self, name: str, stored: dict) -> Any:
        cls = _class(name)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(stored) - known)
        if unknown:
            raise InputError(
                f"{self.path} stores {name} fields {unknown} that this cage_lens does not know; "
                "it was written by a different version. Load it with the cage_lens that wrote it."
            )
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in stored
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise InputError(f"{self.path} is missing {name} fields {missing}; it is damaged or from another version")
        values = {k: self(v) for k, v in stored.items()}
        _check_fields(cls, values, f"{self.path}: {name}")
        try:
            obj = cls(**values)
        except InputError as err:  # a class that validates itself (RuleSet) says what is wrong
            raise InputError(f"{self.path}: {err}") from None
        _check_ranges(name, obj, f"{self.path}: {name}")
        return obj


# ---------------------------------------------------------------------------- header schema
def _damaged(path, what: str) -> InputError:
    return InputError(f"{path} has a damaged result header: {what}. Re-save the result with cage_lens")


def _check_header(header: Any, path) -> dict:
    """The header's keys, their JSON types and ``schema_version``'s range, before any field is used."""
    if not isinstance(header, dict):
        raise _damaged(path, f"it is a JSON {type(header).__name__}, not an object")
    unknown = sorted(set(header) - set(HEADER_SCHEMA))
    missing = [k for k in HEADER_SCHEMA if k not in header]
    if unknown or missing:
        raise _damaged(path, f"unknown keys {unknown}" if unknown else f"no {missing[0]!r}")
    if header["format"] != FORMAT:
        raise InputError(f"{path} is not a cage_lens result file (format {header['format']!r})")
    for key, kind in HEADER_SCHEMA.items():
        value = header[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _damaged(path, f"{key} is the {type(value).__name__} {_short(value)}, it must be "
                                 f"{'an integer' if kind is int else 'a JSON ' + ('string' if kind is str else 'object')}")
    stored = header["schema_version"]
    if stored > SCHEMA_VERSION:
        writer = header["written_by"].get("cage-lens")
        raise InputError(
            f"{path} uses result schema {stored} (written by cage_lens {_short(writer)}); this cage_lens "
            f"{library_versions()['cage-lens']} reads schema {SCHEMA_VERSION} and older. Upgrade cage_lens to load it."
        )
    if stored < 1:
        raise _damaged(path, f"schema_version {stored} does not exist (schemas start at 1)")
    if header["kind"] not in RESULT_KINDS:
        raise InputError(f"{path} holds an unknown result kind {_short(header['kind'])}")
    bad = [k for k, v in header["written_by"].items() if not (v is None or isinstance(v, str))]
    if bad:
        raise _damaged(path, f"written_by[{bad[0]!r}] is not a version string")
    _check_body(header["result"], "result", path)
    if header["result"].get("__class__") != header["kind"]:
        raise _damaged(path, f"its kind is {header['kind']} but its result is {_short(header['result'].get('__class__'))}")
    return header


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_body(value: Any, where: str, path) -> None:
    """Every tagged value of the encoded result has exactly its tag's form (docs/results.md#file-format):
    a known class with a ``fields`` object, a dtype from :data:`DTYPES`, a tensor key, pairs for a dict."""
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_body(v, f"{where}[{i}]", path)
        return
    if not isinstance(value, dict):
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise _damaged(path, f"{where} holds a {type(value).__name__}")
        return
    tags = [k for k in value if k in _TAGS]
    if not tags:
        for k, v in value.items():
            if k.startswith("__"):
                raise _damaged(path, f"{where} has the unknown tag {_short(k)}")
            _check_body(v, f"{where}.{k}", path)
        return
    tag = tags[0]
    allowed = {"__class__", "fields"} if tag == "__class__" else {tag}
    if set(value) != allowed or not isinstance(value[tag], _TAGS[tag]):
        raise _damaged(path, f"{where} is not a valid {tag} entry ({_short(value)})")
    if tag == "__class__":
        if value[tag] not in CLASSES:
            raise InputError(f"{path}: {where} names an unknown class {_short(value[tag])}; it was not written by this cage_lens")
        if not isinstance(value["fields"], dict):
            raise _damaged(path, f"{where}.fields is not an object")
        for k, v in value["fields"].items():
            _check_body(v, f"{where}.{k}", path)
    elif tag == "__dtype__" and value[tag] not in DTYPES:
        raise _damaged(path, f"{where} names the dtype {_short(value[tag])}, which is not one of {', '.join(DTYPES)}")
    elif tag == "__dict__":
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in value[tag]):
            raise _damaged(path, f"{where} is not a list of [key, value] pairs")
        for i, (k, v) in enumerate(value[tag]):
            _check_body(k, f"{where}.key{i}", path)
            _check_body(v, f"{where}[{i}]", path)
    elif tag == "__tuple__":
        _check_body(value[tag], where, path)


def _check_fields(cls: type, values: dict, where: str) -> None:
    """Each decoded field has the type its annotation names (tensors: dtype kind and number of axes)."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _conforms(value, hints[name]):
            raise InputError(f"{where}.{name} holds {_short(value) if not isinstance(value, torch.Tensor) else _describe(value)}, "
                             f"which is not a {_type_name(hints[name])}; the file is damaged")


def _describe(t: torch.Tensor) -> str:
    return f"a {str(t.dtype).removeprefix('torch.')} tensor of shape {list(t.shape)}"


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        return not args or (len(args) == len(value) and all(_conforms(v, a) for v, a in zip(value, args)))
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if origin is collections.abc.Callable or hint is typing.Callable:
        return callable(value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)  # classes, dict, str, jaxtyping tensor types (dtype kind and axes)
    return True


def _check_ranges(name: str, obj: Any, where: str) -> None:
    problem = _RANGES.get(name, lambda _: None)(obj)
    if problem:
        raise InputError(f"{where}: {problem}; the file is damaged")


def _attribution_ranges(a) -> str | None:
    batch, width = a.tokens.shape
    if len(a.lengths) != batch or len(a.positions) != batch or len(a.str_tokens) != batch:
        return f"lengths, positions and str_tokens must have one entry per row ({batch} rows)"
    for row, (n, p) in enumerate(zip(a.lengths, a.positions)):
        if not 0 < n <= width or not 0 <= p < n:
            return f"row {row} has length {n} and position {p}, outside its {width} tokens"
    if a.rule_set is not None and a.rules != a.rule_set.name:
        return f"rules {a.rules!r} is not the name of its rule set {a.rule_set.name!r}"
    return None


def _graph_ranges(g) -> str | None:
    if len(g.str_tokens) != g.tokens.shape[0] or not 0 <= g.position < len(g.str_tokens):
        return f"position {g.position} or the {len(g.str_tokens)} token strings do not fit its {g.tokens.shape[0]} tokens"
    if g.rule_set is not None and g.rules != g.rule_set.name:
        return f"rules {g.rules!r} is not the name of its rule set {g.rule_set.name!r}"
    return None


def _generation_ranges(g) -> str | None:
    rows, nodes = g.adjacency.shape
    if g.table.shape != g.adjacency.shape or g.n_prompt < 1 or nodes != g.n_prompt + rows or len(g.labels) != nodes:
        return f"n_prompt {g.n_prompt}, {len(g.labels)} labels and tables of shape {list(g.adjacency.shape)} do not fit"
    return None


#: value ranges beyond the field types, per class
_RANGES = {"Attribution": _attribution_ranges, "CircuitGraph": _graph_ranges, "GenerationGraph": _generation_ranges}


def _upgrade(header: dict, path) -> dict:
    """A schema-1 header in schema 2: results record their rule set by value (``rule_set``), rebuilt
    from the values schema 1 kept in the provenance (``meta["rule_set"]`` / ``settings["rule_set"]``) or,
    for a built-in name, from the built-in."""
    if header["schema_version"] == 1:
        _add_rule_sets(header["result"], path)
    return header


def _add_rule_sets(value: Any, path) -> None:
    if isinstance(value, list):
        for v in value:
            _add_rule_sets(v, path)
        return
    if not isinstance(value, dict):
        return
    if value.get("__class__") in ("Attribution", "CircuitGraph") and "rule_set" not in value["fields"]:
        fields = value["fields"]
        recorded = (fields.get("meta") or {}).get("rule_set") or (fields.get("settings") or {}).get("rule_set")
        if recorded is None:
            from cage_lens.core.rulesets import BUILT_IN_RULES

            if fields.get("rules") not in BUILT_IN_RULES:
                raise InputError(f"{path} (schema 1) names the rule set {_short(fields.get('rules'))} without its values; "
                                 "re-run the computation to record them")
            recorded = BUILT_IN_RULES[fields["rules"]].to_dict()
        fields["rule_set"] = {"__class__": "RuleSet", "fields": recorded}
    for v in value.values():
        _add_rule_sets(v, path)


# ---------------------------------------------------------------------------- files
def save(result, path: str | os.PathLike) -> Path:
    """Write ``result`` (an Attribution, CircuitGraph, GenerationGraph or FailureExplanation) to one
    safetensors file at ``path`` and return the path. The file is written atomically."""
    kind = type(result).__name__
    if kind not in RESULT_KINDS or _class(kind) is not type(result):
        raise InputError(f"save() takes one of {', '.join(RESULT_KINDS)}; got {type(result).__name__}")
    from safetensors.torch import save_file

    encode = _Encoder()
    body = encode(result, kind)
    header = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "written_by": library_versions(),
        "provenance": getattr(result, "meta", None) or {},
        "result": body,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(encode.tensors, tmp, metadata={HEADER_KEY: json.dumps(header, allow_nan=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a saved result (kind, schema_version, versions, provenance) without loading
    its tensors, validated against :data:`HEADER_SCHEMA` and the tag forms of docs/results.md before any
    field is used. Refuses files that are not cage_lens results, damaged headers and newer schemas."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no result file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a cage_lens result file (not readable as safetensors: {exc})") from None
    if HEADER_KEY not in metadata:
        raise InputError(f"{path} is a safetensors file but not a cage_lens result (no {HEADER_KEY!r} header)")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except ValueError as exc:
        raise _damaged(path, f"not JSON ({exc})") from None
    return _check_header(header, path)


def load(path: str | os.PathLike, expect: type | None = None):
    """Load a result saved with :func:`save` (``cage_lens.load``); ``expect`` checks its class."""
    from safetensors.torch import load_file

    header = _upgrade(read_header(path), path)
    kind = header["kind"]
    if expect is not None and expect.__name__ != kind:
        raise InputError(f"{path} holds a {kind}, not a {expect.__name__}; load it with cage_lens.load(path)")
    result = _Decoder(load_file(str(path)), str(path))(header["result"])
    if type(result).__name__ != kind:
        raise InputError(f"{path} is damaged: its header says {kind} but it holds a {type(result).__name__}")
    return result


class Saveable:
    """``save(path)`` and ``Class.load(path)`` for the result classes of :data:`RESULT_KINDS`."""

    def save(self, path) -> Path:
        """Write to one safetensors file with provenance (docs/results.md); read back with :meth:`load`."""
        return save(self, path)

    @classmethod
    def load(cls, path):
        """Read a result of this class written by :meth:`save` (refuses other result kinds and newer schemas)."""
        return load(path, expect=cls)
