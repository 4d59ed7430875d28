"""Reproduction: CAGE vs row attribution on the zoo tasks (docs/cage.md, metrics: docs/metrics.md).

For every base method and each normalisation (paper, signed), compare the direct-edge baseline
(row attribution) with CAGE's path-marginalised context attribution, on teacher-forced ground-truth
completions of ``pointer-chase``, ``facts`` and ``arith``.

Protocol (every choice stated):
- Nodes: the BOS token alone, then the prompt's sentences (``sample.sentence_spans``, BOS removed from
  the first), then every generated token as its own node (generated sentences would make the
  pointer-chase chain a single node, where CAGE and row attribution coincide). Token scores are
  summed per (generated token × source span) block, then normalised (docs/cage.md#normalisation).
- Attribution vector: summed over all generated outputs. The BOS node (an attention sink) is
  excluded from every metric.
- Faithfulness: deletion of prompt sentences, most relevant first, replaced by EOS tokens; summed
  log-prob of the whole original completion; RISE and MAS (lower is better; :mod:`cage_lens.metrics`).
- Coverage and ground truth over the *content* sentences (the query/instruction sentence excluded):
  attribution coverage (double bound [E/2, 3E/2]), precision@k with k = number of ground-truth
  sentences, AUROC.
- Last output alone (the case CAGE is built for: a token that depends on the prompt through earlier
  generated tokens): precision@k and AUROC of the attribution of the *last* generated token against the
  content sentences holding its ``total_sources``.
- Means with 95 % percentile-bootstrap CIs (1000 resamples); paired win counts CAGE vs row.

    python benchmarks/cage_eval.py --n 200 --tasks pointer-chase facts arith
    python benchmarks/cage_eval.py --report   # rebuild results/cage_eval.md from the saved per-sample JSON

The generated ``results/cage_eval.md`` holds tables only, computed from ``results/raw/*.json.gz``; the
reading of the results is written by hand in ``results/cage_eval_notes.md``, which no script touches.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch

from cage_lens import zoo
from cage_lens.generation.graph import GenerationGraph, cage
from cage_lens.generation.methods import METHODS
from cage_lens.metrics import (
    attribution_coverage, auroc, bootstrap_ci, deletion_logprobs, mas, normalize_curve, paired_wins, precision_at_k,
    ranking, rise,
)

TASKS = ["pointer-chase", "facts", "arith"]
METRICS = {  # name: higher is better?
    "RISE": False, "MAS": False, "AC": True, "P@k": True, "AUROC": True, "P@k last": True, "AUROC last": True,
}
VARIANTS = [("row", "paper"), ("cage", "paper"), ("row", "signed"), ("cage", "signed")]
RESULTS = Path(__file__).resolve().parent / "results"
RAW_DIR = RESULTS / "raw"  # per-sample results (gzipped JSON), committed so --report reproduces the table


def prompt_spans(sample) -> list[tuple[int, int]]:
    """BOS alone, then the sentences (the first one without BOS)."""
    sents = [tuple(s) for s in sample.sentence_spans]
    return [(0, 1), (1, sents[0][1])] + sents[1:]


class DeletionCache:
    """Deletion curves depend only on the removal order: compute each order once per sample."""

    def __init__(self, model, tokens, n_prompt, spans):
        self.model, self.tokens, self.n_prompt, self.spans, self.curves = model, tokens, n_prompt, spans, {}

    def curve(self, scores):
        order = tuple(ranking(scores))
        if order not in self.curves:
            # scores that reproduce this order exactly (descending ranks)
            proxy = torch.zeros(len(order))
            proxy[list(order)] = torch.arange(len(order), 0, -1, dtype=torch.float32)
            s = deletion_logprobs(self.model, self.tokens, self.n_prompt, self.spans, proxy)
            self.curves[order] = normalize_curve(s)
        return self.curves[order]


def evaluate_sample(model, sample, method: str, options: dict, cache: DeletionCache) -> dict:
    spans = prompt_spans(sample)
    g = cage(model, sample.prompt, completion=sample.completion, method=method, granularity=spans,
             normalize="paper", **options)
    graphs = {"paper": g, "signed": GenerationGraph.from_table(g.table, g.n_prompt, "signed")}
    n_sent = len(spans) - 1
    content = [i for i in range(n_sent) if i not in set(sample.query_sentences or [])]
    truth = [content.index(i) for i in sample.ground_truth_sentences]
    sentence_of = {p: i for i, (a, b) in enumerate(sample.sentence_spans) for p in range(a, b)}
    truth_last = sorted({content.index(sentence_of[p]) for p in sample.total_sources[-1] if sentence_of[p] in content})
    out = {}
    for kind, norm in VARIANTS:
        graph = graphs[norm]
        vec = graph.row_attribution() if kind == "row" else graph.context_attribution()
        sent = vec[1:].double()  # drop the BOS node
        curve = cache.curve(sent)
        content_scores = sent[content]
        last = (graph.row_attribution(-1) if kind == "row" else graph.context_attribution(-1))[1:].double()[content]
        ranked_last = 0 < len(truth_last) < len(content)
        out[f"{kind}-{norm}"] = {
            "RISE": rise(curve),
            "MAS": mas(curve, sent),
            "AC": attribution_coverage(content_scores, truth)["double"],
            "P@k": precision_at_k(content_scores, truth),
            "AUROC": auroc(content_scores, truth),
            "P@k last": precision_at_k(last, truth_last) if ranked_last else None,
            "AUROC last": auroc(last, truth_last) if ranked_last else None,
            "empty_rows": len(graph.empty_rows),
        }
    return out


def run_task(task_name: str, n: int, seed: int, methods: list[str], steps: int) -> dict:
    model = zoo.load(task_name)
    samples = zoo.task(task_name).sample(n, seed=seed)
    results = {m: [] for m in methods}
    start = time.perf_counter()
    for i, sample in enumerate(samples):
        prompt = model.to_tokens(sample.prompt).cpu()
        tokens = torch.cat([prompt, model.to_tokens(sample.completion, prepend_bos=False).cpu()], dim=1)
        cache = DeletionCache(model, tokens, prompt.shape[1], prompt_spans(sample)[1:])
        for m in methods:
            options = {"steps": steps} if m in ("integrated_gradients", "attention_x_ig") else {}
            results[m].append(evaluate_sample(model, sample, m, options, cache))
        if (i + 1) % 25 == 0:
            print(f"  {task_name}: {i + 1}/{n} samples, {time.perf_counter() - start:.0f} s", flush=True)
    info = next((d for d in zoo.list() if d["name"] == task_name and d["default"]), {})
    return {"task": task_name, "n": n, "seed": seed, "methods": methods, "results": results,
            "model": {k: info.get(k) for k in ("name", "size", "architecture", "parameters", "accuracy")},
            "seconds": time.perf_counter() - start, "run": environment()}


def environment() -> dict:
    """When and with what the samples were computed (stored with them, printed in the report)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformer-lens": version("transformer-lens"), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------- report
