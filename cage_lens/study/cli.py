"""``cage-lens study`` and ``cage-lens report``: failure studies from the command line.

    cage-lens study DATA.jsonl --model ioi@100 --model final=ioi --out runs/ioi [--resume] [--engine ray]
    cage-lens study zoo:ioi:200 --model ioi@100 --out runs/ioi      # a zoo dataset, with its checker
    cage-lens report runs/ioi [--out report.html]

Registered by :func:`add_study_commands`; heavy modules (torch, pandas, Ray) are imported only when a
command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["add_study_commands", "cmd_study", "cmd_report"]


def _model_arg(values: list[str]) -> dict[str, str]:
    """``--model SPEC`` (named by its spec) or ``--model NAME=SPEC``."""
    out: dict[str, str] = {}
    for v in values:
        name, eq, spec = v.partition("=")
        name, spec = (name, spec) if eq else (v, v)
        if name in out:
            from cage_lens.errors import InputError

            raise InputError(f"--model {name!r} is given twice; name models NAME=SPEC to tell them apart")
        out[name] = spec
    return out


def _data_arg(value: str):
    """A JSONL path, or ``zoo:TASK[:N[:SEED]]`` for a zoo dataset (default 100 records, seed 0)."""
    if not value.startswith("zoo:"):
        return value
    from cage_lens.errors import InputError
    from cage_lens.zoo.datasets import dataset

    parts = value.split(":")[1:]
    try:
        n = int(parts[1]) if len(parts) > 1 else 100
        seed = int(parts[2]) if len(parts) > 2 else 0
    except ValueError:
        raise InputError(f"{value!r}: write zoo:TASK[:N[:SEED]] with integer N and SEED") from None
    return dataset(parts[0], n, seed)


def _checker_arg(value: str | None):
    """``zoo:TASK`` or ``package.module:function``."""
    if value is None:
        return None
    from cage_lens.errors import InputError

    if value.startswith("zoo:"):
        from cage_lens.zoo.datasets import DATASET_TASKS, ZooChecker

        if value[4:] not in DATASET_TASKS:
            raise InputError(f"no zoo checker {value!r}; available: {', '.join('zoo:' + t for t in DATASET_TASKS)}")
        return ZooChecker(value[4:])
    module, _, attr = value.partition(":")
    if not attr:
        raise InputError(f"--checker {value!r}: write package.module:function or zoo:TASK")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise InputError(f"--checker {value!r} could not be imported: {err}") from None


def cmd_study(args) -> int:
    from cage_lens import study

    result = study.run(
        _model_arg(args.model), _data_arg(args.data), args.out, checker=_checker_arg(args.checker),
        checker_version=args.checker_version,
        sibling=args.sibling, cases_from=args.cases_from, rules=args.rules, top_k=args.top_k,
        min_delta=args.min_delta, max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
        graph=args.graph, resume=args.resume, engine=args.engine, workers=args.workers,
        ray_address=args.ray_address, threads=args.threads, progress=not args.no_progress,
    )
    print(result)
    print(study.summary(args.out).to_markdown(parts=("counts",)))
    print(f"\nload it with cage_lens.study.load({str(args.out)!r}); report: cage-lens report {args.out}")
    return 0


def cmd_report(args) -> int:
    from cage_lens import study

    out = Path(args.out) if args.out else Path(args.dir) / "report.html"
    df = study.load(args.dir)
    print(study.summary(df).to_markdown())
    study.report(df, out)
    print(f"\nwrote {out}")
    return 0


def add_study_commands(subparsers) -> None:
    """Add ``study`` and ``report`` to the ``cage-lens`` sub-command parsers."""
    s = subparsers.add_parser("study", help="failure study over a dataset: deviations, contrasts, relevance (resumable)",
                              description="Run the contrastive failure workflow over DATA and write a resumable store.")
    s.add_argument("data", help="JSONL file of records {id, prompt, answer, segments}, or zoo:TASK[:N[:SEED]]")
    s.add_argument("--model", action="append", required=True,
                   help="zoo model (ioi@100), local HF directory or a model in the local HF cache; NAME=SPEC to name it; repeat for several")
    s.add_argument("--out", required=True, help="the study's store directory")
    s.add_argument("--resume", action="store_true", help="continue an existing store (same settings only)")
    s.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local (in this process, the default) or ray (a Ray cluster; extra 'ray')")
    s.add_argument("--workers", type=int, default=2, help="Ray actors (engine ray)")
    s.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local cluster)")
    s.add_argument("--checker", default=None, help="package.module:function or zoo:TASK (default: compare with answer)")
    s.add_argument("--checker-version", default=None,
                   help="a label for a checker that cannot be fingerprinted; change it when the checker changes")
    s.add_argument("--sibling", default=None, help="model whose top-k supplies contrasts the studied model lacks")
    s.add_argument("--cases-from", default=None, help="model NAME whose cases every other model explains (paired)")
    s.add_argument("--rules", default="attnlrp", choices=["attnlrp", "cplrp", "gxi"],
                   help="LRP rule set of the explanations (default attnlrp; docs/rules.md)")
    s.add_argument("--top-k", type=int, default=10,
                   help="how many of the model's top tokens are searched for a correct contrast token")
    s.add_argument("--min-delta", type=float, default=1.0, help="drop cases with Δℓ at or below this")
    s.add_argument("--max-new-tokens", type=int, default=32,
                   help="greedy tokens generated per record while looking for the first wrong token")
    s.add_argument("--chunk-size", type=int, default=16, help="records per shard and per batch")
    s.add_argument("--graph", action="store_true", help="also store a pruned cross-layer graph per case")
    s.add_argument("--threads", type=int, default=None, help="torch threads (reproducible floats at a fixed count)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_study)

    r = subparsers.add_parser("report", help="summary tables and an HTML report of a study store",
                              description="Print a study's summary tables and write its HTML report.")
    r.add_argument("dir", help="a study store written by cage-lens study")
    r.add_argument("--out", default=None, help="HTML file (default: DIR/report.html)")
    r.set_defaults(func=cmd_report)


if __name__ == "__main__":  # pragma: no cover - for `python -m cage_lens.study.cli`
    parser = argparse.ArgumentParser(prog="cage-lens")
    add_study_commands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
