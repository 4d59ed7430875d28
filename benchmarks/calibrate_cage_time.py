"""Calibration: the CAGE table's time in both passes against one ``attribute()`` call, for the time model
of ``cage_lens.estimate`` (``planning.CAGE_ROW_ATTENTION``, ``planning.CHUNK_SUM_OPS``; docs/estimate.md#time-model).

Random models with the per-layer shapes of Qwen3-0.6B (16/8 heads, d_model 1024, d_mlp 3072) and Qwen3-8B
(32/8 heads, d_model 4096, d_mlp 12288), 2 layers, head_dim 128, a 1,000-token vocabulary (so that the
unembedding does not weigh), bfloat16, one torch thread, at 1,024 and 2,048 tokens: CPU seconds of one
``attribute()`` call (default pass) and of the CAGE table of the last 8 tokens, 8 rows at once
(``generation.methods.attnlrp``), in the default and in the long-context pass; each after a warm-up in the
same process. Printed beside the time model's ratios (estimate's ``time_forwards``), and the least-squares
fit of the model's three constants on these rows (log ratios, one shared factor: the table's and the
attribution's rates differ by a constant the benchmark's law absorbs):

    python benchmarks/calibrate_cage_time.py          # -> results/calibrate_cage_time.md (about 12 minutes)
    python benchmarks/calibrate_cage_time.py --refit  # the table again from the measured rows it saved

The measured rows are saved in ``results/calibrate_cage_time.json``; ``--refit`` rebuilds the table and
the fit from them with the planner as it is (after its constants change).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

from harness import LoadWatch, add_arguments, environment_line, write_results

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MEASURED = RESULTS / "calibrate_cage_time.json"
SHAPES = {"Qwen3-0.6B": dict(d_model=1024, n_heads=16, n_kv_heads=8, d_mlp=3072),
          "Qwen3-8B": dict(d_model=4096, n_heads=32, n_kv_heads=8, d_mlp=12288)}
TOKENS = (1024, 2048)
LAYERS, ROWS, VOCAB = 2, 8, 1000


def config(name: str) -> dict:
    d = SHAPES[name]
    return {"model_type": "qwen3", "num_hidden_layers": LAYERS, "hidden_size": d["d_model"],
            "num_attention_heads": d["n_heads"], "num_key_value_heads": d["n_kv_heads"], "head_dim": 128,
            "intermediate_size": d["d_mlp"], "vocab_size": VOCAB, "hidden_act": "silu", "torch_dtype": "bfloat16"}


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(name: str) -> list[dict]:
    import cage_lens
    from cage_lens.generation import methods
    from cage_lens.testing import random_model

    model = random_model("qwen3", n_layers=LAYERS, d_vocab=VOCAB, n_ctx=4096, dtype=torch.bfloat16, init_scale=0.02,
                         biases=False, head_dim=128, **SHAPES[name])
    warm = torch.randint(3, VOCAB, (1, 48))
    cage_lens.attribute(model, warm, target=5, strict=False)
    for lc in (False, True):
        methods.attnlrp(model, warm, 40, chunk_size=ROWS, long_context=lc)
    rows = []
    for n_tokens in TOKENS:
        tokens = torch.randint(3, VOCAB, (1, n_tokens), generator=torch.Generator().manual_seed(n_tokens))
        row = {"model": name, "tokens": n_tokens,
               "attribute": cpu_seconds(lambda: cage_lens.attribute(model, tokens, target=5, strict=False,
                                                                    long_context=False))}
        for lc in (False, True):
            row["lc" if lc else "default"] = cpu_seconds(
                lambda: methods.attnlrp(model, tokens, n_tokens - ROWS, chunk_size=ROWS, long_context=lc))
        rows.append(row)
        print(row, flush=True)
    return rows


def model_ratios(row: dict, constants: tuple[float, float, float] | None = None) -> tuple[float, float]:
    """The time model's (default table / attribute, long-context table / attribute) for ``row``, with the
    planner's constants or ``constants`` = (k default, k long-context, chunk-sum operations)."""
    from cage_lens import planning

    saved = planning.CAGE_ROW_ATTENTION, planning.CHUNK_SUM_OPS
    try:
        if constants is not None:
            planning.CAGE_ROW_ATTENTION = {False: constants[0], True: constants[1]}
            planning.CHUNK_SUM_OPS = constants[2]
        plan = dict(line="bridge", available_bytes=20 * 2**30)
        cfg, n = config(row["model"]), row["tokens"]
        one = planning.estimate(cfg, n, long_context=False, **plan).time_forwards
        table = [planning.estimate(cfg, n - ROWS, "cage", new_tokens=ROWS, rows=ROWS, long_context=lc, **plan).time_forwards
                 for lc in (False, True)]
    finally:
        planning.CAGE_ROW_ATTENTION, planning.CHUNK_SUM_OPS = saved
    return table[0] / one, table[1] / one


