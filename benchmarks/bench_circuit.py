"""Benchmark: cross-layer attribution graphs, closed form (``fast``) vs batch-packed autograd.

GPT-2-small-sized random model (12 layers, d_model 768, 12 heads, vocab 50257, float32), random
tokens, ``levels="block"``, AttnLRP, every target row computed (no node threshold) so both methods do
the same work. Each measurement runs in its own subprocess so that the peak RSS
(``resource.getrusage``) belongs to it alone.

The autograd side is timed on a subset of target rows and extrapolated linearly: one backward call
of ``B`` rows for the first, middle and last transition; the cost per call is affine in the depth of
the transition (the forward stops at the target state), so the full cost is
``Σ_transitions ceil(pos / B) · t(layer)`` with ``t`` interpolated between the measured layers.

    python benchmarks/bench_circuit.py            # 256 and 512 both methods, 2048 and 4096 fast
    python benchmarks/bench_circuit.py --quick    # 128 and 256 only
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch


def build_model():
    from cage_lens.testing import random_model

    return random_model("gpt2", n_layers=12, d_model=768, n_heads=12, d_vocab=50257, n_ctx=4096,
                        dtype=torch.float32)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def measure_fast(n_pos: int) -> dict:
    from cage_lens.circuit import circuit_graph

    model = build_model()
    tokens = torch.randint(2, 50257, (n_pos,), generator=torch.Generator().manual_seed(0))
    before = peak_rss_gb()
    start = time.perf_counter()
    graph = circuit_graph(model, tokens, target=17, levels="block", node_threshold=None, top_p=0.85, dense_limit=0)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_gb": peak_rss_gb(), "rss_before_gb": before,
            "edges_kept": sum(len(es) for es in graph.edge_sets), "low_memory": n_pos > 1024}


def measure_autograd(n_pos: int, batch_size: int) -> dict:
    from cage_lens import edges as E
    from cage_lens.adapter import adapt
    from cage_lens.targets import Target

    model = build_model()
    adapter = adapt(model)
    tokens = torch.randint(2, 50257, (n_pos,), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    state = E.capture_state(adapter, tokens, n_pos - 1, Target.build(model, 1, 17), "attnlrp")
    capture_seconds = time.perf_counter() - start
    steps = E.transitions(E.state_levels(adapter, "block"))
    measured = sorted({0, len(steps) // 2, len(steps) - 1})
    per_call = {}
    for index in measured:
        rows = torch.arange(n_pos - batch_size, n_pos)
        start = time.perf_counter()
        E.autograd_edge_rows(adapter, state, steps[index], rows, batch_size)
        per_call[index] = time.perf_counter() - start
    calls = math.ceil(n_pos / batch_size)
    total = capture_seconds + sum(calls * _interpolate(per_call, i) for i in range(len(steps)))
    return {"seconds": total, "measured_calls": {str(k): v for k, v in per_call.items()},
            "calls_per_transition": calls, "peak_rss_gb": peak_rss_gb(), "extrapolated": True}


def _interpolate(points: dict[int, float], x: int) -> float:
    keys = sorted(points)
    for a, b in zip(keys[:-1], keys[1:]):
        if a <= x <= b:
            return points[a] + (points[b] - points[a]) * (x - a) / max(1, b - a)
    return points[keys[-1]]


def run_child(kind: str, n_pos: int, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(n_pos), str(batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="autograd rows per backward call (default: 2048 // tokens, at most 16, to bound memory)")
    parser.add_argument("--compare", type=int, nargs="*", default=None, help="token counts for fast vs autograd")
    parser.add_argument("--long", type=int, nargs="*", default=None, help="token counts for fast alone")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "POS", "B"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        kind, n_pos, batch_size = args.child[0], int(args.child[1]), int(args.child[2])
        result = measure_fast(n_pos) if kind == "fast" else measure_autograd(n_pos, batch_size)
        print(json.dumps(result))
        return
    compare = [128, 256] if args.quick else [256, 512]
    long = [] if args.quick else [2048, 4096]
    print(f"GPT-2-small-sized random model, float32, levels='block', AttnLRP, {args.threads} threads; "
          "autograd: B rows per backward, timed on one call at the first/middle/last "
          "transition and extrapolated linearly to all rows")
    print(f"{'tokens':>7} {'fast s':>9} {'fast peak GB':>13} {'autograd s':>11} {'speed-up':>9} {'B':>3} {'autograd peak GB':>17}")
    for n_pos in compare + long:
        batch_size = args.batch_size or max(1, min(16, 2048 // n_pos))
        fast = run_child("fast", n_pos, batch_size)
        if "error" in fast:
            print(f"{n_pos:>7} fast failed: {fast['error']}")
            continue
        line = f"{n_pos:>7} {fast['seconds']:>9.2f} {fast['peak_rss_gb']:>13.2f}"
        if n_pos in compare:
            ref = run_child("autograd", n_pos, batch_size)
            if "error" in ref:
                line += f"  autograd failed: {ref['error']}"
            else:
                line += (f" {ref['seconds']:>10.1f}* {ref['seconds'] / fast['seconds']:>8.0f}× {batch_size:>3}"
                         f" {ref['peak_rss_gb']:>17.2f}")
        print(line, flush=True)
    print("* extrapolated from measured backward calls (see the module docstring)")


if __name__ == "__main__":
    main()
