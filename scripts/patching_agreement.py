"""Agreement of the patching estimates with TransformerLens' activation patching on every zoo task and
corruption, in both directions, with the cost of each; writes ``benchmarks/results/patching_agreement.md``.

Per task and named corruption (``zoo.task(name).corruptions()``: value corruptions — the changed token's
content reaches the answer — and routing corruptions — it decides where attention looks: IOI's S2 swap and
ABC, the pointer-chase start key): the zoo's default model, ``--n`` generated samples, the metric
``logit(answer) − logit(contrast)`` at the last position. For every prompt and direction TL's
``get_act_patch_*`` runs once per grid (the reference) and every estimator on the same grids:

- ``rap``: routing-aware patching at its default budget (``relevance_patch``'s default method);
- ``cplrp``, ``attnlrp``, ``relp``, ``gxi`` (AtP): the one-backward estimate under those rules;
- ``atp_star``: AtP* (QK fix and GradDrop), the baseline of Kramár et al. 2024;
- the rule ablations (each component's LRP rule alone), one-backward.

Cost is counted in forward-equivalents (arithmetic of one forward pass of the patched batch; a backward
counts 2; docs/patching.md#cost) and, indicatively, in process CPU seconds measured in the same run
(the machine may be shared). Run once per TransformerLens line; each run stores its numbers under
``benchmarks/results/raw/patching_agreement_tl<major>.json.gz`` and re-renders the markdown from every
line stored there (``--render-only`` re-renders without measuring):

    <TL 4.3 venv>/bin/python scripts/patching_agreement.py
    <TL 2.18 venv>/bin/python scripts/patching_agreement.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' sweeps draw a progress bar per grid

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cage_lens import patching, zoo  # noqa: E402
from cage_lens.metrics import bootstrap_ci  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RAW = RESULTS / "raw"
GRIDS = ("resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos")
ESTIMATORS = ("rap", "cplrp", "attnlrp", "relp", "gxi", "atp_star")
METHODS = {"rap": dict(), "atp_star": dict(method="atp_star")}
VARIANTS = (
    patching.PatchRules("norm rule only", base="cplrp", mlp=False, attention=False),
    patching.PatchRules("MLP rule only (CP-LRP)", base="cplrp", norms=False, attention=False),
    patching.PatchRules("MLP rule only (AttnLRP)", base="attnlrp", norms=False, attention=False),
    patching.PatchRules("CP-LRP attention only", base="cplrp", norms=False, mlp=False),
    patching.PatchRules("AttnLRP attention only", base="attnlrp", norms=False, mlp=False),
    patching.PatchRules("norm + CP-LRP attention", base="cplrp", mlp=False),
)
DIRECTIONS = ("denoising", "noising")
LABELS = {"rap": "RAP", "cplrp": "CP-LRP", "attnlrp": "AttnLRP", "relp": "RelP rules", "gxi": "AtP (gxi)",
          "atp_star": "AtP*"}
PEARSON_TARGET, SIGN_TARGET = 0.95, 0.95


def token_id(model, word: str) -> int:
    return int(model.to_tokens(word, prepend_bos=False)[0, 0])


def logit_diff(answer: int, contrast: int):
    def metric(logits):
        return (logits[:, -1, answer] - logits[:, -1, contrast]).mean()
    return metric


def cpu_timed(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def estimate(model, tokens, cache, metric, label):
    if label in METHODS:
        return patching.relevance_patch(model, tokens, cache, metric, GRIDS, **METHODS[label])
    return patching.relevance_patch(model, tokens, cache, metric, GRIDS, rules=label)


def flag_stats(result, effects, reference) -> dict:
    """How RAP's flags point at cells where ``reference`` errs by more than 10 % of the grid's largest effect."""
    out = {}
    for g in GRIDS:
        flags = result.flags.get(g)
        if not flags:
            continue
        wrong = ((reference[g].double() - effects[g]).abs() > 0.1 * effects[g].abs().max())
        flagged = torch.zeros_like(wrong)
        for mask in flags.values():
            flagged |= mask
        out[g] = {"wrong": int(wrong.sum()), "flagged": int(flagged.sum()), "hits": int((wrong & flagged).sum()),
                  "unreliable": int(result.unreliable(g).sum())}
    return out


def measure_pair(model, pair, labels) -> dict:
    metric = logit_diff(token_id(model, " " + pair.answer), token_id(model, " " + pair.contrast))
    clean_t, corrupted_t = model.to_tokens(pair.clean), model.to_tokens(pair.corrupted)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_t)
        corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_t)
    row = {}
    for direction in DIRECTIONS:
        if direction == "denoising":
            tokens, cache, base, source = corrupted_t, clean_cache, corrupted_logits, clean_logits
        else:
            tokens, cache, base, source = clean_t, corrupted_cache, clean_logits, corrupted_logits
        baseline = float(metric(base))
        total = float(metric(source)) - baseline
        effects, tl_cpu = cpu_timed(lambda: {
            g: patching.activation_patch(model, tokens, cache, metric, g).double().cpu() - baseline for g in GRIDS})
        results, cpu = {}, {}
        for label in labels:
            results[label], cpu[label] = cpu_timed(lambda label=label: estimate(model, tokens, cache, metric, label))
        names = {label: patching.resolve_patch_rules(label).name if label not in METHODS else label for label in labels}
        cell = (0, pair.position)  # the corrupted token itself, entering layer 0
        record = {
            "total": total,
            "tl_forwards": results["rap"].tl_forwards, "tl_cpu": tl_cpu,
            "pearson": {}, "spearman": {}, "sign": {}, "cost": {}, "cpu": {},
            "share": {g: float(effects[g].abs().max()) / abs(total) if total else float("nan") for g in GRIDS},
            "token_cell": {"activation": float(effects["resid_pre"][cell])},
            "method": {g: results["rap"].method[g] for g in GRIDS},
            "flags": {"vs cplrp": flag_stats(results["rap"], effects, results["cplrp"]),
                      "vs rap": flag_stats(results["rap"], effects, results["rap"])},
        }
        for label, result in results.items():
            name = names[label]
            record["pearson"][name] = {g: patching.pearson(result[g], effects[g]) for g in GRIDS}
            record["spearman"][name] = {g: patching.spearman(result[g], effects[g]) for g in GRIDS}
            record["sign"][name] = {g: _largest_sign_right(result[g], effects[g]) for g in GRIDS}
            record["cost"][name] = result.total_cost
            record["cpu"][name] = cpu[label]
            record["token_cell"][name] = float(result["resid_pre"][cell])
        row[direction] = record
    return row


def _largest_sign_right(estimate: torch.Tensor, effect: torch.Tensor) -> float:
    """1 when the estimate's sign is right on the cell with the largest exact |effect|, else 0."""
    i = int(effect.flatten().abs().argmax())
    return float(torch.sign(estimate.flatten()[i].double()) == torch.sign(effect.flatten()[i]))


