"""GPU check (< 5 minutes on one GPU): cage_lens on cuda gives the CPU's numbers, and how long it takes.

For each row — ``attribute`` in the default pass and in the long-context mode (whose recomputed blocks
run in the device's backward thread: docs/long_context.md#the-backward-in-another-thread), and a whole
cross-layer graph (``node_threshold=None``, long-context mode) — the same random model and tokens are
computed on the CPU and on cuda; the token relevance, every residual node's relevance and, for the
graph, the kept edges' values are compared (largest difference relative to the largest CPU value;
float32 rounding for float32 models, bfloat16 rounding for the Qwen3-0.6B-shaped bfloat16 model), and
both wall times are reported. The long-context attributions are also compared with the default pass on
each device, with the CPU's row-chunk budget on both (a GPU's larger one would leave these lengths eager).
Three patching rows compare ``relevance_patch``'s grids (``PATCH_GRIDS``) across devices: RAP with a budget
that leaves every cell to the routing estimate, AtP* (its QK fix), and the exact method (suffix runs on a
key/value cache). Models: GPT-2-small-sized (float32)
and Qwen3-0.6B-sized (bfloat16, 8 of its 28 layers).

Then bench_scale's rows on cuda: the same models (random weights of the real Qwen3-0.6B, Qwen3-8B and
OLMo-3-7B configurations, bfloat16, drawn on the GPU), lengths and calls (``bench_scale.row_call``),
timed, with the peak of cuda memory above the loaded model beside ``cage_lens.estimate``'s peak for the
plan the run chose (the long-context mode and the CAGE table's rows at once follow the GPU's free
memory), and the CPU seconds bench_scale measured for the same row (one thread of its machine) where it
did. A row whose time, predicted from the rows before it (the slowest seconds per operation of the
estimate's time model seen for that computation and pass), would pass ``--budget`` is not run and says
so. ``--deadline`` (for a lease of limited time) writes the results so far at that many seconds, marks
the row in progress as stopped, and exits.

Without a GPU it runs the CPU part at reduced sizes and says that cuda was not available (exit status
0); the results file is written only when cuda ran:

    python benchmarks/gpu_check.py                  # on a machine with a GPU -> results/gpu_check.md
    python benchmarks/gpu_check.py --budget 270 --deadline 320 --threads 12   # the committed run (H200)
    python benchmarks/gpu_check.py --quick          # reduced sizes (what a CPU-only run does anyway)
    python benchmarks/gpu_check.py --rows 'Qwen3-8B:8192:attribute' 'OLMo-3-7B:2048:cage table' \
        --results benchmarks/results/gpu_check_rows.md   # only these rows of the second part
    python benchmarks/gpu_check.py --first-part-only --results benchmarks/results/gpu_check_first_part.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import threading
import time
from pathlib import Path

import torch
from harness import LoadWatch, add_arguments, environment_line, write_results

RESULTS = Path(__file__).resolve().parent / "results"

#: agreement required between devices, relative to the largest CPU value: float32 rounding through a
#: dozen layers, and bfloat16's (every activation rounded to 8 bits of mantissa)
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 8e-2}


def _models(quick: bool) -> dict:
    from cage_lens.testing import random_model

    gpt2 = dict(n_layers=2 if quick else 12, d_model=128 if quick else 768, n_heads=4 if quick else 12,
                d_vocab=1000 if quick else 50257, n_ctx=4096, dtype=torch.float32, init_scale=0.02)
    qwen = dict(n_layers=2 if quick else 8, d_model=128 if quick else 1024, n_heads=4 if quick else 16,
                n_kv_heads=2 if quick else 8, d_mlp=384 if quick else 3072, d_vocab=1000 if quick else 151936,
                n_ctx=4096, dtype=torch.bfloat16, init_scale=0.02, biases=False, head_dim=32 if quick else 128)
    return {"gpt2-small shape, float32": lambda: random_model("gpt2", **gpt2),
            "qwen3-0.6b shape (8 layers), bfloat16": lambda: random_model("qwen3", **qwen)}


def _rows(quick: bool) -> list[tuple[str, str, int]]:
    short, long, patch = (64, 256, 12) if quick else (1024, 4096, 16)
    return [("gpt2-small shape, float32", "attribute", long), ("gpt2-small shape, float32", "attribute lc", long),
            ("gpt2-small shape, float32", "whole graph lc", short),
            ("qwen3-0.6b shape (8 layers), bfloat16", "attribute lc", short),
            ("gpt2-small shape, float32", "patch rap", patch), ("gpt2-small shape, float32", "patch atp_star", patch),
            ("gpt2-small shape, float32", "patch exact", patch)]


#: the patching rows' grids: single-row grids (the routing estimate's row trajectories and later-row reads)
#: and an all-position head grid (AtP*'s head QK fix)
PATCH_GRIDS = ("resid_pre", "attn_out", "attn_head_out_all_pos")


@contextlib.contextmanager
def _cpu_chunk_budget():
    """The CPU's row-chunk budget on cuda too: at the first part's lengths a GPU's larger budget
    (docs/long_context.md#the-chunk-budget) leaves the attention eager, and this part compares the
    row-chunked attention across devices."""
    from cage_lens.core import memory

    saved = memory.ACCELERATOR_ATTENTION_BUDGET
    memory.ACCELERATOR_ATTENTION_BUDGET = memory.CPU_ATTENTION_BUDGET
    try:
        yield
    finally:
        memory.ACCELERATOR_ATTENTION_BUDGET = saved


def _run(model, kind: str, tokens: torch.Tensor):
    import cage_lens

    if kind.startswith("patch"):
        return _patch(model, kind.split()[1], tokens)
    with _cpu_chunk_budget():
        if kind.startswith("attribute"):
            return cage_lens.attribute(model, tokens[None], target=7, strict=False, long_context=kind.endswith("lc"))
        return cage_lens.circuit_graph(model, tokens, target=7, levels="block", node_threshold=None, top_p=0.85,
                                       dense_limit=0, strict=False, long_context=True)


def _patch(model, method: str, tokens: torch.Tensor):
    """``relevance_patch`` of ``tokens`` from a clean run that differs at two positions; RAP with a budget
    too small for any exact cell, so every cell comes from the routing estimate."""
    from cage_lens import patching

    device = next(model.parameters()).device
    corrupted = tokens[None].to(device)
    clean = corrupted.clone()
    clean[0, [3, len(tokens) // 2]] += 1
    _, clean_cache = model.run_with_cache(clean)
    budget = {"budget": 1e-3} if method == "rap" else {}
    return patching.relevance_patch(model, corrupted, clean_cache, lambda logits: logits[0, -1, 7] - logits[0, -1, 8],
                                    list(PATCH_GRIDS), method=method, **budget)


def _values(result) -> dict[str, torch.Tensor]:
    if isinstance(result, dict):   # a PatchResult: {grid: tensor}
        return {grid: values.float().cpu() for grid, values in result.items()}
    if hasattr(result, "token_relevance"):
        return {"tokens": result.token_relevance.float().cpu(),
                **{k: v.float().cpu() for k, v in result.node_relevance.items()}}
    return {f"{es.source}->{es.target}": es.values.float().cpu() for es in result.edge_sets}


def _difference(a: dict, b: dict) -> float:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")   # a graph that kept other edges
    scale = max(max(float(v.abs().max()) for v in a.values() if v.numel()), 1e-30)
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].numel()) / scale


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


class WriteOnce:
    """The results are written once: when the run ends, or at ``--deadline`` while it runs, whichever comes
    first (a deadline timer that fired after the end must not add that the run stopped)."""

    def __init__(self, write):
        self._write, self._lock, self._done = write, threading.Lock(), False

    def __call__(self, **kwargs):
        """The write's value, or None where the results were written already."""
        with self._lock:
            if self._done:
                return None
            self._done = True
            return self._write(**kwargs)


def _compared(model, kind: str, tokens: torch.Tensor, against_default, cuda: bool) -> tuple[list[str], bool]:
    """One row's cells after the tokens (CPU s … within) and whether it agreed within the tolerance."""
    dtype = next(model.parameters()).dtype
    cpu_s, cpu_out = _timed(lambda: _run(model, kind, tokens))
    on_cpu = against_default(cpu_out)
    cells = [f"{cpu_s:.1f}", "—" if on_cpu is None else f"{on_cpu:.1e}"]
    checks = [] if on_cpu is None else [on_cpu]
    if cuda:
        model.to("cuda")
        _run(model, kind, tokens[:16])                     # warm-up: kernels, the certificate on cuda
        cuda_s, cuda_out = _timed(lambda: _run(model, kind, tokens))
        across, on_cuda = _difference(_values(cpu_out), _values(cuda_out)), against_default(cuda_out)
        checks += [across] + ([] if on_cuda is None else [on_cuda])
        cells += [f"{cuda_s:.2f}", f"{across:.1e}", "—" if on_cuda is None else f"{on_cuda:.1e}"]
    else:
        cells += ["—", "—", "—"]
    ok = all(c <= TOLERANCE[dtype] for c in checks)
    cells.append(("yes" if ok else f"NO (tolerance {TOLERANCE[dtype]:g})") + ("" if cuda else "; cuda not available"))
    return cells, ok


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0][:160] if str(error) else ""


