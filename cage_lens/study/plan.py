"""The execution plan of a study, shared by both engines (in-process :mod:`cage_lens.study.runner`,
:mod:`cage_lens.study.ray_engine`): entries cut into chunks, the model order, and the store reads and
writes every engine does the same way (pending chunks, the anchor model's rows of a paired study)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from cage_lens.study.cases import ChunkResult
from cage_lens.study.models import StudyModel
from cage_lens.study.records import Entry
from cage_lens.study.settings import StudySettings
from cage_lens.study.store import Store, table_bytes

__all__ = ["Plan", "pending_chunks", "anchor_rows", "anchor_vocab", "write_result"]


@dataclass
class Plan:
    """Everything a worker needs besides the model: entries, settings, checker, chunking."""

    entries: list[Entry]
    settings: StudySettings
    checker: Callable | None
    models: list[StudyModel]
    sibling: StudyModel | None

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.entries) / self.settings.chunk_size)

    def chunk_entries(self, chunk: int) -> list[Entry]:
        cs = self.settings.chunk_size
        return self.entries[chunk * cs: (chunk + 1) * cs]

    def order(self) -> list[int]:
        """Model indices, the ``cases_from`` model first (the others read its shards)."""
        idx = list(range(len(self.models)))
        anchor = self.settings.cases_from
        return sorted(idx, key=lambda i: self.models[i].name != anchor) if anchor else idx

    def anchor_index(self) -> int | None:
        anchor = self.settings.cases_from
        return next((i for i, m in enumerate(self.models) if m.name == anchor), None) if anchor else None


def pending_chunks(plan: Plan, store: Store) -> dict[int, list[int]]:
    done = store.done()
    return {mi: [k for k in range(plan.n_chunks) if Store.chunk_name(mi, k) not in done] for mi in plan.order()}


def anchor_rows(store: Store, plan: Plan, chunk: int, model_index: int) -> dict[int, dict] | None:
    """The cases_from model's rows of ``chunk`` (for the other models of a paired study)."""
    ai = plan.anchor_index()
    if ai is None or ai == model_index:
        return None
    return {r["record"]: r for r in store.read_chunk(Store.chunk_name(ai, chunk))}


def anchor_vocab(store: Store, plan: Plan, model_index: int) -> str | None:
    ai = plan.anchor_index()
    if ai is None or ai == model_index:
        return None
    info = store.model_info(ai)
    return info["vocab"] if info else None


def write_result(store: Store, name: str, result: ChunkResult, graph: bool) -> None:
    store.write_chunk(name, table_bytes(result.rows), result.graphs if graph else None)