def measure_case(task_name: str, corruption: str, n: int, seed: int) -> dict:
    model, task = zoo.load(task_name), zoo.task(task_name)
    options, kind = task.corruptions()[corruption]
    labels = list(ESTIMATORS) + list(VARIANTS)
    start = time.perf_counter()
    prompts = []
    for sample in task.sample(n, seed=seed):
        pair = task.corrupt(sample, **options)
        prompts.append({"clean": pair.clean, "corrupted": pair.corrupted, **measure_pair(model, pair, labels)})
    return {
        "task": task_name, "corruption": corruption, "kind": kind, "model": f"{task_name}-{task.default_size}",
        "architecture": type(model).__name__, "n": n, "seed": seed, "seconds": time.perf_counter() - start,
        "labels": [patching.resolve_patch_rules(lab).name if lab not in METHODS else lab for lab in labels],
        "prompts": prompts, "attention_switch": attention_switch(task_name, options, n, seed),
    }


def attention_switch(name: str, options: dict, n: int, seed: int) -> dict:
    """How the corruption acts through attention, per prompt.

    ``pattern_share``: the share of the clean − corrupted metric gap that patching *only* the attention
    patterns (every layer at once, clean into corrupted) restores; near 1 means the changed token
    decides *where* attention looks rather than *what* it moves. ``change``, ``p_clean``,
    ``p_corrupted``: the attention probability that changes most between the runs and its value in each
    run; |Δp| ≈ 1 with p(1 − p) ≈ 0 in both runs is a saturated switch, where the softmax's gradient is ~0."""
    model, task = zoo.load(name), zoo.task(name)
    rows = []
    for sample in task.sample(n, seed=seed):
        pair = task.corrupt(sample, **options)
        metric = logit_diff(token_id(model, " " + pair.answer), token_id(model, " " + pair.contrast))
        clean_t, corrupted_t = model.to_tokens(pair.clean), model.to_tokens(pair.corrupted)
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
        with torch.no_grad():
            clean_logits, clean_cache = model.run_with_cache(clean_t)
            corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_t)
            with model.hooks(fwd_hooks=[(n_, lambda t, hook, n_=n_: clean_cache[n_]) for n_ in names]):
                pattern_logits = model(corrupted_t)
        gap = float(metric(clean_logits) - metric(corrupted_logits))
        best = (-1.0, 0.0, 0.0)
        for n_ in names:
            clean, corrupted = clean_cache[n_][0], corrupted_cache[n_][0]
            i = int((clean - corrupted).abs().argmax())
            change = float((clean - corrupted).abs().flatten()[i])
            if change > best[0]:
                best = (change, float(clean.flatten()[i]), float(corrupted.flatten()[i]))
        rows.append({"pattern_share": float(metric(pattern_logits) - metric(corrupted_logits)) / gap if gap else float("nan"),
                     "change": best[0], "p_clean": best[1], "p_corrupted": best[2]})
    return {"prompts": rows}


