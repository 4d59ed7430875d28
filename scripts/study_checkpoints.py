"""Checkpoint comparison with failure studies: which segment's relevance changes with training?

For the IOI and pointer-chase zoo models (training steps 100, 200, 500, 700 and the final model):

1. **own failures**: every checkpoint runs the study on its own generations (failures found, usable
   cases after the contrast and Δℓ ≤ 1 filters, mean segment relevance on its explained cases);
2. **paired**: every checkpoint explains the step-100 model's failure cases (same input, same wrong
   and contrast tokens: ``cases_from="step-100"``), and each later checkpoint is compared with step
   100 per segment: mean difference with a 95 % bootstrap CI and a paired sign-flip permutation test
   (Holm-adjusted).

    python scripts/study_checkpoints.py            # ~2 min on 2 CPU cores
    python scripts/study_checkpoints.py --n 100    # quicker

Writes ``benchmarks/results/study_checkpoints.md`` and ``benchmarks/results/study_checkpoints.csv``
(one row per case: task, study, model, record, status, Δℓ, normalised segment relevance).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from cage_lens import study
from cage_lens.study.frame import SEG, segment_names
from cage_lens.zoo.datasets import dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEPS = (100, 200, 500, 700)
TASKS = ("ioi", "pointer-chase")
SEED = 2026


def checkpoints(task: str) -> dict[str, str]:
    return {f"step-{s}": f"{task}@{s}" for s in STEPS} | {"final": task}


def run_task(task: str, n: int, workdir: Path) -> tuple[str, pd.DataFrame]:
    data = dataset(task, n, seed=SEED)
    models = checkpoints(task)
    own = study.run(models, data, workdir / f"{task}-own", progress=False)
    paired = study.run(models, data, workdir / f"{task}-paired", cases_from="step-100", progress=False)
    df_own, df_paired = study.load(own.path), study.load(paired.path)
    s_own, s_paired = study.summary(df_own), study.summary(df_paired)
    lines = [f"## {task}", "",
             f"{n} records (`zoo.datasets.dataset({task!r}, {n}, seed={SEED})`, zoo checker), rules AttnLRP, "
             f"top-k 10, Δℓ > 1 kept. Own-failure study {own.seconds:.0f} s, paired study {paired.seconds:.0f} s "
             f"({own.cases_per_minute:.0f} and {paired.cases_per_minute:.0f} cases/min, "
             f"{torch.get_num_threads()} torch threads).", "",
             "### Own failures per checkpoint", "", study.aggregate._markdown(s_own.counts), "",
             "Mean normalised segment relevance on each checkpoint's own explained cases (95 % bootstrap CI; "
             "positive = supports the wrong token):", "", _wide(s_own), "",
             "### Paired: every checkpoint explains the step-100 failures", "",
             f"{int(s_paired.counts.loc['step-100', 'explained'])} cases (step-100 failures with a correct token in "
             "its top-10 and Δℓ > 1). Mean Δℓ and segment relevance per checkpoint:", "",
             _wide(s_paired, df_paired), ""]
    for m in list(models)[1:]:
        lines += [study.compare(df_paired, "step-100", m).to_markdown(), ""]
    lines += [_verdict(df_paired, list(models)), ""]
    frames = []
    for kind, df in (("own", df_own), ("paired", df_paired)):
        cols = ["model", "record", "status", "deviation_step", "delta"] + [SEG + s for s in segment_names(df)]
        frames.append(df[cols].assign(task=task, study=kind))
    return "\n".join(lines), pd.concat(frames)


def _wide(s, df: pd.DataFrame | None = None) -> str:
    """Segment means [CI] per model (rows) and segment (columns); with ``df`` also Δℓ of the explained cases."""
    t = s.segments.reset_index()
    t["value"] = [f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" if pd.notna(m) else "–"
                  for m, lo, hi in zip(t["mean"], t["ci_low"], t["ci_high"])]
    wide = t.pivot(index="model", columns="segment", values="value").reindex(s.counts.index)
    wide = wide[[c for c in dict.fromkeys(t["segment"])]]
    if df is not None:
        from cage_lens.metrics import bootstrap_ci

        cells = []
        for m in wide.index:
            v = df[(df["model"] == m) & (df["status"] == "explained")]["delta"].to_numpy(float)
            mean, lo, hi = bootstrap_ci(v, n=2000) if len(v) else (float("nan"),) * 3
            cells.append(f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]" if len(v) else "–")
        wide.insert(0, "Δℓ", cells)
    wide.insert(0, "n", s.segments.reset_index().groupby("model")["n"].max().reindex(wide.index).fillna(0).astype(int))
    return study.aggregate._markdown(wide)


def _verdict(df: pd.DataFrame, models: list[str]) -> str:
    """The segment whose relevance moves most from step 100 to the final model (by |mean diff|), and
    whether each intermediate checkpoint's change is significant (Holm p < 0.05)."""
    final = study.compare(df, "step-100", models[-1]).table.drop(index="delta")
    top = final["diff"].abs().idxmax()
    steps = []
    for m in models[1:]:
        t = study.compare(df, "step-100", m).table
        steps.append(f"{m} {t.loc[top, 'diff']:+.3f} [{t.loc[top, 'ci_low']:+.3f}, {t.loc[top, 'ci_high']:+.3f}]"
                     f"{' *' if t.loc[top, 'p_holm'] < 0.05 else ''}")
    return (f"**Largest change with training: `{top}`** (final − step-100 = {final.loc[top, 'diff']:+.3f}). "
            f"Change from step 100 per checkpoint (95 % CI; * = Holm p < 0.05): " + "; ".join(steps) + ".")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="records per task")
    parser.add_argument("--out", type=Path, default=RESULTS / "study_checkpoints.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sections, frames = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASKS:
            text, frame = run_task(task, args.n, Path(tmp))
            sections.append(text)
            frames.append(frame)
    head = ["# Failure studies across training checkpoints", "",
            f"Generated by `python scripts/study_checkpoints.py --n {args.n}` in {time.perf_counter() - start:.0f} s "
            f"(torch {torch.__version__}, Python {sys.version.split()[0]}). Raw per-case numbers: "
            "`study_checkpoints.csv`. Relevance is normalised per case by max |R| over non-special tokens; "
            "segments are defined in `cage_lens/zoo/datasets.py` (they may overlap: `context` contains `io` "
            "and `s1`, `query` contains `s2`; `facts` contains the `hop` facts). `_generated` = tokens the model "
            "generated before the deviation.", ""]
    args.out.write_text("\n".join(head + sections))
    pd.concat(frames).to_csv(args.out.with_suffix(".csv"), index=False, float_format="%.6g")
    print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