def _values(per_sample, key, metric) -> list[float]:
    """Per-sample values; samples where the metric is undefined (None) are left out."""
    return [s[key][metric] for s in per_sample if s[key][metric] is not None]


def _fmt(values) -> str:
    if not values:
        return "n/a"
    mean, lo, hi = bootstrap_ci(values, n=1000, seed=0)
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _empty_tally() -> dict:
    """Per metric: mean-level comparison counts CAGE vs row, the cells where CAGE is worse, the
    differences of means |mean(CAGE) − mean(row)| and the half-widths of the two CIs."""
    return {m: {"better": 0, "worse": 0, "comparisons": 0, "losses": [], "deltas": [], "half_widths": []}
            for m in METRICS}


def _half_width(values) -> float:
    _, lo, hi = bootstrap_ci(values, n=1000, seed=0)
    return (hi - lo) / 2


def task_report(data: dict) -> tuple[list[str], dict]:
    lines = [f"### {data['task']} (n = {data['n']}, seed {data['seed']}, model {data['model'].get('name')}-"
             f"{data['model'].get('size')}, {data['model'].get('parameters')} parameters)", ""]
    arrows = " | ".join(f"{m} {'↑' if up else '↓'}" for m, up in METRICS.items())
    lines.append(f"| method | variant | {arrows} | empty rows |")
    lines.append("|---|---|" + "---|" * (len(METRICS) + 1))
    tally = _empty_tally()
    for method, per_sample in data["results"].items():
        for kind, norm in VARIANTS:
            key = f"{kind}-{norm}"
            cells = [_fmt(_values(per_sample, key, m)) for m in METRICS]
            empty = sum(s[key]["empty_rows"] for s in per_sample)
            lines.append(f"| {method} | {key} | " + " | ".join(cells) + f" | {empty} |")
    lines += ["", "Paired wins of CAGE over row attribution (wins / losses / ties, per sample):", ""]
    lines.append("| method | normalisation | " + " | ".join(METRICS) + " |")
    lines.append("|---|---|" + "---|" * len(METRICS))
    for method, per_sample in data["results"].items():
        for norm in ("paper", "signed"):
            cells = []
            for m, up in METRICS.items():
                c = _values(per_sample, f"cage-{norm}", m)
                r = _values(per_sample, f"row-{norm}", m)
                w = paired_wins(c, r, higher_is_better=up, tol=1e-9)
                cells.append(f"{w['wins']}/{w['losses']}/{w['ties']}")
                diff = (sum(c) - sum(r)) / len(c)
                better = diff > 1e-9 if up else diff < -1e-9
                worse = diff < -1e-9 if up else diff > 1e-9
                tally[m]["comparisons"] += 1
                tally[m]["better"] += better
                tally[m]["worse"] += worse
                tally[m]["deltas"].append(abs(diff))
                tally[m]["half_widths"] += [_half_width(c), _half_width(r)]
                if worse:
                    tally[m]["losses"].append(f"{data['task']}/{method}/{norm}")
            lines.append(f"| {method} | {norm} | " + " | ".join(cells) + " |")
    return lines + [""], tally


