"""Patching estimates against TransformerLens' activation patching of the same grids (one forward per
cell), timed in one run: the one-backward estimate (relevance patching, one forward + one backward) and
routing-aware patching (RAP, ``relevance_patch``'s default: exact where its budget allows, row-exact
estimates elsewhere).

Two parts:

- **GPT-2-small-sized model** (random weights: 12 layers, d_model 768, 12 heads, vocab 50257, float32):
  every head (``attn_head_out_all_pos``, 144 cells), every (layer, position) of the residual stream
  (``resid_pre``, 12 × tokens cells), and the four standard grids together (resid_pre, attn_out,
  mlp_out, heads). The corrupted prompt changes the token in the middle; the clean cache is built once,
  outside the timings. TL's sweep runs its own ``generic_activation_patch``; grids with more than
  ``--max-cells`` cells are timed on a seeded random subset of cells (``index_df``, TL's own way to patch
  a subset) and extrapolated as (subset time / subset cells) × grid cells — the output says so.
- **Zoo models** (the trained ones the agreement targets are measured on): every task and corruption,
  ``--zoo-prompts`` prompts each, the four grids, TL's whole sweep against RAP.

Cost is reported three ways: wall seconds, process CPU seconds (robust when other jobs share the
cores), and forward-equivalents (fe: the arithmetic of one forward pass; a backward counts 2;
docs/patching.md#cost), where TL's sweep costs one fe per cell. One command regenerates
``results/bench_patching.md``:

    python benchmarks/bench_patching.py                 # 64 and 256 tokens, every zoo case
    python benchmarks/bench_patching.py --lengths 64 --zoo-prompts 2   # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' sweeps draw a progress bar per grid

import torch  # noqa: E402

from harness import LoadWatch, add_arguments, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_patching.md"
FOUR = ("resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos")
SETS = {"attn_head_out_all_pos": ("attn_head_out_all_pos",), "resid_pre": ("resid_pre",), "4 grids": FOUR}


def build_model():
    from cage_lens.testing import random_model

    return random_model(
        "gpt2", n_layers=12, d_model=768, n_heads=12, d_vocab=50257, n_ctx=1024, dtype=torch.float32, init_scale=0.02
    )


def inputs(model, length: int):
    generator = torch.Generator().manual_seed(length)
    clean = torch.randint(100, 50000, (1, length), generator=generator)
    corrupted = clean.clone()
    corrupted[0, length // 2] = (clean[0, length // 2] + 1) % 50000
    answer, contrast = 42, 43

    def metric(logits):
        return (logits[:, -1, answer] - logits[:, -1, contrast]).mean()

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    return corrupted, clean_cache, metric


def timed(fn, repeats: int = 1) -> tuple[float, float, object]:
    """Median wall and process-CPU seconds of ``fn()``, and its last result."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), out


def activation_patching(model, corrupted, clean_cache, metric, grid: str, max_cells: int, seed: int):
    """(wall, cpu, cells timed, cells in the grid) of TL's sweep, extrapolated when subsampled."""
    import pandas as pd
    import transformer_lens.patching as tlp

    from cage_lens.patching import GRIDS as SPECS

    spec = SPECS[grid]
    sizes = {"layer": model.cfg.n_layers, "pos": corrupted.shape[1], "head": model.cfg.n_heads}
    shape = [sizes[a] for a in spec.axes]
    n_cells = int(torch.tensor(shape).prod())
    if n_cells <= max_cells:
        fn = getattr(tlp, spec.tl_function)
        wall, cpu, _ = timed(lambda: fn(model, corrupted, clean_cache, metric))
        return wall, cpu, n_cells, n_cells
    setter = tlp.layer_head_vector_patch_setter if spec.kind == "head" else tlp.layer_pos_patch_setter
    flat = torch.randperm(n_cells, generator=torch.Generator().manual_seed(seed))[:max_cells]
    rows = torch.stack(torch.unravel_index(flat, tuple(shape)), dim=1).tolist()
    index_df = pd.DataFrame(rows, columns=list(spec.axes))
    activation = spec.hook.split("hook_", 1)[1]
    wall, cpu, _ = timed(lambda: tlp.generic_activation_patch(
        model, corrupted, clean_cache, metric, patch_setter=setter, activation_name=activation, index_df=index_df
    ))
    scale = n_cells / max_cells
    return wall * scale, cpu * scale, max_cells, n_cells


def patch_call(model, corrupted, clean_cache, metric, grids, repeats: int, **options):
    from cage_lens.patching import relevance_patch

    relevance_patch(model, corrupted, clean_cache, metric, grids, **options)  # warm-up
    return timed(lambda: relevance_patch(model, corrupted, clean_cache, metric, grids, **options), repeats)


def emit(lines: list[str], *new: str) -> None:
    """Keep lines for the results file and show them as they come."""
    for line in new:
        lines.append(line)
        print(line, flush=True)


