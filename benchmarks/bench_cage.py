"""Speed of the CAGE attribution table, measured in one run (method: docs/cage.md#base-methods).

AttnLRP table for ``--generated`` teacher-forced tokens after a ``--prompt``-token prompt on the
GPT-2-small-sized random model (12 layers, d_model 768, 12 heads, vocab 50257, float32), against
(a) the naive per-step loop (re-run the prefix, one backward per step), in two flavours: through
the public ``attribute()`` (what a user would write; it also captures every residual node) and a
lean loop (one ``attnlrp`` call per step: embedding hooks only, the cheapest per-step loop), and
(b) ``integrated_gradients`` with 20 steps (itself batched). Random token ids (special ids
avoided). Prints a table of times and ratios and the agreement of the batched table with the naive
loop, and writes the same to ``benchmarks/results/bench_cage.md`` (``--out``), headed by the command
and the environment that produced it:

    python benchmarks/bench_cage.py [--prompt 128] [--generated 64] [--threads N] [--chunk-size 8]

``--threads`` defaults to every core of the machine (the setting in which the table's speed-up over the
per-step loop is stated, docs/cage.md#threads); the load is recorded and a busy run refused
(benchmarks/harness.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from cage_lens import methods
from cage_lens.testing import random_model
from harness import LoadWatch, add_arguments, cores, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, repeat: int = 1):
    """(result, median wall seconds, median CPU seconds of this process) over ``repeat`` runs. CPU
    time is the robust number on a shared machine: other processes' load stretches wall time but not
    the work this process does."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return out, (statistics.median(walls), statistics.median(cpus))


def lean_loop(model, tokens, n_prompt: int) -> torch.Tensor:
    """The cheapest per-step loop: for each generated token, one AttnLRP forward over its prefix and
    one backward, through the embedding hooks only."""
    T = tokens.shape[1]
    rows = [methods.attnlrp(model, tokens[:, : p + 1], p)[0] for p in range(n_prompt, T)]
    return torch.stack([torch.nn.functional.pad(r, (0, T - len(r))) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--generated", type=int, default=64)
    ap.add_argument("--ig-steps", type=int, default=20)
    ap.add_argument("--chunk-size", type=int, default=methods.DEFAULT_CHUNK, help="rows per shared forward (AttnLRP)")
    ap.add_argument("--ig-chunk-size", type=int, default=methods.DEFAULT_CHUNK)
    ap.add_argument("--threads", type=int, default=cores(), help="torch threads (default: every core)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the table and the naive loops (median reported)")
    ap.add_argument("--ig-rows", type=int, default=None,
                    help="time (b) on the first N generated rows only, against the batched AttnLRP table on the "
                         "same rows (a like-for-like ratio when the full IG run is too slow for the machine)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_cage.md", help="results file (markdown)")
    add_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = random_model("gpt2", n_layers=12, d_model=768, n_heads=12, d_vocab=50257, n_ctx=1024, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    T = args.prompt + args.generated
    tokens = torch.randint(10, 50257, (1, T), generator=gen)
    tokens[0, 0] = 0  # BOS
    P = args.prompt

    methods.attnlrp(model, tokens[:, : P + 9], P)  # warm-up (adapter probe, allocator)
    watch = LoadWatch(own_threads=args.threads).start()
    fast, t_fast = timed(lambda: methods.attnlrp(model, tokens, P, chunk_size=args.chunk_size), args.repeat)
    naive, t_naive = timed(lambda: methods.naive_table(model, tokens, P, "attnlrp"), args.repeat)
    lean, t_lean = timed(lambda: lean_loop(model, tokens, P), args.repeat)
    rows = [("AttnLRP table, batched (cage_lens)", t_fast, t_fast),
            ("(a) naive loop via attribute()", t_naive, t_fast),
            ("(a') naive loop, lean (1 call per step)", t_lean, t_fast)]
    if args.ig_rows is None:
        _, t_ig = timed(lambda: methods.integrated_gradients(
            model, tokens, P, steps=args.ig_steps, chunk_size=args.ig_chunk_size))
        rows.append((f"(b) integrated_gradients, {args.ig_steps} steps", t_ig, t_fast))
    else:
        sub = tokens[:, : P + args.ig_rows]
        _, t_sub = timed(lambda: methods.attnlrp(model, sub, P, chunk_size=args.chunk_size), args.repeat)
        _, t_ig = timed(lambda: methods.integrated_gradients(model, sub, P, steps=args.ig_steps, chunk_size=args.ig_chunk_size))
        rows.append((f"AttnLRP table, first {args.ig_rows} rows", t_sub, t_sub))
        rows.append((f"(b) IG {args.ig_steps} steps, first {args.ig_rows} rows", t_ig, t_sub))

    err = float((fast - naive).abs().max() / naive.abs().max())
    err_lean = float((lean - naive).abs().max() / naive.abs().max())
    lines = [
        f"GPT-2-small-sized random model (float32), prompt {P} tokens, {args.generated} generated, "
        f"{torch.get_num_threads()} CPU threads, chunk_size {args.chunk_size}, median of {args.repeat} runs "
        "(integrated gradients: 1 run)", "",
        f"| {'method':<40} | {'wall (s)':>9} | {'CPU (s)':>9} | {'ratio, wall':>11} | {'ratio, CPU':>10} |",
        f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 13}|{'-' * 12}|",
    ]
    for name, (wall, cpu), (ref_wall, ref_cpu) in rows:
        lines.append(f"| {name:<40} | {wall:9.2f} | {cpu:9.2f} | {wall / ref_wall:11.2f} | {cpu / ref_cpu:10.2f} |")
    lines.append("")
    if args.ig_rows is not None:
        lines.append(f"(b)'s ratios are against the AttnLRP table on the same first {args.ig_rows} rows.")
    lines.append(f"Agreement: max |batched − naive| / max |naive| = {err:.2e}, lean loop {err_lean:.2e} (float32).")
    print("\n".join(lines))
    write(args.out, lines, watch.stop(), args.allow_busy)


def write(path: Path, lines: list[str], watch: LoadWatch, allow_busy: bool) -> None:
    """The results file: the command and the environment, then the printed table."""
    command = "python benchmarks/bench_cage.py " + shlex.join(sys.argv[1:])
    head = [
        "# CAGE attribution table: batched AttnLRP vs the naive per-step loop and integrated gradients", "",
        f"Generated by `{command.strip()}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformer-lens {version('transformer-lens')}. "
        "Wall time is stretched by other processes on a shared machine; CPU time is the work this process did.", "",
    ]
    write_results(path, "\n".join(head + lines), watch, allow_busy)


if __name__ == "__main__":
    main()
