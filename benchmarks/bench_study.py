"""Failure-study throughput: in-process vs Ray (2 workers), and per-case cost vs prompt length and size.

    python benchmarks/bench_study.py              # writes benchmarks/results/bench_study.md
    python benchmarks/bench_study.py --quick      # smaller, for a smoke run

1. The same study (IOI step-100 checkpoint on zoo IOI records, own failures) in-process and with
   ``engine="ray"`` on a local 2-worker cluster (1 CPU and 1 torch thread per worker). Reported:
   wall time of ``study.run`` (model loading and, for Ray, cluster start-up included) and the
   steady-state rate from the difference between a 128-record and a full run (start-up cancels).
2. Per-case cost of the pipeline (one greedy step, contrast check, batched attribution) on random
   GPT-2-style models of three widths at three prompt lengths, in-process with one thread, against
   the time of a plain forward of the same batch ("forward equivalents": the cost model predicts ≈ 4
   for a deviation at the first generated token — 1 generation forward + forward and backward of the
   attribution).

Run it on an idle machine: the numbers are wall-clock.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cage_lens import study  # noqa: E402
from cage_lens.zoo.datasets import dataset  # noqa: E402
from harness import LoadWatch, add_arguments, write_results  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "bench_study.md"


# ---------------------------------------------------------------------------- 1. engines
def bench_engines(records: int, graph: bool, tmp: Path) -> list[dict]:
    """Each engine runs the study twice, on ``small`` and on ``records`` records: the wall time of the
    larger run gives cases/min including start-up; the difference between the two runs gives the
    steady-state rate (model loading and Ray start-up cancel out)."""
    small = 128
    data = dataset("ioi", records, seed=11)
    rows = []
    study.run({"step-100": "ioi@100"}, data.records[:16], tmp / f"warm-up-{graph}", checker=data.checker,
              graph=graph, progress=False)  # imports, file caches, first-call overheads
    for label, kw in (("in-process", dict(engine="local")),
                      ("in-process, 1 thread", dict(engine="local", threads=1)),
                      ("Ray, 2 workers × 1 CPU", dict(engine="ray", workers=2, threads=1))):
        runs = {}
        for n in (small, records):
            out = tmp / f"{label.split(',')[0].replace(' ', '-')}-{kw.get('threads', 'd')}-{graph}-{n}"
            runs[n] = study.run({"step-100": "ioi@100"}, data.records[:n], out, checker=data.checker,
                                chunk_size=16, graph=graph, progress=False, **kw)
        big = runs[records]
        explained = int((study.load(big.path)["status"] == "explained").sum())
        extra = big.seconds - runs[small].seconds
        steady = 60.0 * (records - small) / extra if extra > 0 else float("nan")  # start-up noise > compute
        rows.append({"engine": label, "graph": graph, "cases": big.cases_written, "explained": explained,
                     "wall_s": big.seconds, "small_wall_s": runs[small].seconds, "per_min": big.cases_per_minute,
                     "steady_per_min": steady})
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------- 2. cost vs size and length
def avoid_top1(record, text: str) -> str:
    """Deviation at the first generated token: the model's own top-1 (``record.extra['avoid']``) is wrong,
    anything else is a correct answer — so the contrast is the rank-1 token."""
    return "wrong" if text.split()[:1] == [record.extra["avoid"]] else "correct"


def _model(d_model: int, n_layers: int):
    from cage_lens.testing import random_model

    heads = max(4, d_model // 64)
    return random_model("gpt2", d_model=d_model, n_layers=n_layers, n_heads=heads, n_ctx=1024,
                        dtype=torch.float32, seed=0)


def bench_cost(widths, lengths, n_cases: int, tmp: Path) -> list[dict]:
    rows = []
    torch.set_num_threads(1)
    for d_model in widths:
        model = _model(d_model, 4)
        params = sum(p.numel() for p in model.parameters())
        vocab = [w for w in model.tokenizer.get_vocab() if w.isalpha()]
        for length in lengths:
            rng = random.Random(length)
            prompts = [" ".join(rng.choice(vocab) for _ in range(length - 1)) for _ in range(n_cases)]
            tokens = model.to_tokens(prompts)
            with torch.no_grad():
                top1 = model(tokens)[:, -1].argmax(-1).tolist()
            records = [{"prompt": p, "avoid": model.tokenizer.decode([t]).strip()} for p, t in zip(prompts, top1)]
            out = tmp / f"cost-{d_model}-{length}"
            run = study.run({"m": model}, records, out, checker=avoid_top1, min_delta=-1e9, chunk_size=16,
                            threads=1, progress=False)
            explained = int((study.load(out)["status"] == "explained").sum())
            with torch.no_grad():  # a plain forward of the same chunks, for the forward-equivalent ratio
                start = time.perf_counter()
                for i in range(0, n_cases, 16):
                    model(tokens[i:i + 16])
                forward = (time.perf_counter() - start) / n_cases
            per_case = run.seconds / n_cases
            rows.append({"d_model": d_model, "params": params, "tokens": tokens.shape[1], "explained": explained,
                         "ms_per_case": 1e3 * per_case, "ms_forward": 1e3 * forward, "ratio": per_case / forward})
            print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------- report
def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(
            "–" if isinstance(r[k], float) and r[k] != r[k] else format(r[k], f) if f else str(r[k])
            for _, k, f in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="failure-study throughput benchmark")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    add_arguments(parser)
    args = parser.parse_args(argv)
    records = args.records or (256 if args.quick else 1024)
    widths, lengths, n_cases = ((64, 256), (32, 128), 16) if args.quick else ((64, 256, 512), (32, 128, 512), 48)
    threads = torch.get_num_threads()
    watch = LoadWatch(own_threads=threads).start()
    with tempfile.TemporaryDirectory() as tmp:
        engines = bench_engines(records, False, Path(tmp)) + bench_engines(records, True, Path(tmp))
        cost = bench_cost(widths, lengths, n_cases, Path(tmp))
    watch.stop()
    text = [
        "# Failure-study throughput", "",
        f"`python benchmarks/bench_study.py{' --quick' if args.quick else ''}` — {platform.processor() or platform.machine()}, "
        f"{torch.get_num_interop_threads()} interop / {threads} intra-op torch threads by default, torch "
        f"{torch.__version__}, Python {platform.python_version()}.", "",
        "## In-process vs Ray (2 workers)", "",
        f"Study: `ioi@100` (IOI step-100 checkpoint, own failures) on `dataset('ioi', n, seed=11)`, chunk_size 16. "
        "`cases` = (record, model) pairs written, whatever their status; `wall` = the full run, model loading "
        "and Ray start-up included; `steady` = (n − 128) / (wall(n) − wall(128)): start-up cancels (– when "
        "the start-up varied by more than the extra compute).", "",
        _table(engines, [("engine", "engine", ""), ("graphs", "graph", ""), ("cases", "cases", ""),
                         ("explained", "explained", ""), ("wall s", "wall_s", ".1f"),
                         ("wall s (128 records)", "small_wall_s", ".1f"),
                         ("cases/min (wall)", "per_min", ".0f"), ("cases/min (steady)", "steady_per_min", ".0f")]),
        "",
        "## Per-case cost vs model size and prompt length", "",
        "Random GPT-2-style models (4 layers, float32), one torch thread, every case deviating at the first "
        "generated token and explained; `forward` = a plain batched forward of the same prompts; `ratio` = "
        "per-case cost in forward equivalents (cost model: ≈ 4 = 1 generation forward + 1 forward and 1 backward of "
        "the attribution, plus per-case bookkeeping that dominates for tiny models).", "",
        _table(cost, [("d_model", "d_model", ""), ("parameters", "params", ","), ("tokens", "tokens", ""),
                      ("explained", "explained", ""), ("ms/case", "ms_per_case", ".1f"),
                      ("ms forward/case", "ms_forward", ".2f"), ("ratio", "ratio", ".1f")]),
        "",
    ]
    write_results(args.out, "\n".join(text), watch, args.allow_busy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
