"""Relevance patching (one forward + one backward) against TransformerLens' activation patching of the
same grids (one forward per cell).

Model: a random GPT-2-small-sized model (12 layers, d_model 768, 12 heads, vocab 50257), float32, CPU.
Grids: every head (``attn_head_out_all_pos``, 144 cells) and every (layer, position) of the residual
stream (``resid_pre``, 12 × tokens cells). Both sides start from the same clean cache and corrupted
tokens (the corrupted prompt changes one token); the cache is built once, outside the timings.

Activation patching runs TransformerLens' own ``generic_activation_patch``. Grids with more than
``--max-cells`` cells are timed on a seeded random subset of cells (``index_df``, TL's own way to
patch a subset) and the full-grid time is extrapolated as (subset time / subset cells) × grid cells;
the output says so on every such row. One command regenerates ``results/bench_patching.md``:

    python benchmarks/bench_patching.py                 # 64 and 256 tokens
    python benchmarks/bench_patching.py --lengths 64 --max-cells 100000   # no extrapolation
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' sweeps draw a progress bar per grid

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_patching.md"
GRIDS = ("attn_head_out_all_pos", "resid_pre")


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


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``fn()``."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


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
        wall, cpu = timed(lambda: fn(model, corrupted, clean_cache, metric))
        return wall, cpu, n_cells, n_cells
    setter = {"resid_pre": tlp.layer_pos_patch_setter, "attn_head_out_all_pos": tlp.layer_head_vector_patch_setter}[grid]
    flat = torch.randperm(n_cells, generator=torch.Generator().manual_seed(seed))[:max_cells]
    rows = torch.stack(torch.unravel_index(flat, tuple(shape)), dim=1).tolist()
    index_df = pd.DataFrame(rows, columns=list(spec.axes))
    activation = spec.hook.split("hook_", 1)[1]
    wall, cpu = timed(lambda: tlp.generic_activation_patch(
        model, corrupted, clean_cache, metric, patch_setter=setter, activation_name=activation, index_df=index_df
    ))
    scale = n_cells / max_cells
    return wall * scale, cpu * scale, max_cells, n_cells


def relevance_patching(model, corrupted, clean_cache, metric, grid: str, rules: str, repeats: int):
    from cage_lens.patching import relevance_patch

    relevance_patch(model, corrupted, clean_cache, metric, grid, rules=rules)  # warm-up
    return timed(lambda: relevance_patch(model, corrupted, clean_cache, metric, grid, rules=rules), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--max-cells", type=int, default=48,
                        help="grids with more cells are timed on this many random cells and extrapolated")
    parser.add_argument("--rules", default="cplrp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from importlib.metadata import version

    model = build_model()
    header = (f"{'tokens':>6} {'grid':<22} {'cells':>6} | {'TL wall s':>9} {'RelP wall s':>11} {'ratio':>7} | "
              f"{'TL cpu s':>8} {'RelP cpu s':>10} {'ratio':>7} | TL timing")
    lines = [header, "-" * len(header)]
    print(header, flush=True)
    for length in args.lengths:
        corrupted, clean_cache, metric = inputs(model, length)
        for grid in GRIDS:
            ap_wall, ap_cpu, timed_cells, n_cells = activation_patching(
                model, corrupted, clean_cache, metric, grid, args.max_cells, seed=length
            )
            rp_wall, rp_cpu = relevance_patching(model, corrupted, clean_cache, metric, grid, args.rules, args.repeats)
            how = "all cells" if timed_cells == n_cells else f"EXTRAPOLATED from {timed_cells} random cells"
            line = (f"{length:>6} {grid:<22} {n_cells:>6} | {ap_wall:>9.2f} {rp_wall:>11.3f} {ap_wall / rp_wall:>6.0f}x | "
                    f"{ap_cpu:>8.2f} {rp_cpu:>10.3f} {ap_cpu / rp_cpu:>6.0f}x | {how}")
            lines.append(line)
            print(line, flush=True)
    text = "\n".join([
        "# Relevance patching vs TransformerLens activation patching: time per grid",
        "",
        "Generated by `python benchmarks/bench_patching.py` (do not edit by hand).",
        "",
        f"- model: random GPT-2-small-sized (12 layers, d_model 768, 12 heads, vocab 50257), float32, CPU, "
        f"{args.threads} torch threads; TransformerLens {version('transformer-lens')}, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}",
        f"- relevance patching: `relevance_patch(..., rules={args.rules!r})`, one forward + one backward of the "
        f"corrupted run, median of {args.repeats} after a warm-up",
        "- activation patching: TransformerLens' `get_act_patch_*` (one forward per cell); grids with more than "
        f"{args.max_cells} cells timed on that many seeded random cells through TL's `index_df` and extrapolated "
        "linearly to the whole grid (marked EXTRAPOLATED)",
        "- wall = elapsed seconds; cpu = process CPU seconds (robust when other jobs share the cores)",
        "",
        "```",
        *lines,
        "```",
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
