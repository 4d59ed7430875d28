"""The study store: a directory of append-only Parquet shards plus a manifest (docs/study.md#store).

::

    DIR/manifest.json              settings, models, checker, dataset fingerprint, cage_lens version
    DIR/models/<i>.json            per model: tokenizer vocabulary digest, context, architecture
    DIR/shards/m<i>-c<k>.parquet   one row per (model i, record) of chunk k
    DIR/graphs/m<i>-c<k>.json.gz   the chunk's cross-layer graphs (only with graph=True)

Chunk ``k`` holds records ``[k·chunk_size, (k+1)·chunk_size)``, so a shard's name says which cases it
holds and a rerun recomputes exactly the chunks whose shard is missing. Every file is written to a
temporary name in the same directory, flushed to disk and renamed (atomic on POSIX); the graphs file
of a chunk is renamed before its shard, so an existing shard always has its graphs. A killed run
leaves at most temporary files, which the next run removes.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from cage_lens.errors import CageLensError

__all__ = ["SCHEMA", "StoreError", "Store", "FORMAT"]

FORMAT = "cage_lens.study/1"

_GRAPH_METRIC = pa.struct([
    ("transition", pa.string()), ("nodes", pa.int64()), ("edges", pa.int64()), ("fan_in", pa.float64()),
    ("fan_out", pa.float64()), ("gini_edges", pa.float64()), ("gini_nodes", pa.float64()),
    ("verticality", pa.float64()), ("tokens_90", pa.int64()), ("look_back", pa.float64()),
])
_INTS, _FLOATS, _STRS = pa.list_(pa.int64()), pa.list_(pa.float64()), pa.list_(pa.string())

SCHEMA = pa.schema([
    ("model", pa.string()), ("record", pa.int64()), ("id", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("prompt", pa.string()), ("prompt_len", pa.int64()),
    ("generated_ids", _INTS), ("generated", pa.string()), ("deviation_step", pa.int64()),
    ("position", pa.int64()), ("wrong_id", pa.int64()), ("wrong", pa.string()),
    ("contrast_id", pa.int64()), ("contrast", pa.string()), ("contrast_rank", pa.int64()),
    ("contrast_source", pa.string()), ("prediction_id", pa.int64()), ("prediction", pa.string()),
    ("topk_ids", _INTS), ("topk_logits", _FLOATS), ("delta", pa.float64()), ("target_value", pa.float64()),
    ("input_share", pa.float64()), ("input_ids", _INTS), ("str_tokens", _STRS),
    ("relevance", _FLOATS), ("heatmap", _FLOATS), ("excluded", _INTS),
    ("segment_alignment", pa.string()), ("segments", pa.map_(pa.string(), _INTS)),
    ("segment_relevance", pa.map_(pa.string(), pa.float64())),
    ("segment_relevance_raw", pa.map_(pa.string(), pa.float64())),
    ("top_wrong_position", pa.int64()), ("top_wrong_token", pa.string()), ("top_wrong_segments", _STRS),
    ("top_correct_position", pa.int64()), ("top_correct_token", pa.string()), ("top_correct_segments", _STRS),
    ("trace_points", _STRS), ("trace", pa.list_(_FLOATS)),
    ("graph_metrics", pa.list_(_GRAPH_METRIC)), ("graph_nodes", pa.int64()), ("graph_edges", pa.int64()),
])


class StoreError(CageLensError):
    """The store cannot be used as asked (other settings or version, concurrent writer, corruption)."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def table_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


