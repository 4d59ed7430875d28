"""Zoo tasks as study datasets: records with prompt, answer and segments, plus a checker that solves
the task from the prompt alone, so the whole failure-study workflow runs offline.

>>> from cage_lens.zoo.datasets import dataset
>>> data = dataset("ioi", 100, seed=0)
>>> data.records[0]["segments"]     # {"context": [0, 38], "query": [39, 59], "io": [...], ...}
>>> data.checker(data.records[0], " lucy")   # "correct" / "open" / "wrong"

Segments (character spans of the prompt; they may overlap, see docs/study.md#zoo-datasets):

* ``ioi``: ``context`` (everything before the second subject mention), ``query`` (from it to the
  end), ``io``, ``s1``, ``s2`` (the indirect object and the two subject mentions).
* ``pointer-chase``: ``facts`` (all facts), ``query`` (``start a :``), ``hop1``…``hop3`` (the fact
  each generated step reads).
* ``facts``: ``facts`` (the four facts), ``instruction`` (``list n1 n2 :``), ``listed1``,
  ``listed2`` (the facts to list, in order).
* ``arith``: ``context`` (definitions and distractors), ``query`` (``compute c :``),
  ``alias_definition``, ``value_definition``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cage_lens.errors import InputError
from cage_lens.zoo.tasks import IOI_NAMES, PC_STEPS, Sample, task

__all__ = ["dataset", "ZooDataset", "ZooChecker", "solve", "DATASET_TASKS"]

DATASET_TASKS = ("ioi", "pointer-chase", "facts", "arith")


# ---------------------------------------------------------------------------- solving from the prompt
def _solve_ioi(words: list[str]) -> list[str]:
    names = [w for w in words if w in IOI_NAMES]
    once = [n for n in dict.fromkeys(names) if names.count(n) == 1]
    if len(once) != 1:
        raise ValueError(f"not an IOI prompt: expected one name mentioned once, got names {names}")
    return once


def _solve_pointer_chase(words: list[str]) -> list[str]:
    facts = {words[i - 1]: words[i + 1] for i, w in enumerate(words) if w == ">" and 0 < i < len(words) - 1}
    if "start" not in words:
        raise ValueError("not a pointer-chase prompt: no 'start'")
    key, out = words[words.index("start") + 1], []
    for _ in range(PC_STEPS):
        key = facts[key]
        out.append(key)
    return out


def _sentences(words: list[str]) -> list[list[str]]:
    out, cur = [], []
    for w in words:
        cur.append(w)
        if w == ".":
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def _solve_facts(words: list[str]) -> list[str]:
    facts = {s[0]: s for s in _sentences(words) if len(s) == 4 and s[-1] == "."}
    query = words[words.index("list") + 1: words.index(":")]
    return [w for name in query for w in facts[name]]


def _solve_arith(words: list[str]) -> list[str]:
    defs = {s[0]: s[2] for s in _sentences(words) if len(s) == 4 and s[1] == "="}
    query = words[words.index("compute") + 1]
    alias = defs[query]
    return [query, alias, defs[alias]]


_SOLVERS = {"ioi": _solve_ioi, "pointer-chase": _solve_pointer_chase, "facts": _solve_facts, "arith": _solve_arith}


def solve(task_name: str, prompt: str) -> str:
    """The correct continuation of a zoo prompt, computed from the prompt's text (``" w1 w2 …"``)."""
    if task_name not in _SOLVERS:
        raise InputError(f"no zoo dataset for task {task_name!r}; available: {', '.join(DATASET_TASKS)}")
    return "".join(" " + w for w in _SOLVERS[task_name](prompt.split()))


@dataclass(frozen=True)
class ZooChecker:
    """Checker for a zoo task: solves the prompt and compares the continuation with the solution as
    text: ``"correct"`` once the continuation starts with it, ``"open"`` while it is a prefix of it,
    ``"wrong"`` otherwise."""

    task: str

    def __call__(self, record, text: str) -> str:
        prompt = record["prompt"] if isinstance(record, dict) else record.prompt
        expected = solve(self.task, prompt)
        if text.startswith(expected):
            return "correct"
        return "open" if expected.startswith(text) else "wrong"


# ---------------------------------------------------------------------------- segments
def _char_starts(words: list[str]) -> list[int]:
    starts, at = [], 0
    for w in words:
        starts.append(at)
        at += len(w) + 1
    return starts


def _words_span(words: list[str], first: int, stop: int) -> list[int]:
    """Characters of words ``first .. stop-1`` (word indices, not TL positions)."""
    starts = _char_starts(words)
    return [starts[first], starts[stop - 1] + len(words[stop - 1])]


def _sentence_words(span: tuple[int, int]) -> tuple[int, int]:
    """A TL token span (BOS at 0) as word indices."""
    a, b = span
    return max(a, 1) - 1, b - 1


def _segments(name: str, s: Sample) -> dict[str, list[int]]:
    words = s.prompt.split()
    if name == "ioi":
        io = s.meta["io_positions"][0] - 1
        s1, s2 = sorted(p - 1 for p in s.meta["s_positions"])
        return {"context": _words_span(words, 0, s2), "query": _words_span(words, s2, len(words)),
                "io": _words_span(words, io, io + 1), "s1": _words_span(words, s1, s1 + 1),
                "s2": _words_span(words, s2, s2 + 1)}
    spans = [_sentence_words(sp) for sp in s.sentence_spans]
    query = spans[s.query_sentences[0]]
    out = {("facts" if name in ("pointer-chase", "facts") else "context"): _words_span(words, 0, query[0]),
           ("instruction" if name == "facts" else "query"): _words_span(words, *query)}
    if name == "pointer-chase":
        for t, sent in enumerate(s.ground_truth_sentences):
            out[f"hop{t + 1}"] = _words_span(words, *spans[sent])
    elif name == "facts":
        for j, sent in enumerate(s.ground_truth_sentences):
            out[f"listed{j + 1}"] = _words_span(words, *spans[sent])
    elif name == "arith":
        pos = s.meta["definition_positions"]
        q = s.meta["query"]
        for label, var in (("alias_definition", q), ("value_definition", s.meta["aliases"][q])):
            out[label] = _words_span(words, pos[var] - 1, pos[var] + 3)
    return out


# ---------------------------------------------------------------------------- datasets
@dataclass
class ZooDataset:
    """Records (dicts: ``id``, ``prompt``, ``answer``, ``segments``) and the task's checker."""

    task: str
    records: list[dict]
    checker: ZooChecker

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def to_jsonl(self, path: str | Path) -> Path:
        import json

        path = Path(path)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
        return path


def dataset(name: str, n: int, seed: int = 0) -> ZooDataset:
    """``n`` records of zoo task ``name`` from its seeded generator (``zoo.task(name).sample(n, seed)``)."""
    if name not in DATASET_TASKS:
        raise InputError(f"no zoo dataset for task {name!r}; available: {', '.join(DATASET_TASKS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive int, got {n!r}")
    records = []
    for i, s in enumerate(task(name).sample(n, seed=seed)):
        records.append({"id": f"{name}-{seed}-{i}", "prompt": s.prompt, "answer": s.completion,
                        "segments": _segments(name, s)})
    return ZooDataset(name, records, ZooChecker(name))
