"""The models of a study: names, how each is loaded, and a fingerprint that identifies its weights.

A model is given as a spec string — a zoo model (``"ioi"``, ``"ioi:tiny"``, ``"ioi@100"``), a local
Hugging Face directory, or a model in the local Hugging Face cache (:mod:`cage_lens.specs`) — or, in-process only, as a loaded
TransformerLens model. Fingerprints (docs/study.md#resume): a directory's files are hashed (config,
tokenizer, weights; weight files over 256 MB are sampled: size, first and last MB); a TL name is
identified by its name; a loaded model by the sha256 of its parameters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cage_lens.errors import InputError
from cage_lens.specs import model_from_spec, spec_directory

__all__ = ["StudyModel", "study_models"]

_FULL_HASH_LIMIT = 256 * 2**20
_SAMPLE = 2**20


@dataclass
class StudyModel:
    """One model of the study: ``spec`` (a string) or ``model`` (an object), never neither."""

    name: str
    spec: str | None
    model: Any = None
    fingerprint: str = ""

    def describe(self) -> dict:
        return {"name": self.name, "spec": self.spec, "fingerprint": self.fingerprint}

    def load(self):
        return self.model if self.model is not None else model_from_spec(self.spec)


def _hash_file(h, path: Path) -> str:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(_SAMPLE), b""):
                h.update(block)
            return "full"
        h.update(f.read(_SAMPLE))
        f.seek(size - _SAMPLE)
        h.update(f.read(_SAMPLE))
        return "sampled"


def _directory_fingerprint(directory: Path) -> str:
    h = hashlib.sha256()
    kinds = set()
    files = sorted(p for p in directory.iterdir() if p.is_file() and (
        p.suffix in (".json", ".safetensors", ".bin", ".model") or p.name.endswith(".pt")))
    if not files:
        raise InputError(f"{directory} holds no model files (config.json, *.safetensors)")
    for p in files:
        kinds.add(_hash_file(h, p))
    return ("files-sampled:" if "sampled" in kinds else "files:") + h.hexdigest()[:32]


def _parameter_fingerprint(model) -> str:
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if not isinstance(p, torch.Tensor):
            continue
        t = p.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "params:" + h.hexdigest()[:32]


def _fingerprint(entry: StudyModel) -> str:
    if entry.model is not None:
        return _parameter_fingerprint(entry.model)
    directory = spec_directory(entry.spec)
    return _directory_fingerprint(directory) if directory is not None else "name:" + entry.spec


def _as_entry(name: str, value: Any) -> StudyModel:
    if isinstance(value, str):
        if not value:
            raise InputError(f"model {name!r}: empty spec")
        return StudyModel(name, value)
    if isinstance(value, Path):
        return StudyModel(name, str(value))
    if hasattr(value, "cfg") and hasattr(value, "to_tokens"):
        return StudyModel(name, None, value)
    raise InputError(f"model {name!r} must be a spec string (zoo name, local directory, TL name) or a "
                     f"TransformerLens model, got {type(value).__name__}")


def study_models(models: Any) -> list[StudyModel]:
    """``models`` as named entries: a spec or model, a list of them (spec strings name themselves,
    objects become ``model0``, ``model1``…) or a dict ``{name: spec_or_model}``."""
    if isinstance(models, dict):
        items = list(models.items())
    elif isinstance(models, (list, tuple)):
        items = [(v if isinstance(v, str) else str(v) if isinstance(v, Path) else f"model{i}", v)
                 for i, v in enumerate(models)]
    else:
        items = [(models if isinstance(models, str) else str(models) if isinstance(models, Path) else "model0", models)]
    if not items:
        raise InputError("a study needs at least one model")
    names = [str(n) for n, _ in items]
    if len(set(names)) != len(names):
        raise InputError(f"model names must be unique, got {names}")
    entries = [_as_entry(str(n), v) for n, v in items]
    for e in entries:
        e.fingerprint = _fingerprint(e)
    return entries
