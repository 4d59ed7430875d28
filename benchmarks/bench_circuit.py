"""Benchmark: cross-layer attribution graphs, closed form (``fast``) vs batch-packed autograd, and long
prompts against one ``attribute()`` call.

Speed: GPT-2-small-sized random model (12 layers, d_model 768, 12 heads, vocab 50257, float32), random
tokens, ``levels="block"``, AttnLRP, every target row computed (no node threshold) so both methods do
the same work. Each measurement runs in its own subprocess so that the peak RSS
(``resource.getrusage``) belongs to it alone.

Long context (docs/long_context.md): at 2,048, 4,096 and 8,192 tokens, one ``attribute()`` call, the
whole graph (every row: ``node_threshold=None``, ``top_p=0.85``) and the default graph
(``node_threshold=0.01``), each in its own process (one torch thread, ``measure.child``), with the
long-context mode chosen as a user gets it (``long_context=None``) for 12 GB (``CAGE_LENS_MAX_MEMORY``);
CPU seconds and the peak resident memory above the loaded model, and the graphs' ratios to the
attribution of the same length (targets: ≤ 3× the CPU time, ≤ 1.5× the peak; 8,192 tokens ≤ 12 GB).

The autograd time is **extrapolated**, not measured end to end: one backward call of ``B`` rows is
timed for the first, middle and last transition; the cost per call is affine in the depth of the
transition (the forward stops at the target state), so the full cost is
``Σ_transitions ceil(pos / B) · t(layer)`` with ``t`` interpolated between the measured layers. The
rows of those timed calls are compared with the closed form's rows for the same state (float32).

Agreement: the full graphs of both methods on tiny float64 models of several families on this TL
line (every row, every transition of ``levels="half"``, AttnLRP and CP-LRP), max error relative to the
edge scale. One command regenerates ``benchmarks/results/bench_circuit.md``:

    python benchmarks/bench_circuit.py            # 256 and 512 both methods; long context at 2048, 4096, 8192
    python benchmarks/bench_circuit.py --quick    # 128 and 256 both methods; long context at 512 and 1024
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

from harness import LoadWatch, add_arguments, write_results
from measure import child, measured

import torch

#: the memory the automatic long-context choice plans for (the issue's 12 GB)
MEMORY = "12G"


def build_model(n_ctx: int = 4096):
    from cage_lens.testing import random_model

    return random_model("gpt2", n_layers=12, d_model=768, n_heads=12, d_vocab=50257, n_ctx=max(n_ctx, 1024),
                        dtype=torch.float32)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def measure_fast(n_pos: int) -> dict:
    from cage_lens.circuit.builder import circuit_graph

    model = build_model()
    tokens = torch.randint(2, 50257, (n_pos,), generator=torch.Generator().manual_seed(0))
    before = peak_rss_gb()
    start = time.perf_counter()
    graph = circuit_graph(model, tokens, target=17, levels="block", node_threshold=None, top_p=0.85, dense_limit=0)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_gb": peak_rss_gb(), "rss_before_gb": before,
            "edges_kept": sum(len(es) for es in graph.edge_sets)}


#: the long-context rows: what each child computes
LONG_CALLS = {
    "attribute": lambda cage_lens, model, tokens: cage_lens.attribute(model, tokens[None], target=17),
    "whole graph": lambda cage_lens, model, tokens: cage_lens.circuit_graph(
        model, tokens, target=17, levels="block", node_threshold=None, top_p=0.85, dense_limit=0),
    "default graph": lambda cage_lens, model, tokens: cage_lens.circuit_graph(
        model, tokens, target=17, levels="block", top_p=0.85, dense_limit=0),
}


def measure_long(kind: str, n_pos: int) -> dict:
    """One long-context row in this process: the model loaded and certified outside the measured call."""
    import cage_lens

    model = build_model(n_pos)
    cage_lens.attribute(model, torch.randint(2, 50257, (1, 16)), target=17)   # certificate, probes
    tokens = torch.randint(2, 50257, (n_pos,), generator=torch.Generator().manual_seed(n_pos))
    stats, out = measured(LONG_CALLS[kind], cage_lens, model, tokens)
    settings = out.meta["settings"]
    stats["long_context"] = bool(settings.get("long_context"))
    if hasattr(out, "edge_sets"):
        stats["edges_kept"] = sum(len(es) for es in out.edge_sets)
    estimate = cage_lens.estimate(model, n_pos, "attribute" if kind == "attribute" else "circuit_graph",
                                  long_context=stats["long_context"])
    stats["estimate_gb"] = estimate.peak_bytes / 2**30
    return stats


def measure_autograd(n_pos: int, batch_size: int) -> dict:
    from cage_lens.circuit import levels as L
    from cage_lens.circuit.closed_form import fast_edge_rows
    from cage_lens.circuit.reference import autograd_edge_rows
    from cage_lens.circuit.state import capture_state
    from cage_lens.core.adapter import adapt
    from cage_lens.targets import Target

    model = build_model()
    adapter = adapt(model)
    tokens = torch.randint(2, 50257, (n_pos,), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    state = capture_state(adapter, tokens, n_pos - 1, Target.build(model, 1, 17), "attnlrp")
    capture_seconds = time.perf_counter() - start
    levels = [L._with_state_nodes(lv, state) for lv in L.state_levels(adapter, "block")]
    steps = L.transitions(levels)
    measured = sorted({0, len(steps) // 2, len(steps) - 1})
    per_call, agreement = {}, 0.0
    for index in measured:
        rows = torch.arange(n_pos - batch_size, n_pos)
        start = time.perf_counter()
        ref = autograd_edge_rows(adapter, state, steps[index], rows, batch_size)
        per_call[index] = time.perf_counter() - start
        fast = fast_edge_rows(state, steps[index], rows)
        agreement = max(agreement, float((fast - ref).abs().max() / ref.abs().max()))
    calls = math.ceil(n_pos / batch_size)
    total = capture_seconds + sum(calls * _interpolate(per_call, i) for i in range(len(steps)))
    return {"seconds": total, "measured_calls": {str(k): v for k, v in per_call.items()},
            "calls_per_transition": calls, "peak_rss_gb": peak_rss_gb(), "extrapolated": True,
            "agreement_float32": agreement}


def agreement_table() -> list[dict]:
    """Fast vs autograd on whole graphs of tiny float64 models (every row and transition)."""
    import warnings

    from cage_lens.circuit.builder import circuit_graph
    from cage_lens.errors import UnsupportedModelError
    from cage_lens.testing import random_model, supported_families

    warnings.filterwarnings("ignore")
    rows = []
    for family in [f for f in ("gpt2", "gpt_neox", "llama", "qwen3", "gemma2", "bloom") if f in supported_families()]:
        model = random_model(family)
        for rules in ("attnlrp", "cplrp"):
            options = dict(rules=rules, levels="half", node_threshold=None, top_p=None)
            try:
                fast = circuit_graph(model, "the cat sat on the mat and john", 5, **options)
            except UnsupportedModelError as exc:
                rows.append({"family": family, "rules": rules, "error": None, "note": str(exc)[:80]})
                continue
            ref = circuit_graph(model, "the cat sat on the mat and john", 5, method="autograd", batch_size=64, **options)
            worst = 0.0
            for es in fast.edge_sets:
                a, b = fast.edge_matrix(es.source, es.target), ref.edge_matrix(es.source, es.target)
                scale = max(float(b.abs().max()), float(fast.node_relevance(es.source).abs().max()), 1e-30)
                worst = max(worst, float((a - b).abs().max()) / scale)
            rows.append({"family": family, "rules": rules, "error": worst, "note": ""})
    return rows


def _interpolate(points: dict[int, float], x: int) -> float:
    keys = sorted(points)
    for a, b in zip(keys[:-1], keys[1:]):
        if a <= x <= b:
            return points[a] + (points[b] - points[a]) * (x - a) / max(1, b - a)
    return points[keys[-1]]


def run_child(kind: str, n_pos: int, batch_size: int, threads: int) -> dict:
    return child(__file__, [kind, str(n_pos), str(batch_size), str(threads)], memory=MEMORY)


def long_context_section(lengths: list[int]) -> list[str]:
    """The long-context table: attribute, whole graph and default graph per length, each in its own
    process with one torch thread."""
    out = ["", "## Long context: whole and default graph against one attribute() call", "",
           "GPT-2-small-sized random model (float32), random tokens, `levels='block'`, AttnLRP, `top_p=0.85`, "
           "`dense_limit=0`; each call in a fresh process with one torch thread; `long_context=None` (the mode is "
           f"chosen by `cage_lens.estimate` for `CAGE_LENS_MAX_MEMORY={MEMORY}`: **lc** = long-context pass). "
           "Peak = resident memory above the loaded model (its whole process in brackets); × = the graph's CPU "
           "time and peak over the attribution's. Targets: whole graph ≤ 3× CPU and ≤ 1.5× peak; 8,192 tokens "
           "≤ 12 GB.", "",
           "| tokens | attribute CPU s | attribute peak GB | whole graph CPU s | peak GB | × CPU | × peak | edges kept "
           "| default graph CPU s | peak GB | × CPU | × peak | estimate GB (attr / whole) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(out), flush=True)

    def cell(r: dict) -> tuple[str, str]:
        mode = " lc" if r.get("long_context") else ""
        return f"{r['cpu_s']:.1f}{mode}", f"{r['peak_gb']:.2f} ({r['process_peak_gb']:.2f})"

    for n_pos in lengths:
        rows = {kind: run_child(kind, n_pos, 0, 1) for kind in LONG_CALLS}
        failed = [f"{k}: {r['error']}" for k, r in rows.items() if "error" in r]
        if failed:
            out.append(f"| {n_pos} | failed: {'; '.join(failed)} |" + " |" * 11)
            print(out[-1], flush=True)
            continue
        a, w, d = rows["attribute"], rows["whole graph"], rows["default graph"]
        row = [str(n_pos), *cell(a), *cell(w), f"{w['cpu_s'] / a['cpu_s']:.2f}", f"{w['peak_gb'] / a['peak_gb']:.2f}",
               str(w["edges_kept"]), *cell(d), f"{d['cpu_s'] / a['cpu_s']:.2f}", f"{d['peak_gb'] / a['peak_gb']:.2f}",
               f"{a['estimate_gb']:.2f} / {w['estimate_gb']:.2f}"]
        out.append("| " + " | ".join(row) + " |")
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="autograd rows per backward call (default: 2048 // tokens, at most 16, to bound memory)")
    parser.add_argument("--compare", type=int, nargs="*", default=None, help="token counts for fast vs autograd")
    parser.add_argument("--long", type=int, nargs="*", default=None,
                        help="token counts of the long-context rows (attribute, whole and default graph)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("KIND", "POS", "B", "THREADS"))
    add_arguments(parser)
    args = parser.parse_args()
    if args.child:
        kind, n_pos, batch_size, threads = args.child[0], int(args.child[1]), int(args.child[2]), int(args.child[3])
        torch.set_num_threads(threads)
        if kind in LONG_CALLS:
            result = measure_long(kind, n_pos)
        else:
            result = measure_fast(n_pos) if kind == "fast" else measure_autograd(n_pos, batch_size)
        print(json.dumps(result))
        return
    torch.set_num_threads(args.threads)
    compare = args.compare if args.compare is not None else ([128, 256] if args.quick else [256, 512])
    long = args.long if args.long is not None else ([512, 1024] if args.quick else [2048, 4096, 8192])
    import transformer_lens  # noqa: F401

    from cage_lens.loading import has_hooked_transformer

    line_name = "TL 2.18 (HookedTransformer)" if has_hooked_transformer() else "TL 4.3 (TransformerBridge)"
    out = [
        "# Cross-layer graphs: closed form (fast) vs batch-packed autograd",
        "",
        f"Command: `python benchmarks/bench_circuit.py{' '.join([''] + sys.argv[1:])}` on {line_name}, "
        f"{args.threads} threads. Timings on a shared machine are indicative.",
        "",
        "## Speed (GPT-2-small-sized random model, float32, levels='block', AttnLRP, every row)",
        "",
        "The autograd seconds are **extrapolated** from one timed backward call of B rows at the first, middle "
        "and last transition (see the script's docstring); the speed-up is therefore an estimate. "
        "\"rows agree\" compares the rows of those timed calls with the closed form (float32).",
        "",
        "| tokens | fast s | fast peak GB | autograd s (extrapolated) | speed-up | B | autograd peak GB | rows agree (rel.) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(out), flush=True)
    watch = LoadWatch(own_threads=args.threads).start()
    for n_pos in compare:
        batch_size = args.batch_size or max(1, min(16, 2048 // n_pos))
        fast = run_child("fast", n_pos, batch_size, args.threads)
        if "error" in fast:
            out.append(f"| {n_pos} | failed: {fast['error']} | | | | | | |")
            print(out[-1], flush=True)
            continue
        row = f"| {n_pos} | {fast['seconds']:.2f} | {fast['peak_rss_gb']:.2f} |"
        ref = run_child("autograd", n_pos, batch_size, args.threads)
        if "error" in ref:
            row += f" failed: {ref['error']} | | | | |"
        else:
            row += (f" {ref['seconds']:.1f} | {ref['seconds'] / fast['seconds']:.0f}× | {batch_size} |"
                    f" {ref['peak_rss_gb']:.2f} | {ref['agreement_float32']:.1e} |")
        out.append(row)
        print(row, flush=True)
    if long:
        out += long_context_section(long)
    out += ["", "## Agreement (tiny float64 models, every row and transition of levels='half')", "",
            "HF modules that compute in float32 inside a float64 model (eager attention's softmax, RMSNorm) limit the "
            "agreement of bridges of those families to float32 rounding; HookedTransformer computes in float64.", "",
            "| family | rules | max error (relative to the edge scale) |", "| --- | --- | --- |"]
    for r in agreement_table():
        out.append(f"| {r['family']} | {r['rules']} | {r['note'] or format(r['error'], '.1e')} |")
    print("\n".join(out[-20:]), flush=True)
    write_results(Path(__file__).resolve().parent / "results" / "bench_circuit.md", "\n".join(out), watch.stop(),
                  args.allow_busy)


if __name__ == "__main__":
    main()