def _against_the_cpu(quick: bool, cuda: bool, out: list[str]) -> int:
    """The rows of the first part (cuda against the CPU), appended to ``out``; how many rows failed."""
    out += ["| model | row | tokens | CPU s | lc vs default, CPU (rel.) | cuda s | cuda vs CPU (rel.) | "
            "lc vs default, cuda (rel.) | within |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(out[-2:]), flush=True)
    models, failures = _models(quick), 0
    for name, kind, n_tokens in _rows(quick):
        model = models[name]()
        tokens = torch.randint(3, 90, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
        lc_attribution = kind.startswith("attribute") and kind.endswith("lc")

        def against_default(result) -> float | None:
            return _difference(_values(_run(model, "attribute", tokens)), _values(result)) if lc_attribution else None

        try:
            cells, ok = _compared(model, kind, tokens, against_default, cuda)
        except Exception as error:   # a row that fails is a finding: it goes in the table
            cells, ok = ["—"] * 5 + [f"failed: {type(error).__name__}: {_first_line(error)}"], False
        failures += not ok
        cells = [name, kind, str(n_tokens)] + cells
        out.append("| " + " | ".join(cells) + " |")
        print(out[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    return failures


#: bench_scale's rows timed on cuda, cheapest first within each model
SCALE_ROWS = ([("Qwen3-0.6B", 2048, what) for what in ("attribute", "default graph", "whole graph", "study case",
                                                         "cage table")]
              + [("Qwen3-8B", n, what) for n in (2048, 8192) for what in ("attribute", "default graph", "study case",
                                                                           "whole graph", "cage table")]
              + [("OLMo-3-7B", 8192, what) for what in ("attribute", "default graph", "study case")])


def _scale_rows(budget: float, out: list[str], running: dict, rows=SCALE_ROWS, device: str = "cuda") -> None:
    """The rows of the second part, appended to ``out``: bench_scale's rows on cuda, within ``budget``
    seconds (``running`` names the row in progress, for the deadline)."""
    import bench_scale

    from cage_lens.core.memory import free_bytes

    cpu_rows = json.loads(bench_scale.CACHE.read_text()) if bench_scale.CACHE.exists() else {}
    out += ["| model | tokens | computation | cuda s | CPU s (bench_scale, 1 thread) | peak GB (cuda, above the model) | "
            "estimate GB | est./meas. | note |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(out[-2:]), flush=True)
    start, rates, loaded, model, call = time.perf_counter(), {}, None, None, None
    for name, n_tokens, what in rows:
        operations = _operations(bench_scale, name, n_tokens, what)
        long_context = bench_scale.estimate_row(name, n_tokens, what, free_bytes(device), device=device).long_context
        predicted = _predicted_rate(rates, name, what, long_context) * operations
        left = budget - (time.perf_counter() - start)
        if predicted > left or left <= 0:
            out.append(f"| {name} | {n_tokens} | {what} | — | — | — | — | — | not run: predicted "
                       f"{predicted:.0f} s > {max(left, 0):.0f} s left of --budget {budget:.0f} |")
            print(out[-1], flush=True)
            continue
        running.update(row=(name, n_tokens, what), since=time.perf_counter())
        try:
            if loaded != name:
                model = call = loaded = None   # the last model's memory back before the next is built
                gc.collect()
                torch.cuda.empty_cache()
                model, loaded = bench_scale.prepared(name, 16, device)[0], name
            tokens = torch.randint(3, len(model.tokenizer), (1, n_tokens),
                                   generator=torch.Generator().manual_seed(n_tokens)).to(device)
            call = bench_scale.row_call(model, tokens, what)
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base, free = torch.cuda.memory_allocated(), free_bytes(device)
            seconds, result = _timed(call)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            plan = bench_scale.plan_of(result)
            del result
            est = bench_scale.estimate_row(name, n_tokens, what, free, plan, device).peak_bytes / 2**30
            rates.setdefault((name, what, plan["long_context"]), []).append(seconds / operations)
            cpu = cpu_rows.get(f"{name}|{n_tokens}|{what}", {}).get("cpu_s")
            mode = " lc" if plan["long_context"] else ""
            mode += f" ({plan['rows_at_once']} rows at once)" if plan.get("rows_at_once") else ""
            out.append(f"| {name} | {n_tokens} | {what}{mode} | {seconds:.2f} | {'—' if cpu is None else f'{cpu:.0f}'} | "
                       f"{peak:.2f} | {est:.2f} | {est / peak:.2f} | {'; '.join(plan['warnings'])[:120]} |")
        except Exception as error:   # a row that fails on cuda is a finding: it goes in the table
            out.append(f"| {name} | {n_tokens} | {what} | — | — | — | — | — | failed: {type(error).__name__}: "
                       f"{_first_line(error)} |")
            torch.cuda.empty_cache()
        running.clear()
        print(out[-1], flush=True)


def _predicted_rate(rates: dict, name: str, what: str, long_context: bool) -> float:
    """Seconds per operation of the estimate's time model for a row not yet run: the slowest rate seen
    among the most alike rows run before it — same model first (a small model uses a GPU less well, so its
    rate overstates a large one's), then same computation, then same pass; 0 before any row ran."""
    row = (name, what, long_context)
    for same in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (1,), (2,), ()):   # the fields a rate's row must share
        seen = [r for key, rs in rates.items() if all(key[i] == row[i] for i in same) for r in rs]
        if seen:
            return max(seen)
    return 0.0


def _operations(bench_scale, name: str, n_tokens: int, what: str) -> float:
    est = bench_scale.estimate_row(name, n_tokens, what, None)
    return est.time_forwards * est.forward_flops


def _scale_row(text: str) -> tuple[str, int, str]:
    """``MODEL:TOKENS:COMPUTATION`` as a row of the second part (the names bench_scale uses)."""
    import bench_scale

    name, _, rest = text.partition(":")
    n_tokens, _, what = rest.partition(":")
    if name not in bench_scale.MODELS or not n_tokens.isdigit() or what not in bench_scale.WHATS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL:TOKENS:COMPUTATION with MODEL one of "
                                         f"{', '.join(bench_scale.MODELS)} and COMPUTATION one of "
                                         f"{', '.join(bench_scale.WHATS)}")
    return name, int(n_tokens), what


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for bench_scale's rows on cuda")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which the results so far are written, the row in progress is marked "
                             "as stopped, and the script exits (for a lease of limited time)")
    parser.add_argument("--results", type=Path, default=RESULTS / "gpu_check.md", help="the results file")
    parser.add_argument("--rows", nargs="+", type=_scale_row, default=None, metavar="MODEL:TOKENS:COMPUTATION",
                        help="only these of bench_scale's rows on cuda, in this order (e.g. 'Qwen3-8B:8192:whole graph'); "
                             "the comparison with the CPU (the first part) is then not run")
    parser.add_argument("--first-part-only", action="store_true",
                        help="only the comparison with the CPU (bench_scale's rows on cuda are not run)")
    add_arguments(parser)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    quick = args.quick or not cuda
    torch.set_num_threads(args.threads)
    if not cuda:
        print("cuda: NOT available (torch.cuda.is_available() is False): running the CPU part only, at reduced "
              "sizes; nothing is compared with a GPU and no results file is written", flush=True)
    deadline = f" --deadline {args.deadline:g}" if args.deadline else ""
    chosen = " --rows " + " ".join(f"'{n}:{t}:{w}'" for n, t, w in args.rows) if args.rows else ""
    if args.first_part_only:
        chosen = " --first-part-only"
    out = ["# GPU check: cuda against the CPU", "",
           f"Command: `python benchmarks/gpu_check.py{' --quick' if args.quick else ''} --budget {args.budget:g}{deadline}"
           f"{chosen}`; {environment_line(args.threads)}"
           + (f"; {torch.cuda.get_device_name()}" if cuda else "; cuda not available"), ""]
    watch, running, failures = LoadWatch(own_threads=args.threads).start(settle=30), {}, [0]

    def write(stopped: bool) -> int:
        watch.stop()
        if stopped:
            if running:
                name, n_tokens, what = running["row"]
                out.append(f"| {name} | {n_tokens} | {what} | — | — | — | — | — | stopped: --deadline {args.deadline:g} "
                           f"s reached after {time.perf_counter() - running['since']:.0f} s of this row |")
            out.append(f"\nThe run stopped at --deadline {args.deadline:g} s; rows after the last above did not run.")
        write_results(args.results, "\n".join(out), watch, args.allow_busy)
        return 1 if failures[0] else 0

    finish = WriteOnce(write)

    def at_deadline() -> None:
        status = finish(stopped=True)
        if status is not None:   # the run was still going: it ends here, with what it has
            os._exit(status)

    if cuda and args.deadline:
        timer = threading.Timer(args.deadline, at_deadline)
        timer.daemon = True
        timer.start()
    if args.rows and cuda:
        out.append("The comparison with the CPU (first part) was not run: `--rows` chose rows of the second part only.")
    else:
        out += ["## cuda against the CPU", ""]
        failures[0] = _against_the_cpu(quick, cuda, out)
    if not cuda:
        watch.stop()
        print("cuda: NOT available — the CPU part ran (above); run this script on a machine with a GPU to check cuda")
        return 1 if failures[0] else 0
    if args.first_part_only:
        out.append("\nbench_scale's rows on cuda (the second part) were not run: `--first-part-only`.")
        return finish(stopped=False)
    out += ["", "## bench_scale's rows on cuda", ""]
    _scale_rows(args.budget, out, running, args.rows or SCALE_ROWS)
    return finish(stopped=False)


if __name__ == "__main__":
    raise SystemExit(main())