def measure_ioi_batches(n_batches: int, batch: int, seed: int) -> dict:
    """The protocol of the RelP reference notebook: one grid per batch of same-template prompts (one
    token length), metric = mean logit(IO) − logit(S) over the batch; every IOI corruption."""
    model, task = zoo.load("ioi"), zoo.task("ioi")
    by_template: dict[int, list] = {}
    for sample in task.sample(40 * batch, seed=seed):
        by_template.setdefault(sample.meta["template"], []).append(sample)
    groups = [g[:batch] for _, g in sorted(by_template.items()) if len(g) >= batch][:n_batches]
    out = {}
    labels = ("rap", "cplrp", "gxi", "atp_star")
    for corruption, (options, _) in task.corruptions().items():
        for direction in DIRECTIONS:
            values = {r: {g: [] for g in GRIDS} for r in labels}
            for group in groups:
                pairs = [task.corrupt(s, **options) for s in group]
                io = torch.tensor([token_id(model, " " + p.answer) for p in pairs])
                s_ = torch.tensor([token_id(model, " " + p.contrast) for p in pairs])
                rows = torch.arange(len(pairs))

                def metric(logits, io=io, s_=s_, rows=rows):
                    return (logits[rows, -1, io] - logits[rows, -1, s_]).mean()

                ag = patching.agreement(model, corrupted_tokens=[p.corrupted for p in pairs],
                                        clean_tokens=[p.clean for p in pairs], metric=metric, grids=GRIDS,
                                        rules=labels, direction=direction)
                for r in labels:
                    for g in GRIDS:
                        values[r][g].append(ag.pearson(r, g))
            out[f"{corruption}/{direction}"] = values
    return {"batches": len(groups), "batch": batch, "labels": list(labels), "results": out}


