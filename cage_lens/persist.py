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

import dataclasses
import functools
import importlib
import json
import os
import tempfile
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from cage_lens.errors import InputError

__all__ = ["SCHEMA_VERSION", "CLASSES", "Saveable", "save", "load", "read_header", "provenance", "SavedCallable"]

SCHEMA_VERSION = 1
FORMAT = "cage_lens.result"
HEADER_KEY = "cage_lens"

# the classes a file may name, and where they live (nothing outside this table is ever imported)
CLASSES = {
    "Attribution": "cage_lens.attribution",
    "NeuronRelevance": "cage_lens.attribution",
    "ConservationReport": "cage_lens.attribution",
    "Target": "cage_lens.targets",
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
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, SavedCallable):
            return {"__callable__": value.qualified_name}
        if callable(value):
            return {"__callable__": _callable_name(value)}
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
            return self(value.item(), path)
        raise InputError(f"cannot save {path}: values of type {type(value).__name__} have no stored form")


class _Decoder:
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
            return getattr(torch, value["__dtype__"])
        if "__callable__" in value:
            return SavedCallable(value["__callable__"])
        return {k: self(v) for k, v in value.items()}

    def _dataclass(self, name: str, stored: dict) -> Any:
        if name not in CLASSES:
            raise InputError(f"{self.path} names an unknown class {name!r}; it was not written by this cage_lens")
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
        return cls(**{k: self(v) for k, v in stored.items()})


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
    its tensors. Refuses files that are not cage_lens results or that need a newer cage_lens."""
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
    header = json.loads(metadata[HEADER_KEY])
    if header.get("format") != FORMAT:
        raise InputError(f"{path} is not a cage_lens result file (format {header.get('format')!r})")
    stored = header.get("schema_version")
    if not isinstance(stored, int) or stored > SCHEMA_VERSION:
        writer = (header.get("written_by") or {}).get("cage-lens")
        raise InputError(
            f"{path} uses result schema {stored} (written by cage_lens {writer}); this cage_lens "
            f"{library_versions()['cage-lens']} reads schema {SCHEMA_VERSION} and older. Upgrade cage_lens to load it."
        )
    return header


def load(path: str | os.PathLike, expect: type | None = None):
    """Load a result saved with :func:`save` (``cage_lens.load``); ``expect`` checks its class."""
    from safetensors.torch import load_file

    header = read_header(path)
    kind = header.get("kind")
    if kind not in RESULT_KINDS:
        raise InputError(f"{path} holds an unknown result kind {kind!r}")
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
