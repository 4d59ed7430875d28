"""``run``: a failure study over a dataset, written to a resumable store, in-process or on Ray."""

from __future__ import annotations

import contextlib
import json
import platform
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import cage_lens
from cage_lens.errors import InputError
from cage_lens.study.cases import ModelContext, process_chunk
from cage_lens.study.checking import describe_checker
from cage_lens.study.models import StudyModel, study_models
from cage_lens.study.plan import Plan, anchor_rows, anchor_vocab, pending_chunks, write_result
from cage_lens.study.records import dataset_fingerprint, read_records
from cage_lens.study.settings import StudySettings
from cage_lens.study.store import FORMAT, Store

__all__ = ["run", "StudyRun"]

ENGINES = ("local", "ray")


@dataclass
class StudyRun:
    """What one call of :func:`run` did. ``cases`` count (record, model) pairs, whatever their status."""

    path: Path
    engine: str
    cases_total: int
    cases_before: int
    cases_written: int
    seconds: float

    @property
    def cases_per_minute(self) -> float:
        return 60.0 * self.cases_written / self.seconds if self.seconds > 0 else float("nan")

    def load(self):
        from cage_lens.study.frame import load

        return load(self.path)

    def __repr__(self) -> str:
        return (f"StudyRun({str(self.path)!r}, engine={self.engine!r}: {self.cases_written} cases written, "
                f"{self.cases_before} already there, {self.cases_total} in all; {self.seconds:.1f} s, "
                f"{self.cases_per_minute:.0f} cases/min)")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _manifest(plan: Plan, checker_version: str | None) -> dict:
    manifest = {
        "format": FORMAT,
        "cage_lens_version": cage_lens.__version__,
        "settings": plan.settings.to_dict(),
        "models": [m.describe() for m in plan.models],
        "sibling": plan.sibling.describe() if plan.sibling else None,
        "checker": describe_checker(plan.checker, checker_version),
        "dataset": {"n_records": len(plan.entries), "fingerprint": dataset_fingerprint(plan.entries)},
        "environment": {"torch": _package_version("torch"), "transformer_lens": _package_version("transformer-lens"),
                        "python": platform.python_version()},
    }
    try:
        json.dumps(manifest)
    except TypeError as err:
        raise InputError(f"study settings must be JSON values (they are recorded in the manifest): {err}") from None
    return manifest


def _sibling_entry(sibling: Any, models: list[StudyModel]) -> StudyModel | None:
    if sibling is None:
        return None
    named = next((m for m in models if isinstance(sibling, str) and m.name == sibling), None)
    if named is not None:
        return StudyModel("sibling", named.spec, named.model, named.fingerprint)
    (entry,) = study_models({"sibling": sibling})
    return entry