# ---------------------------------------------------------------------------- rendering
def mean_ci(values) -> tuple[float, float, float, int]:
    """Mean and 95 % bootstrap interval over the finite values; also how many were NaN (a constant grid)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan"), float("nan"), len(values)
    mean, lo, hi = bootstrap_ci(finite, n=1000, seed=0)
    return mean, lo, hi, len(values) - len(finite)


def cell(values, ci: bool = True) -> str:
    mean, lo, hi, nan = mean_ci(values)
    text = f"{mean:.3f} [{lo:.2f}, {hi:.2f}]" if ci else f"{mean:.3f}"
    return text + (f" ({nan} NaN)" if nan else "")


def stat(result: dict, direction: str, kind: str, label: str, grid: str | None = None) -> list[float]:
    values = [p[direction][kind][label] for p in result["prompts"]]
    return [v[grid] for v in values] if grid else values


def case_name(result: dict) -> str:
    return f"{result['task']} / {result['corruption']}"


def target_table(results: list[dict]) -> tuple[list[str], list[str]]:
    """Per case, direction and grid: RAP's Pearson mean and largest-cell sign rate next to the baselines'."""
    baselines = ("cplrp", "gxi", "atp_star")
    lines = ["| case (kind) | direction | grid | RAP Pearson / sign right | "
             + " | ".join(f"{LABELS[b]} Pearson / sign" for b in baselines) + " |",
             "|" + "---|" * (4 + len(baselines))]
    misses = []
    for result in results:
        for direction in DIRECTIONS:
            for g in GRIDS:
                parts = []
                for label in ("rap",) + baselines:
                    pearson = mean_ci(stat(result, direction, "pearson", label, g))[0]
                    sign = statistics.mean(stat(result, direction, "sign", label, g))
                    miss = not (pearson >= PEARSON_TARGET and sign >= SIGN_TARGET)
                    parts.append(f"{pearson:.3f} / {100 * sign:.0f} %" + (" *" if miss else ""))
                    if miss and label == "rap":
                        misses.append(f"{case_name(result)} {direction} {g} ({pearson:.3f}, {100 * sign:.0f} %)")
                lines.append(f"| {case_name(result)} ({result['kind']}) | {direction} | {g} | " + " | ".join(parts) + " |")
    return lines, misses


def cost_table(results: list[dict]) -> list[str]:
    shown = ("rap", "cplrp", "gxi", "atp_star")
    lines = ["| case | TL forwards (4 grids) | " + " | ".join(f"{LABELS[s]} fe" for s in shown)
             + " | RAP speed-up (fe, min) | TL CPU s | RAP CPU s | RAP speed-up (CPU, median) |",
             "|" + "---|" * (6 + len(shown))]
    for result in results:
        rows = [p[d] for p in result["prompts"] for d in DIRECTIONS]
        tl = statistics.mean(r["tl_forwards"] for r in rows)
        fe = {s: statistics.mean(r["cost"][s] for r in rows) for s in shown}
        speed_fe = min(r["tl_forwards"] / r["cost"]["rap"] for r in rows)
        tl_cpu = statistics.median(r["tl_cpu"] for r in rows)
        rap_cpu = statistics.median(r["cpu"]["rap"] for r in rows)
        speed_cpu = statistics.median(r["tl_cpu"] / r["cpu"]["rap"] for r in rows)
        lines.append(f"| {case_name(result)} | {tl:.0f} | " + " | ".join(f"{fe[s]:.1f}" for s in shown)
                     + f" | {speed_fe:.0f}x | {tl_cpu:.2f} | {rap_cpu:.3f} | {speed_cpu:.0f}x |")
    return lines


def flag_table(results: list[dict]) -> list[str]:
    lines = ["| case | grid | cells CP-LRP gets wrong | of them flagged (recall) | flagged cells that are wrong "
             "(precision) | cells RAP gets wrong | RAP's unreliable cells (flagged, not exact) |",
             "|" + "---|" * 7]
    for result in results:
        for g in GRIDS[:3]:
            rows = [p[d]["flags"] for p in result["prompts"] for d in DIRECTIONS]
            if not any(g in r["vs cplrp"] for r in rows):
                continue
            c = [r["vs cplrp"][g] for r in rows if g in r["vs cplrp"]]
            a = [r["vs rap"][g] for r in rows if g in r["vs rap"]]
            wrong, hits, flagged = (sum(x[k] for x in c) for k in ("wrong", "hits", "flagged"))
            recall = f"{hits / wrong:.2f}" if wrong else "–"
            precision = f"{hits / flagged:.2f}" if flagged else "–"
            lines.append(f"| {case_name(result)} | {g} | {wrong} | {hits} ({recall}) | {precision} | "
                         f"{sum(x['wrong'] for x in a)} | {sum(x['unreliable'] for x in a)} |")
    return lines


def case_section(result: dict) -> list[str]:
    n = result["n"]
    main = ESTIMATORS
    lines = [
        f"### {case_name(result)} ({result['kind']} corruption) — `{result['model']}` ({result['architecture']}), "
        f"{n} prompts, {result['seconds']:.0f} s",
        "",
        f"Example pair: `{result['prompts'][0]['clean']}` → `{result['prompts'][0]['corrupted']}`",
        "",
        "Pearson, mean over prompts [95 % bootstrap CI]; Spearman mean in the last columns.",
        "",
        "| direction | grid | " + " | ".join(LABELS[r] for r in main) + " | "
        + " | ".join(f"ρ {LABELS[r]}" for r in main) + " | max effect / total |",
        "|" + "---|" * (3 + 2 * len(main)),
    ]
    for direction in DIRECTIONS:
        for g in GRIDS:
            pearsons = [cell(stat(result, direction, "pearson", r, g)) for r in main]
            spearmans = [cell(stat(result, direction, "spearman", r, g), ci=False) for r in main]
            share = statistics.median(p[direction]["share"][g] for p in result["prompts"])
            lines.append(f"| {direction} | {g} | " + " | ".join(pearsons) + " | " + " | ".join(spearmans)
                         + f" | {share:.2f} |")
    methods = {}
    for p in result["prompts"]:
        for d in DIRECTIONS:
            for g, m in p[d]["method"].items():
                methods.setdefault(g, {}).setdefault(m.split(",")[0], 0)
                methods[g][m.split(",")[0]] += 1
    lines += ["", "How RAP computed each grid (runs, over prompts and directions): " + "; ".join(
        f"{g}: " + ", ".join(f"{m} ×{k}" for m, k in sorted(v.items())) for g, v in methods.items()) + "."]
    lines += ["", "The corrupted token's own layer-0 `resid_pre` cell: median of estimate / activation-patching effect "
              "(1 = exact):", "", "| direction | effect / total | " + " | ".join(LABELS[r] for r in main) + " |",
              "|" + "---|" * (2 + len(main))]
    for direction in DIRECTIONS:
        cells = [p[direction]["token_cell"] for p in result["prompts"]]
        share = statistics.median(c["activation"] / p[direction]["total"] for c, p in zip(cells, result["prompts"])
                                  if p[direction]["total"])
        ratios = [statistics.median(c[r] / c["activation"] for c in cells if c["activation"] != 0) for r in main]
        lines.append(f"| {direction} | {share:.2f} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    switch = result.get("attention_switch")
    if switch:
        rows = switch["prompts"]
        flat = sum(r["p_clean"] * (1 - r["p_clean"]) < 0.05 and r["p_corrupted"] * (1 - r["p_corrupted"]) < 0.05
                   for r in rows)
        share = statistics.median(r["pattern_share"] for r in rows if not math.isnan(r["pattern_share"]))
        lines += ["", f"How the corruption acts: patching only the attention patterns (all layers, clean into "
                  f"corrupted) restores a median {share:.2f} of the metric gap. The attention probability that "
                  f"changes most between the runs changes by a median {statistics.median(r['change'] for r in rows):.2f}"
                  f" and is saturated in both runs (p(1 − p) < 0.05, softmax gradient ~0) in {flat} of {len(rows)} "
                  "prompts."]
    lines += ["", "Rule ablation (Pearson means, one-backward): each component's LRP rule alone, plain gradients "
              "elsewhere.", "", "| rules | " + " | ".join(f"{d[:5]}. {g}" for d in DIRECTIONS for g in GRIDS) + " |",
              "|" + "---|" * (1 + len(DIRECTIONS) * len(GRIDS))]
    for r in ["gxi"] + [v.name for v in VARIANTS] + ["cplrp", "relp", "attnlrp"]:
        lines.append(f"| {LABELS.get(r, r)} | " + " | ".join(
            cell(stat(result, d, "pearson", r, g), ci=False) for d in DIRECTIONS for g in GRIDS) + " |")
    return lines + [""]


def batch_section(data: dict) -> list[str]:
    labels = data["labels"]
    lines = [f"### ioi, one grid per batch (the RelP reference notebook's protocol): {data['batches']} batches of "
             f"{data['batch']} same-template prompts, metric = batch-mean logit(IO) − logit(S)", "",
             "Pearson, mean over batches.", "",
             "| corruption / direction | grid | " + " | ".join(LABELS[r] for r in labels) + " |",
             "|" + "---|" * (2 + len(labels))]
    for key, values in data["results"].items():
        for g in GRIDS:
            lines.append(f"| {key} | {g} | " + " | ".join(cell(values[r][g], ci=False) for r in labels) + " |")
    return lines + [""]


def render() -> str:
    lines = [
        "# Patching estimates vs activation patching on the zoo",
        "",
        "Generated by `scripts/patching_agreement.py` (run once per TransformerLens venv; do not edit by hand).",
        "The reading of these numbers is in `docs/patching.md#results`.",
        "",
        "- cases: every zoo task with each of its named corruptions (`zoo.task(name).corruptions()`); *value*: the "
        "changed token's content reaches the answer; *routing*: it decides where attention looks (IOI's S2 swap, "
        "the TransformerLens/ARENA demo corruption, and ABC; the pointer-chase start key)",
        "- estimators: RAP (`relevance_patch`'s default: routing-aware patching at its default budget), the "
        "one-backward estimates CP-LRP, AttnLRP, the RelP reference rules and AtP (`gxi`), and AtP* (QK fix + "
        "GradDrop, Kramár et al. 2024)",
        "- reference: TransformerLens' own `patching.get_act_patch_*` on the same prompts, metric and grids; "
        "effect = TL's grid minus the unpatched metric",
        "- denoising = TL's direction (clean activations into the corrupted run); noising = corrupted into clean",
        "- per prompt (batch of 1): Pearson / Spearman over the grid's cells, and whether the estimate has the sign "
        "of the cell with the largest exact effect; mean over prompts (95 % bootstrap CI); a NaN (constant grid) "
        "is left out and counted",
        "- cost: forward-equivalents (fe) = arithmetic of one forward pass of the patched batch (projections, "
        "attention over the keys each row reads, MLP, unembedding; a backward counts 2), summed over everything the "
        "estimator runs, from the patched run's own forward on; TL's sweep costs one forward per grid cell. "
        "CPU seconds are process time measured in the same run and **indicative only** (shared machine)",
        "- *max effect / total*: median over prompts of max |activation-patching effect| in the grid divided by "
        "|metric(source run) − metric(patched run)|",
        "",
    ]
    for raw in sorted(RAW.glob("patching_agreement_*.json.gz"), reverse=True):
        data = json.loads(gzip.decompress(raw.read_bytes()))
        results = data["results"]
        table, misses = target_table(results)
        lines += [f"## TransformerLens {data['transformer_lens']} ({results[0]['architecture']}), torch {data['torch']}",
                  "", f"Targets: Pearson ≥ {PEARSON_TARGET} (mean over prompts) and the sign of the largest exact "
                  f"cell right on ≥ {100 * SIGN_TARGET:.0f} % of prompts, every case, direction and grid "
                  "(`*`: missed).", "",
                  f"- RAP misses: {'; '.join(misses) if misses else 'none'}", ""]
        lines += table + ["", "Cost per prompt and direction, all four grids (mean; speed-ups over TL's sweep of the "
                          "same grids):", ""] + cost_table(results)
        lines += ["", "RAP's flags (`saturated_switch`, `disagree`, `cross_routing`, `cancellation`) against the "
                  "cells an estimate gets wrong by more than 10 % of the grid's largest effect, summed over prompts "
                  "and directions:", ""] + flag_table(results) + [""]
        for result in results:
            lines += case_section(result)
        if data.get("ioi_batches"):
            lines += batch_section(data["ioi_batches"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=zoo.tasks())
    parser.add_argument("--n", type=int, default=30, help="prompts per task and corruption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=4, help="IOI batch-protocol grids (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true", help="re-render the markdown from stored numbers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.render_only:
        tl = version("transformer-lens")
        results = []
        for name in args.tasks:
            for corruption in zoo.task(name).corruptions():
                print(f"{name} / {corruption}: {args.n} prompts ...", flush=True)
                results.append(measure_case(name, corruption, args.n, args.seed))
                print(f"  {results[-1]['seconds']:.0f} s", flush=True)
        batches = measure_ioi_batches(args.batches, 8, args.seed) if args.batches and "ioi" in args.tasks else None
        RAW.mkdir(parents=True, exist_ok=True)
        out = RAW / f"patching_agreement_tl{tl.split('.')[0]}.json.gz"
        data = {"transformer_lens": tl, "torch": torch.__version__, "results": results, "ioi_batches": batches}
        out.write_bytes(gzip.compress(json.dumps(data).encode(), mtime=0))
        print(f"wrote {out}")
    text = render()
    (RESULTS / "patching_agreement.md").write_text(text)
    print(text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
