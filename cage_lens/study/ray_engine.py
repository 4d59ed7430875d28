"""``engine="ray"``: the same chunks, computed by Ray Data actors (one model per actor), written here.

Per model, the pending chunks become a Ray dataset of one item per chunk; ``map_batches`` runs them on
an actor pool whose actors each load the model once (and the sibling) and call the same
:func:`~cage_lens.study.cases.process_chunk` as the in-process engine. The driver receives each
chunk's rows and writes the shard itself, so the store, its atomic writes and resume behave exactly as
in-process, and the workers need no shared filesystem (docs/study.md#ray). Ray is imported only here.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from cage_lens.errors import InputError
from cage_lens.study.extras import require
from cage_lens.study.plan import anchor_rows, anchor_vocab, write_result
from cage_lens.study.store import Store

__all__ = ["run_ray", "check_ray_plan"]


def _import_ray():
    require("ray.data", "engine='ray'", "ray")
    return require("ray", "engine='ray'", "ray")


def check_ray_plan(plan) -> None:
    _import_ray()
    loaded = [m.name for m in plan.models + ([plan.sibling] if plan.sibling else []) if m.spec is None]
    if loaded:
        raise InputError(
            f"engine='ray' loads every model inside its own worker, so models must be given as specs (zoo name, "
            f"local directory or TransformerLens name), not loaded objects: {loaded}"
        )


class _ChunkWorker:
    """A Ray Data actor: one model (plus sibling) loaded once, then one chunk per call."""

    def __init__(self, name, spec, sibling_spec, settings, checker, anchor_vocab, threads, device):
        import torch

        from cage_lens.specs import model_from_spec
        from cage_lens.study.cases import ModelContext

        torch.set_num_threads(threads)
        model = model_from_spec(spec)
        sibling = model_from_spec(sibling_spec) if sibling_spec else None
        if device is not None:
            model = model.to(device)
            sibling = sibling.to(device) if sibling is not None else None
        self.ctx = ModelContext(name, model, sibling, anchor_vocab)
        self.settings, self.checker = settings, checker

    def __call__(self, batch):
        import pyarrow as pa

        from cage_lens.study.cases import process_chunk

        names, payloads = [], []
        for name, job in zip(batch["name"].to_pylist(), batch["job"].to_pylist()):
            entries, anchor_rows = pickle.loads(job)
            result = process_chunk(self.ctx, entries, self.settings, self.checker, anchor_rows)
            names.append(name)
            payloads.append(pickle.dumps((result, self.ctx.info())))
        return pa.table({"name": pa.array(names, pa.string()), "payload": pa.array(payloads, pa.binary())})


def _init(ray, address: str | None, workers: int, cpus: float) -> bool:
    """Connect to ``address`` or start a local cluster; returns whether this call started Ray."""
    if ray.is_initialized():
        return False
    import cage_lens

    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address is None:
        # a local cluster: workers import this very cage_lens (an editable or PYTHONPATH checkout too)
        root = str(Path(cage_lens.__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        kwargs.update(num_cpus=max(1, int(workers * cpus)), runtime_env={"env_vars": {"PYTHONPATH": path}})
    else:
        kwargs.update(address=address)
    ray.init(**kwargs)
    return True


def run_ray(plan, store: Store, pending: dict[int, list[int]], bar, *, workers: int, address: str | None,
            cpus: float, gpus: float, threads: int | None, device: str | None) -> None:
    ray = _import_ray()
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a positive int, got {workers!r}")
    started = _init(ray, address, workers, cpus)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        sibling_spec = plan.sibling.spec if plan.sibling else None
        for mi in plan.order():
            chunks = pending[mi]
            if not chunks:
                continue
            entry = plan.models[mi]
            items = [{"name": Store.chunk_name(mi, k),
                      "job": pickle.dumps((plan.chunk_entries(k), anchor_rows(store, plan, k, mi)))} for k in chunks]
            sizes = {Store.chunk_name(mi, k): len(plan.chunk_entries(k)) for k in chunks}
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                _ChunkWorker,
                fn_constructor_kwargs=dict(name=entry.name, spec=entry.spec, sibling_spec=sibling_spec,
                                           settings=plan.settings, checker=plan.checker,
                                           anchor_vocab=anchor_vocab(store, plan, mi),
                                           threads=threads or max(1, int(cpus)), device=device),
                batch_size=1, batch_format="pyarrow", num_cpus=cpus, num_gpus=gpus,
                compute=ray.data.ActorPoolStrategy(size=min(workers, len(items))),
            )
            info_written = False
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for name, payload in zip(batch["name"].to_pylist(), batch["payload"].to_pylist()):
                    result, info = pickle.loads(payload)
                    if not info_written:
                        store.write_model_info(mi, info)
                        info_written = True
                    write_result(store, name, result, plan.settings.graph)
                    bar.update(sizes[name])
    finally:
        if started:
            ray.shutdown()