def _data_and_checker(data: Any, checker: Callable | None):
    """A zoo dataset (``records`` + ``checker``) brings its own checker unless one is given."""
    if hasattr(data, "records") and hasattr(data, "checker") and not isinstance(data, (str, Path)):
        return data.records, checker if checker is not None else data.checker
    return data, checker


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` intra-op threads (restored after); floats depend on it at the 1e-7 level."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="case", desc="study", disable=not enabled, smoothing=0.1)


def _run_local(plan: Plan, store: Store, pending: dict[int, list[int]], bar, threads: int | None, device) -> None:
    sibling_model = None
    for mi in plan.order():
        if not pending[mi]:
            continue
        entry = plan.models[mi]
        with torch_threads(threads):
            model = _on_device(entry.load(), device)
            if plan.sibling is not None and sibling_model is None:
                sibling_model = _on_device(plan.sibling.load(), device)
            ctx = ModelContext(entry.name, model, sibling_model, anchor_vocab(store, plan, mi))
            store.write_model_info(mi, ctx.info())
            for k in pending[mi]:
                entries = plan.chunk_entries(k)
                result = process_chunk(ctx, entries, plan.settings, plan.checker, anchor_rows(store, plan, k, mi))
                write_result(store, Store.chunk_name(mi, k), result, plan.settings.graph)
                bar.update(len(entries))
        del model, ctx


def _on_device(model, device):
    return model if device is None else model.to(device)


def run(
    models: Any,
    data: Any,
    out: str | Path,
    *,
    checker: Callable | None = None,
    checker_version: str | None = None,
    sibling: Any = None,
    cases_from: str | None = None,
    rules: str = "attnlrp",
    top_k: int = 10,
    min_delta: float = 1.0,
    max_new_tokens: int = 32,
    chunk_size: int = 16,
    graph: bool = False,
    graph_levels: str = "half",
    graph_options: dict | None = None,
    stop_at_eos: bool = True,
    prepend_bos: bool | None = None,
    resume: bool = False,
    engine: str = "local",
    workers: int = 2,
    ray_address: str | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    threads: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> StudyRun:
    """Run a failure study of ``models`` on ``data`` and write it to the store ``out``.

    Args:
        models: a spec string (zoo name such as ``"ioi@100"``, local HF directory, TL model name), a
            TL model (in-process only), a list of them, or ``{name: spec_or_model}``.
        data: a list of records (dicts), a JSONL path, a ``datasets.Dataset``, or a zoo dataset
            (:func:`cage_lens.zoo.datasets.dataset`, which brings its checker).
        checker: ``checker(record, text) -> "open" | "wrong" | "correct"`` (or True/False); without it
            every record needs an ``answer`` (compared token by token). Its code, defaults, closure values
            and the globals it reads are fingerprinted, so a resumed study refuses a checker that changed.
        checker_version: a label for a checker that cannot be fingerprinted (one holding a compiled
            tokenizer, say); change it whenever the checker's behaviour changes.
        sibling: a model whose top-k supplies the contrast when the studied model's does not (a spec,
            a model, or the name of one of ``models``).
        cases_from: the name of one of ``models``; the others explain its cases (paired comparison).
        rules, top_k, min_delta, max_new_tokens, chunk_size, graph, graph_levels, graph_options,
            stop_at_eos, prepend_bos: see :class:`cage_lens.study.settings.StudySettings`.
        resume: continue an existing store (refused if it was written with other settings, models,
            data, checker or cage_lens version).
        engine: ``"local"`` (in-process, default) or ``"ray"`` (Ray Data, one model per actor; needs
            ``pip install 'cage-lens[ray]'``), with ``workers`` actors of ``cpus_per_worker`` CPUs and
            ``gpus_per_worker`` GPUs on the cluster at ``ray_address`` (default: a local cluster).
        threads: torch threads while computing (Ray workers default to ``cpus_per_worker``); float
            results are reproducible bit for bit at a fixed thread count and chunk size.
        device: move each loaded model there (e.g. ``"cuda"``).
        progress: show a tqdm progress bar (rate and ETA) on stderr.
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    settings = StudySettings(rules=rules, top_k=top_k, min_delta=min_delta, max_new_tokens=max_new_tokens,
                             chunk_size=chunk_size, graph=graph, graph_levels=graph_levels,
                             graph_options=dict(graph_options or {}), stop_at_eos=stop_at_eos,
                             cases_from=cases_from, prepend_bos=prepend_bos)
    records, checker = _data_and_checker(data, checker)
    entries = read_records(records)
    study = study_models(models)
    if cases_from is not None and cases_from not in [m.name for m in study]:
        raise InputError(f"cases_from={cases_from!r} is not one of the study's models {[m.name for m in study]}")
    plan = Plan(entries, settings, checker, study, _sibling_entry(sibling, study))
    if engine == "ray":
        from cage_lens.study.ray_engine import check_ray_plan

        check_ray_plan(plan)
    store = Store(out)
    manifest = _manifest(plan, checker_version)
    store.open(manifest, resume)
    _warn_environment(store, manifest)
    try:
        pending = pending_chunks(plan, store)
        total = len(entries) * len(study)
        todo = sum(len(plan.chunk_entries(k)) for ks in pending.values() for k in ks)
        start = time.perf_counter()
        with _progress(total, total - todo, progress) as bar:
            if engine == "ray":
                from cage_lens.study.ray_engine import run_ray

                run_ray(plan, store, pending, bar, workers=workers, address=ray_address, cpus=cpus_per_worker,
                        gpus=gpus_per_worker, threads=threads, device=device)
            else:
                _run_local(plan, store, pending, bar, threads, device)
        seconds = time.perf_counter() - start
    finally:
        store.close()
    return StudyRun(store.path, engine, total, total - todo, todo, seconds)


def _warn_environment(store: Store, manifest: dict) -> None:
    old = store.manifest().get("environment", {})
    changed = {k: (old.get(k), v) for k, v in manifest["environment"].items() if old.get(k) not in (None, v)}
    if changed:
        text = ", ".join(f"{k} {a} → {b}" for k, (a, b) in changed.items())
        warnings.warn(f"this store was started with other library versions ({text}); cage_lens results are "
                      "comparable, but low-level float results may differ", stacklevel=3)
