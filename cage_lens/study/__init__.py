"""Failure studies over whole datasets: the contrastive workflow of Tan et al. 2026 as one call.

>>> from cage_lens import study
>>> from cage_lens.zoo.datasets import dataset
>>> data = dataset("ioi", 200, seed=0)                        # records + checker + segments, offline
>>> study.run({"step-100": "ioi@100", "final": "ioi"}, data, "runs/ioi", cases_from="step-100")
>>> df = study.load("runs/ioi")                               # one row per record and model
>>> study.summary(df); study.compare(df, "step-100", "final"); study.report(df, "ioi.html")

Per record and model: greedy generation, the first deviation point (checker or reference answer),
the contrast token (the model's top-k, else a sibling's), the Δℓ filter, then a token heatmap,
segment relevance, layer trace and optional graph metrics, written to a resumable Parquet store,
in-process or on Ray (``engine="ray"``). See docs/study.md.

Names are imported on first use, so ``cage_lens.study.cli`` (the ``cage-lens study`` command) loads
without torch.
"""

import importlib

_EXPORTS = {
    "run": "runner", "StudyRun": "runner",
    "load": "frame", "load_graphs": "frame",
    "summary": "aggregate", "compare": "aggregate", "StudySummary": "aggregate", "Comparison": "aggregate",
    "sign_flip_test": "aggregate", "holm": "aggregate",
    "report": "reporting", "plot_segments": "reporting", "plot_delta": "reporting",
    "StudySettings": "settings", "Record": "records", "read_records": "records",
    "StoreError": "store", "MissingExtraError": "extras",
    "STATUSES": "cases", "OPEN": "checking", "WRONG": "checking", "CORRECT": "checking",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cage_lens.study' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cage_lens.study.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