def _run_line(data: dict) -> str:
    model, run = data["model"], data.get("run") or {}
    accuracy = model.get("accuracy")
    when = ", ".join(f"{k} {v}" for k, v in run.items()) or "run details not recorded"
    return (f"| {data['task']} | {data['n']} | {data['seed']} | {model.get('name')}-{model.get('size')} "
            f"({model.get('architecture')}, {model.get('parameters')} parameters) | "
            f"{'n/a' if accuracy is None else f'{accuracy:.3f}'} | {len(data['methods'])} | "
            f"{data['seconds']:.0f} | {when} |")


def write_report(raw: list[dict], path: Path) -> None:
    """``path``: tables only, every number computed from ``raw`` (the per-sample results)."""
    lines = ["# CAGE vs row attribution on the zoo tasks", "",
             "Generated by `python benchmarks/cage_eval.py --report` from `benchmarks/results/raw/*.json.gz` "
             "(protocol in the script's docstring; the per-sample runs: `python benchmarks/cage_eval.py --n 200`). "
             "Do not edit: the reading of these tables is `cage_eval_notes.md`.", "",
             "Cells: mean [95 % bootstrap CI]. RISE/MAS: sentence deletion, lower is better. AC: attribution "
             "coverage (double bound). P@k, AUROC: ground-truth source sentences among the content sentences. "
             "Completions are the zoo's ground-truth ones, teacher-forced.", "",
             "| task | n | seed | model | held-out accuracy | methods | seconds | run |", "|---|---|---|---|---|---|---|---|"]
    lines += [_run_line(data) for data in raw] + [""]
    totals = _empty_tally()
    body = []
    for data in raw:
        task_lines, tally = task_report(data)
        body += task_lines
        for m in METRICS:
            for k in totals[m]:
                totals[m][k] += tally[m][k]
    n_all = sum(t["comparisons"] for t in totals.values())
    n_better = sum(t["better"] for t in totals.values())
    n_worse = sum(t["worse"] for t in totals.values())
    lines += ["## Summary", "",
              f"Mean-level comparisons CAGE vs row attribution (task × method × normalisation, per metric; "
              f"equal = within 1e-9). Over all metrics: CAGE better in {n_better} of {n_all}, worse in {n_worse}.", "",
              "|Δ|: |mean(CAGE) − mean(row)| per cell; CI half-width: median over the cells' CAGE and row intervals.", "",
              "| metric | CAGE better | CAGE worse | equal | largest \\|Δ\\| | median \\|Δ\\| | median CI half-width "
              "| where CAGE is worse (task/method/normalisation) |",
              "|---|---|---|---|---|---|---|---|"]
    for m, t in totals.items():
        equal = t["comparisons"] - t["better"] - t["worse"]
        lines.append(f"| {m} | {t['better']} | {t['worse']} | {equal} | {max(t['deltas']):.3f} | "
                     f"{statistics.median(t['deltas']):.3f} | {statistics.median(t['half_widths']):.3f} | "
                     f"{', '.join(t['losses']) or '—'} |")
    lines.append("")
    path.write_text("\n".join(lines + body) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description="CAGE vs row attribution on zoo tasks")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--steps", type=int, default=20, help="integrated-gradients steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only rebuild the markdown from saved JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    RAW_DIR.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for name in args.tasks:
            zoo.model_dir(name)  # a missing zoo model is an error, not a silently shorter report
            print(f"{name}: {args.n} samples × {len(args.methods)} methods", flush=True)
            data = run_task(name, args.n, args.seed, args.methods, args.steps)
            with gzip.open(RAW_DIR / f"{name}.json.gz", "wt") as f:
                json.dump(data, f)
    raw = []
    for t in TASKS:
        if (RAW_DIR / f"{t}.json.gz").exists():
            with gzip.open(RAW_DIR / f"{t}.json.gz", "rt") as f:
                raw.append(json.load(f))
    write_report(raw, RESULTS / "cage_eval.md")
    print(f"wrote {RESULTS / 'cage_eval.md'} ({', '.join(d['task'] for d in raw)})")


if __name__ == "__main__":
    main()