def gpt2_section(args) -> list[str]:
    model = build_model()
    header = (f"{'tokens':>6} {'grids':<22} {'cells':>6} | {'TL wall s':>9} {'TL cpu s':>8} | "
              f"{'1-bwd cpu s':>11} {'ratio':>6} | {'RAP wall s':>10} {'RAP cpu s':>9} {'ratio':>6} "
              f"{'RAP fe':>7} {'fe ratio':>8} | TL timing; RAP method")
    lines = []
    emit(lines, header, "-" * len(header))
    for length in args.lengths:
        corrupted, clean_cache, metric = inputs(model, length)
        tl = {g: activation_patching(model, corrupted, clean_cache, metric, g, args.max_cells, seed=length) for g in FOUR}
        for label, grids in SETS.items():
            tl_wall, tl_cpu = sum(tl[g][0] for g in grids), sum(tl[g][1] for g in grids)
            n_cells = sum(tl[g][3] for g in grids)
            how = "all cells" if all(tl[g][2] == tl[g][3] for g in grids) else "EXTRAPOLATED from random cells"
            _, ob_cpu, _ = patch_call(model, corrupted, clean_cache, metric, grids, args.repeats,
                                      method="one_backward", rules=args.rules)
            rap_wall, rap_cpu, rap = patch_call(model, corrupted, clean_cache, metric, grids, args.repeats)
            methods = "; ".join(sorted({m.split(",")[0] for m in rap.method.values()}))
            line = (f"{length:>6} {label:<22} {n_cells:>6} | {tl_wall:>9.2f} {tl_cpu:>8.2f} | "
                    f"{ob_cpu:>11.3f} {tl_cpu / ob_cpu:>5.0f}x | {rap_wall:>10.3f} {rap_cpu:>9.3f} "
                    f"{tl_cpu / rap_cpu:>5.0f}x {rap.total_cost:>7.1f} {rap.speedup:>7.0f}x | {how}; {methods}")
            emit(lines, line)
    return lines


def zoo_section(args) -> list[str]:
    from cage_lens import patching, zoo

    header = (f"{'case':<26} {'TL fwd':>6} | {'TL wall s':>9} {'TL cpu s':>8} | {'RAP wall s':>10} {'RAP cpu s':>9} | "
              f"{'wall ratio':>10} {'cpu ratio':>9} | {'RAP fe':>6} {'fe ratio':>8}")
    lines = []
    emit(lines, header, "-" * len(header))
    for name in zoo.tasks():
        model, task = zoo.load(name), zoo.task(name)
        for corruption, (options, kind) in task.corruptions().items():
            rows = []
            for sample in task.sample(args.zoo_prompts, seed=0):
                pair = task.corrupt(sample, **options)
                answer, contrast = (int(model.to_tokens(" " + w, prepend_bos=False)[0, 0])
                                    for w in (pair.answer, pair.contrast))

                def metric(logits, answer=answer, contrast=contrast):
                    return (logits[:, -1, answer] - logits[:, -1, contrast]).mean()

                corrupted = model.to_tokens(pair.corrupted)
                with torch.no_grad():
                    _, clean_cache = model.run_with_cache(model.to_tokens(pair.clean))
                tl_wall, tl_cpu, _ = timed(lambda: [patching.activation_patch(model, corrupted, clean_cache, metric, g)
                                                    for g in FOUR])
                rap_wall, rap_cpu, rap = patch_call(model, corrupted, clean_cache, metric, FOUR, args.repeats)
                rows.append((tl_wall, tl_cpu, rap_wall, rap_cpu, rap.total_cost, rap.tl_forwards))
            med = [statistics.median(r[i] for r in rows) for i in range(6)]
            wall_ratio = statistics.median(r[0] / r[2] for r in rows)
            cpu_ratio = statistics.median(r[1] / r[3] for r in rows)
            line = (f"{name + ' / ' + corruption + ' (' + kind[0] + ')':<26} {med[5]:>6.0f} | {med[0]:>9.2f} {med[1]:>8.2f} | "
                    f"{med[2]:>10.3f} {med[3]:>9.3f} | {wall_ratio:>9.0f}x {cpu_ratio:>8.0f}x | {med[4]:>6.1f} "
                    f"{med[5] / med[4]:>7.0f}x")
            emit(lines, line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--max-cells", type=int, default=48,
                        help="grids with more cells are timed on this many random cells and extrapolated")
    parser.add_argument("--rules", default="cplrp", help="rules of the one-backward rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zoo-prompts", type=int, default=5, help="prompts per zoo case (0: skip the zoo)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from importlib.metadata import version

    watch = LoadWatch(own_threads=args.threads).start()
    gpt2 = gpt2_section(args) if args.lengths else []
    zoo_lines = zoo_section(args) if args.zoo_prompts else []
    watch.stop()
    text = "\n".join([
        "# Patching estimates vs TransformerLens activation patching: cost per grid",
        "",
        f"Generated by `python benchmarks/bench_patching.py{''.join(' ' + a for a in sys.argv[1:])}` (do not edit by hand).",
        "",
        f"- {args.threads} torch threads, CPU; TransformerLens {version('transformer-lens')}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}",
        "- activation patching: TransformerLens' `get_act_patch_*` (one forward per cell); on the GPT-2-sized model, "
        f"grids with more than {args.max_cells} cells timed on that many seeded random cells through TL's `index_df` "
        "and extrapolated linearly to the whole grid (marked EXTRAPOLATED)",
        f"- one-backward (`1-bwd`): `relevance_patch(..., method='one_backward', rules={args.rules!r})`, one forward + "
        f"one backward; RAP: `relevance_patch(...)` with its default budget (docs/patching.md#budget); median of "
        f"{args.repeats} after a warm-up",
        "- wall = elapsed seconds; cpu = process CPU seconds; ratio = TL / estimator; fe = forward-equivalents "
        "(arithmetic of one forward pass; a backward counts 2; TL's sweep costs one per cell)",
        "",
        "## GPT-2-small-sized model (random weights, float32), corrupted token in the middle",
        "",
        "```",
        *gpt2,
        "```",
        "",
        f"## Zoo models, four grids, median over {args.zoo_prompts} prompts per case ((v)alue / (r)outing corruption)",
        "",
        "```",
        *zoo_lines,
        "```",
        "",
    ])
    write_results(args.out, text, watch, args.allow_busy)


if __name__ == "__main__":
    main()