class Store:
    """A study directory. ``open`` checks (or writes) the manifest; ``write_chunk`` adds one shard."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.shards = self.path / "shards"
        self.graphs = self.path / "graphs"
        self.models_dir = self.path / "models"
        self._lock = None

    # -------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            raise StoreError(f"{self.path} is not a study store (no manifest.json); run a study with out={str(self.path)!r}")
        return json.loads(self.manifest_path.read_text())

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def open(self, manifest: dict, resume: bool) -> None:
        """Start a new store, or continue one written with identical settings and version."""
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a directory")
        if self.exists():
            if not resume:
                raise StoreError(f"{self.path} already holds a study; pass resume=True (--resume) to continue it, "
                                 "or choose another output directory")
            check_compatible(self.manifest(), manifest, self.path)
        elif self.path.exists() and not self._only_leftovers():
            raise StoreError(f"{self.path} is not empty and holds no study manifest; choose an empty or new directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        if not self.exists():  # the manifest comes first: a store with shards always has one
            _atomic_write(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
            _fsync_dir(self.path)
        for d in (self.shards, self.graphs, self.models_dir):
            d.mkdir(exist_ok=True)
        self._remove_temporaries()

    def _only_leftovers(self) -> bool:
        """Whether a directory without a manifest holds nothing but what a run killed before writing its
        manifest can leave: the lock file, temporary files, empty store folders."""
        for p in self.path.iterdir():
            if p.name == ".lock" or (p.name.startswith(".") and ".tmp-" in p.name):
                continue
            if p in (self.shards, self.graphs, self.models_dir) and p.is_dir() and not any(p.iterdir()):
                continue
            return False
        return True

    def _acquire_lock(self) -> None:
        import fcntl

        self._lock = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise StoreError(f"another study run is writing to {self.path}; wait for it to finish or stop it") from None

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _remove_temporaries(self) -> None:
        for d in (self.path, self.shards, self.graphs, self.models_dir):
            for p in d.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)

    # -------------------------------------------------------------- shards
    @staticmethod
    def chunk_name(model_index: int, chunk: int) -> str:
        return f"m{model_index:03d}-c{chunk:06d}"

    def done(self) -> set[str]:
        return {p.stem for p in self.shards.glob("m*-c*.parquet")}

    def write_chunk(self, name: str, shard: bytes, graphs: list[dict] | None) -> None:
        if graphs:
            payload = gzip.compress(json.dumps(graphs).encode(), mtime=0)
            _atomic_write(self.graphs / f"{name}.json.gz", payload)
        _atomic_write(self.shards / f"{name}.parquet", shard)
        _fsync_dir(self.shards)

    def write_model_info(self, model_index: int, info: dict) -> None:
        _atomic_write(self.models_dir / f"{model_index:03d}.json", json.dumps(info, sort_keys=True).encode())

    def model_info(self, model_index: int) -> dict | None:
        p = self.models_dir / f"{model_index:03d}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def read_chunk(self, name: str) -> list[dict]:
        return pq.read_table(self.shards / f"{name}.parquet").to_pylist()

    def table(self) -> pa.Table:
        files = sorted(self.shards.glob("m*-c*.parquet"))
        if not files:
            return SCHEMA.empty_table()
        return pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])

    def iter_graphs(self) -> Iterator[dict]:
        done = self.done()
        for p in sorted(self.graphs.glob("m*-c*.json.gz")):
            if p.name[: -len(".json.gz")] in done:
                yield from json.loads(gzip.decompress(p.read_bytes()))


_COMPARED = ("format", "cage_lens_version", "settings", "models", "sibling", "checker", "dataset")


def check_compatible(old: dict, new: dict, path: Path) -> None:
    """Refuse to resume a store written with other settings, models, data or cage_lens version."""
    if old.get("cage_lens_version") != new.get("cage_lens_version"):
        raise StoreError(
            f"{path} was written by cage_lens {old.get('cage_lens_version')}, this is cage_lens "
            f"{new.get('cage_lens_version')}: resuming would mix results of two versions. Start a new store "
            "(another output directory) or finish it with the version that started it"
        )
    diffs = []
    for key in _COMPARED:
        a, b = old.get(key), new.get(key)
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{k}: store {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: store {_short(a)}, now {_short(b)}")
    if diffs:
        raise StoreError(f"{path} was written with other settings ({'; '.join(diffs)}); resume with the same "
                         "settings or write to another output directory")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."