def spread(rows: list[dict], constants=None) -> tuple[float, list[float]]:
    """Residual log ratios of measured over modelled (both passes), after the shared factor, and their
    sum of squares."""
    logs = []
    for row in rows:
        d, l = model_ratios(row) if constants is None else _linear_ratios(row, constants)
        logs += [math.log(row["default"] / row["attribute"] / d), math.log(row["lc"] / row["attribute"] / l)]
    mean = sum(logs) / len(logs)
    return sum((x - mean) ** 2 for x in logs), [math.exp(x - mean) for x in logs]


def _linear_ratios(row: dict, constants) -> tuple[float, float]:
    """:func:`model_ratios` with ``constants``: the ratios are linear in them, taken apart once per row."""
    parts = row.setdefault("_parts", [model_ratios(row, c) for c in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1))])
    (d0, l0), (d1, _), (_, l2), (_, l3) = parts
    return d0 + constants[0] * (d1 - d0), l0 + constants[1] * (l2 - l0) + constants[2] * (l3 - l0)


def _passes_agree(rows: list[dict], constants) -> bool:
    """The model's long-context table over its default one within 12 % of the measured ratio in every row."""
    for row in rows:
        d, l = _linear_ratios(row, constants)
        if not abs((row["lc"] / row["default"]) / (l / d) - 1.0) <= 0.12:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refit", action="store_true", help="no measurement: the table from the saved rows")
    add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.refit:
        saved = json.loads(MEASURED.read_text())
        rows, load_line, measured_by = saved["rows"], saved["load"], saved["environment"]
    else:
        watch = LoadWatch(own_threads=1).start()
        rows = [r for name in SHAPES for r in measure(name)]
        watch.stop()
        if watch.problem() is not None and not args.allow_busy:
            write_results(RESULTS / "calibrate_cage_time.md", "", watch)   # refuses, says why, exits
        load_line, measured_by = watch.header_line(), environment_line(1)
        MEASURED.write_text(json.dumps({"rows": rows, "load": load_line, "environment": measured_by}, indent=1))
    # k of the long-context pass from -1 (a row's backward costing only its blocks' matrix products: its
    # chunks read half the keys under the causal mask) to 10; the constants that keep the long-context table
    # over the default one within 12 % of every measured row (what the plan's choice between them reads)
    grid = itertools.product([0.25 * i for i in range(0, 41)], [0.25 * i for i in range(-4, 41)], range(0, 1010, 30))
    best = min((c for c in grid if _passes_agree(rows, c)), key=lambda c: spread(rows, c)[0])
    (_, now), (_, at_best) = spread(rows), spread(rows, best)
    out = ["# The CAGE table's time against one attribution (calibration of the time model)", "",
           f"Generated by `python benchmarks/calibrate_cage_time.py{' --refit' if args.refit else ''}`; measured "
           f"(`python benchmarks/calibrate_cage_time.py`, rows in `calibrate_cage_time.json`) on {measured_by}, "
           f"load average then: {load_line.removeprefix('Load average (1 min) ').rstrip('.')}. {LAYERS}-layer random models "
           f"with the per-layer shapes below, bfloat16, vocabulary {VOCAB}; CPU seconds, one process per model, after a "
           f"warm-up; the CAGE table of the last {ROWS} tokens, {ROWS} rows at once. \"model\": the time model's ratio "
           "(`cage_lens.estimate`'s time_forwards); \"meas./model\": after the one factor shared by all rows.", "",
           "| shape | tokens | attribute s | table s (default) | table s (lc) | default ÷ attribute | model | lc ÷ attribute "
           "| model | lc ÷ default | model | meas./model (default, lc) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(rows):
        d, l = model_ratios(row)
        out.append(f"| {row['model']} | {row['tokens']} | {row['attribute']:.2f} | {row['default']:.1f} | {row['lc']:.1f} | "
                   f"{row['default'] / row['attribute']:.2f} | {d:.2f} | {row['lc'] / row['attribute']:.2f} | {l:.2f} | "
                   f"{row['lc'] / row['default']:.2f} | {l / d:.2f} | {now[2 * i]:.2f}, {now[2 * i + 1]:.2f} |")
    from cage_lens import planning

    out += ["", f"The planner's constants: CAGE_ROW_ATTENTION default {planning.CAGE_ROW_ATTENTION[False]:g}, long-context "
            f"{planning.CAGE_ROW_ATTENTION[True]:g}, CHUNK_SUM_OPS {planning.CHUNK_SUM_OPS:g}; meas./model "
            f"{min(now):.2f}–{max(now):.2f}. Least squares on this grid (0–10 by 0.25, −1–10 by 0.25, 0–1,000 by 30), "
            "among the constants that hold the long-context table over the default one within 12 % of every row: "
            f"{best[0]:g}, {best[1]:g}, {best[2]:g} (meas./model {min(at_best):.2f}–{max(at_best):.2f})."]
    text = "\n".join(out) + "\n"
    print(text)
    (RESULTS / "calibrate_cage_time.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
