"""Benchmark: cage_lens at the seeds' sizes — random weights with the real configurations of Qwen3-0.6B,
Qwen3-1.7B, Qwen3-8B and OLMo-3-7B, in bfloat16, at 512, 2,048 and 8,192 tokens.

For every model, length and computation — one ``attribute()`` call, the whole graph
(``node_threshold=None``), the default graph, the CAGE table of 8 teacher-forced tokens and a study
case (a greedy continuation of 4 tokens, then the contrastive attribution of the model's top-1 against
its second choice) — the script first asks ``cage_lens.estimate`` for the peak memory. A row whose
weights and estimated peak fit ``--memory`` is measured in its own process (``measure.child``: CPU and
wall seconds, peak resident memory above the loaded model), with the long-context mode chosen as a user
gets it (``long_context=None``, for the memory left beside the weights); any other row is reported from
the estimate, with seconds from the scaling law fitted on the measured rows (seconds per
floating-point operation of the estimate's time model, one rate per computation).

Weights: every matrix ~ N(0, 0.02²) (as such checkpoints are initialised), norm scales 1, drawn in
bfloat16 from a seeded generator; token ids are random below the tiny tokenizer's vocabulary (the
numbers do not depend on which ids). The configurations are the public ``config.json`` values of the
model cards (huggingface.co/Qwen/Qwen3-0.6B, Qwen/Qwen3-1.7B, Qwen/Qwen3-8B, allenai/Olmo-3-1025-7B):
see :data:`MODELS`.

Every measured row is cached in ``benchmarks/results/bench_scale.json`` as soon as it is measured, so
an interrupted run resumes where it stopped (``--redo`` measures again). ``--glibc-time`` times each
measured row once more in a process under glibc's default allocator (the peak column's setting slows the
long-context rows: docs/estimate.md#the-allocator). The rows take hours on a CPU
and need a quiet machine (benchmarks/harness.py refuses to write the table otherwise):

    python benchmarks/bench_scale.py                              # everything that fits 22 GB
    python benchmarks/bench_scale.py --measure-models Qwen3-0.6B --measure-tokens 512   # measure a few rows, estimate the rest
    python benchmarks/bench_scale.py --models Qwen3-0.6B --tokens 512 --what attribute --allow-busy   # a smoke row
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from harness import LoadWatch, add_arguments, write_results
from measure import child, measured

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "bench_scale.json"

#: the public config.json values (model cards on huggingface.co)
MODELS: dict[str, dict] = {
    "Qwen3-0.6B": dict(model_type="qwen3", num_hidden_layers=28, hidden_size=1024, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                       hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000, max_position_embeddings=40960,
                       tie_word_embeddings=True, attention_bias=False),
    "Qwen3-1.7B": dict(model_type="qwen3", num_hidden_layers=28, hidden_size=2048, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144, vocab_size=151936,
                       hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000, max_position_embeddings=40960,
                       tie_word_embeddings=True, attention_bias=False),
    "Qwen3-8B": dict(model_type="qwen3", num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000, max_position_embeddings=40960,
                     tie_word_embeddings=False, attention_bias=False),
    # sliding-window attention (4,096) in three of every four layers, full attention in the fourth
    "OLMo-3-7B": dict(model_type="olmo3", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=100278, hidden_act="silu",
                      rms_norm_eps=1e-6, rope_theta=500000, max_position_embeddings=65536, sliding_window=4096,
                      tie_word_embeddings=False, attention_bias=False),
}
TOKENS = (512, 2048, 8192)
#: what each row computes, and the estimate it is compared with
WHATS = {"attribute": "attribute", "whole graph": "circuit_graph", "default graph": "circuit_graph",
         "cage table": "cage", "study case": "study"}
CAGE_TOKENS, STUDY_STEPS = 8, 4


# ---------------------------------------------------------------------------- one row, in its own process
def build(name: str, n_tokens: int, device: str = "cpu"):
    """The TL model of ``name`` with random bfloat16 weights (docstring), on ``device``.

    On cuda the weights are drawn there (from a cuda generator: other numbers than the CPU's, the same
    distribution), so that an 8B model is built in seconds."""
    import torch
    import transformers

    from cage_lens.loading import eager_kwargs, from_hf_model
    from cage_lens.testing import tiny_tokenizer

    spec = dict(MODELS[name])
    model_type = spec.pop("model_type")
    config_class = {"qwen3": transformers.Qwen3Config, "olmo3": transformers.Olmo3Config}[model_type]
    layers = spec["num_hidden_layers"]
    extra = {"layer_types": ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(layers)]} \
        if model_type == "olmo3" else {}
    config = config_class(**spec, **extra, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, **eager_kwargs()).eval()
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for path, p in hf.named_parameters():
            if "norm" in path:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32, device=device).mul_(0.02))
    return from_hf_model(hf, tiny_tokenizer(), name=name).to(device)


def row_call(model, tokens, what: str):
    """The computation of a row, as a function of nothing; ``tokens`` is ``[1, n_tokens]`` on the model's device."""
    import torch

    import cage_lens
    from cage_lens.core.adapter import adapt
    from cage_lens.study.cases import _last_logits

    vocab = len(model.tokenizer)

    def study_case():
        sequence = tokens
        for _ in range(STUDY_STEPS):   # the study's own generation step: a forward, the last row unembedded
            last = _last_logits(adapt(model), [sequence[0].tolist()], pad=0)[0, :vocab]
            sequence = torch.cat([sequence, last.argmax().view(1, 1).to(sequence.device)], dim=1)
        top2 = last.topk(2).indices.tolist()
        return cage_lens.attribute(model, sequence, target=top2[0], contrast=top2[1], strict=False)

    completion = torch.randint(3, vocab, (CAGE_TOKENS,)).to(tokens.device)
    calls = {
        "attribute": lambda: cage_lens.attribute(model, tokens, target=5, strict=False),
        "whole graph": lambda: cage_lens.circuit_graph(model, tokens[0], target=5, levels="block", node_threshold=None,
                                                       top_p=0.85, dense_limit=0, strict=False),
        "default graph": lambda: cage_lens.circuit_graph(model, tokens[0], target=5, levels="block", top_p=0.85,
                                                         dense_limit=0, strict=False),
        "cage table": lambda: cage_lens.cage(model, tokens, completion=completion),
        "study case": study_case,
    }
    return calls[what]


def prepared(name: str, n_tokens: int, device: str = "cpu"):
    """The row's model, after one short attribution (the certificate's probes), and the row's tokens."""
    import torch

    import cage_lens

    model = build(name, n_tokens, device)
    vocab = len(model.tokenizer)
    cage_lens.attribute(model, torch.randint(3, vocab, (1, 16)).to(device), target=5, strict=False)
    tokens = torch.randint(3, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(n_tokens))
    return model, tokens.to(device)


def plan_of(out) -> dict:
    """What a run chose: the long-context mode, the CAGE table's rows at once; and its warnings."""
    meta = getattr(out, "meta", None) or {}
    settings = meta.get("settings", {})
    plan = {"long_context": bool(settings.get("long_context"))}
    if "rows_at_once" in settings:   # the CAGE table's plan: generated tokens differentiated at once
        plan["rows_at_once"] = settings["rows_at_once"]
    plan["warnings"] = [w[:160] for w in (meta.get("warnings") or getattr(out, "settings", {}).get("warnings") or [])]
    return plan


def run_row(name: str, n_tokens: int, what: str) -> dict:
    model, tokens = prepared(name, n_tokens)
    stats, out = measured(row_call(model, tokens, what))
    return {**stats, **plan_of(out)}


# ---------------------------------------------------------------------------- the table
def estimate_row(name: str, n_tokens: int, what: str, available: float | None, chosen: dict | None = None,
                 device: str = "cpu"):
    """The estimate of a row on ``device``: of the plan a run ``chosen`` (:func:`plan_of`: pass, rows at
    once), else of the plan the estimate chooses for ``available`` bytes."""
    import cage_lens

    plan = {}
    if chosen is not None:
        plan["long_context"] = bool(chosen.get("long_context"))
        if what == "cage table" and chosen.get("rows_at_once"):
            plan["rows"] = chosen["rows_at_once"]
    return cage_lens.estimate({**MODELS[name], "torch_dtype": "bfloat16"}, n_tokens, WHATS[what],
                              new_tokens=CAGE_TOKENS if what == "cage table" else STUDY_STEPS,
                              available_bytes=available, line="bridge", device=device, **plan)


def _parse_gb(text: str) -> float:
    return float(text.upper().rstrip("GB")) * 2**30


#: attention weights tried by the fit: an operation of the attention (scores, softmax, mixing) costs
#: ``weight`` operations of the blocks' matrix products
ATTENTION_WEIGHTS = [1.0 + 0.05 * i for i in range(381)]   # 1 … 20


def _weighted_ops(row: dict, weight: float) -> float:
    return row["flops"] * (1.0 + (weight - 1.0) * row.get("attention_share", 0.0))


def _scaling_law(rows: dict) -> tuple[float, dict[str, float]]:
    """The law that turns the time model's operations into seconds: one attention weight for all rows
    (eager attention is a chain of memory-bound ``[head, T, T]`` steps, slower per operation than the
    blocks' matrix products) and one rate per computation (geometric mean), fitted together by least
    squares on the logarithm of the measured CPU seconds."""
    measured = [row for row in rows.values() if "cpu_s" in row and row.get("flops")]

    def fit(weight: float) -> tuple[float, dict[str, float]]:
        logs: dict[str, list[float]] = {}
        for row in measured:
            logs.setdefault(row["what"], []).append(math.log(row["cpu_s"] / _weighted_ops(row, weight)))
        means = {what: sum(v) / len(v) for what, v in logs.items()}
        residual = sum((math.log(row["cpu_s"] / _weighted_ops(row, weight)) - means[row["what"]]) ** 2
                       for row in measured)
        return residual, {what: math.exp(m) for what, m in means.items()}

    if not measured:
        return 1.0, {}
    weight = min(ATTENTION_WEIGHTS, key=lambda w: fit(w)[0])
    return weight, fit(weight)[1]


def _predicted_seconds(row: dict, weight: float, rates: dict[str, float]) -> float | None:
    rate = rates.get(row["what"])
    return rate * _weighted_ops(row, weight) if rate else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    parser.add_argument("--what", nargs="*", default=list(WHATS), choices=list(WHATS))
    parser.add_argument("--measure-models", nargs="*", default=None, choices=list(MODELS),
                        help="measure only these models' rows (default: every model); the others come from the estimate")
    parser.add_argument("--measure-tokens", type=int, nargs="*", default=None,
                        help="measure only rows of these lengths (default: every length); the others come from the estimate")
    parser.add_argument("--memory", default="22G", help="memory a row may use in all, weights included (default 22G)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each measured row")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds a row may run")
    parser.add_argument("--glibc-time", action="store_true",
                        help="time every measured row a second time in a process under glibc's default allocator "
                             "(docs/estimate.md#the-allocator)")
    parser.add_argument("--redo", action="store_true", help="measure again the cached rows this run measures (--measure-models, --measure-tokens)")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "TOKENS", "WHAT", "THREADS"))
    add_arguments(parser)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(int(args.child[3]))
        print(json.dumps(run_row(args.child[0], int(args.child[1]), args.child[2])))
        return

    memory = _parse_gb(args.memory)
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    watch = LoadWatch(own_threads=args.threads).start()
    for name in args.models:
        for n_tokens in args.tokens:
            for what in args.what:
                key = f"{name}|{n_tokens}|{what}"
                redo = args.redo and _measured_in_this_run(name, n_tokens, args)   # other rows stay as cached
                row, est, weights = _estimate_columns(name, n_tokens, what, memory, cache.get(key) if not redo else None)
                if key in cache and "cpu_s" in cache[key] and not redo:
                    cache[key].update(row)   # the estimate columns follow the current estimate
                    continue
                if not est.fits:
                    cache[key] = {**row, "skipped": f"estimate {est.peak_bytes / 2**30:.1f} GB + weights "
                                                    f"{weights / 2**30:.1f} GB > {args.memory}"}
                    continue
                if not _measured_in_this_run(name, n_tokens, args):
                    failed = {k: cache[key][k] for k in ("error", "command") if k in cache.get(key, {})}   # kept until measured
                    cache[key] = {**row, "skipped": "fits; not measured in this run (--measure-models, --measure-tokens)",
                                  **(failed if "error" in failed else {})}
                    continue
                print(f"measuring {key} (estimate {est.peak_bytes / 2**30:.2f} GB above {weights / 2**30:.2f} GB)",
                      flush=True)
                left = f"{(memory - weights) / 2**30:.2f}G"
                argv = [name, str(n_tokens), what, str(args.threads)]
                result = child(__file__, argv, memory=left, timeout=args.timeout)
                if args.glibc_time and "cpu_s" in result:
                    default = child(__file__, argv, memory=left, timeout=args.timeout, allocator_setting=False)
                    result.update({"glibc_cpu_s": default["cpu_s"], "glibc_wall_s": default["wall_s"]} if "cpu_s" in default
                                  else {"glibc_error": default.get("error", "")})
                cache[key] = {**row, **result, "command": _command()}
                CACHE.parent.mkdir(parents=True, exist_ok=True)
                CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True))
                print("  ", json.dumps(cache[key]), flush=True)
    watch.stop()
    for key, row in cache.items():   # rows outside this run's selection: their estimate columns follow the estimate too
        name, n_tokens, what = key.split("|")
        if name in MODELS and what in WHATS:
            row.update(_estimate_columns(name, int(n_tokens), what, memory, row)[0])
    CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True))   # the estimate columns as the table shows them
    write_results(RESULTS / "bench_scale.md", table(cache, args), watch, args.allow_busy)


def _estimate_columns(name: str, n_tokens: int, what: str, memory: float, cached: dict | None):
    """A row's estimate columns (peak, pass, operations of the time model), its estimate and the weights' bytes."""
    weights = estimate_row(name, n_tokens, what, None).weights_bytes
    est = estimate_row(name, n_tokens, what, memory - weights, cached if cached and "cpu_s" in cached else None)
    row = {"model": name, "tokens": n_tokens, "what": what, "estimate_gb": est.peak_bytes / 2**30,
           "weights_gb": weights / 2**30, "long_context_estimate": est.long_context,
           "time_forwards": est.time_forwards, "flops": est.time_forwards * est.forward_flops,
           "attention_share": est.attention_share, "rows_estimate": est.rows}
    return row, est, weights


def _command() -> str:
    return shlex.join(["python", "benchmarks/bench_scale.py"] + [a for a in sys.argv[1:] if a != "--allow-busy"])


def _measured_in_this_run(name: str, n_tokens: int, args) -> bool:
    return ((args.measure_models is None or name in args.measure_models)
            and (args.measure_tokens is None or n_tokens in args.measure_tokens))


def table(cache: dict, args) -> str:
    from harness import environment_line

    import transformer_lens  # noqa: F401

    from cage_lens.loading import has_hooked_transformer

    weight, rates = _scaling_law(cache)
    line = "TL 2.18 (HookedTransformer)" if has_hooked_transformer() else "TL 4.3 (TransformerBridge)"
    out = ["# cage_lens at the seeds' sizes (random weights, real configurations, bfloat16)", "",
           f"Command: `{_command()}` "
           f"on {line}; {environment_line(args.threads)}; rows that fit `--memory {args.memory}` (weights included) "
           "are measured, each in its own process; the others come from `cage_lens.estimate` (docs/estimate.md). "
           "Measured rows are cached in `bench_scale.json` and kept across runs; the commands that measured them:", ""]
    commands = sorted({row["command"] for row in cache.values() if "cpu_s" in row and "command" in row})
    out += [f"- `{command}`" for command in commands] + [""]
    out += [
           "Peak = resident memory above the loaded weights; **lc** = the long-context mode (chosen by the estimate "
           "for the memory left beside the weights); est./meas. = the estimate's peak over the measured one. "
           "Estimated s = the time model's floating-point operations, those of the attention weighted "
           f"{weight:.2f}×, times the rate of the computation, both fitted on the measured rows (least squares on "
           "log seconds); its ratio to the measured CPU seconds spans "
           f"{_fit_span(cache, weight, rates)} on them:", ""]
    out += [f"- {what}: {rate * 1e12:.3g} s per 10¹² weighted operations" for what, rate in sorted(rates.items())]
    out += ["", "CPU s and wall s are taken under the allocator setting the peak column needs "
            "(`MALLOC_MMAP_THRESHOLD_=65536`), which slows the long-context rows; **glibc s** = the CPU seconds of the "
            "same row in a second process under glibc's default allocator, what users get (`--glibc-time`; "
            "docs/estimate.md#the-allocator), where measured.", ""]
    out += ["| model | tokens | computation | weights GB | measured CPU s | glibc s | wall s | peak GB | estimate GB | "
            "est./meas. | estimated s | note |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in MODELS:
        for n_tokens in TOKENS:
            for what in WHATS:
                row = cache.get(f"{name}|{n_tokens}|{what}")
                if row is None:
                    continue
                seconds = _predicted_seconds(row, weight, rates)
                guess = "—" if seconds is None else f"{seconds:.0f}"
                mode = " lc" if row.get("long_context", row.get("long_context_estimate")) else ""
                if what == "cage table" and (rows := row.get("rows_at_once", row.get("rows_estimate"))):
                    mode += f" ({rows} rows at once)"
                if "cpu_s" in row:
                    ratio = row["estimate_gb"] / row["peak_gb"] if row["peak_gb"] > 0 else float("nan")
                    failed = [f"glibc's default allocator: {row['glibc_error']}"] if "glibc_error" in row else []
                    note = "; ".join(failed + row.get("warnings", []))[:120]
                    glibc = f"{row['glibc_cpu_s']:.0f}" if "glibc_cpu_s" in row else "failed" if failed else "—"
                    out.append(f"| {name} | {n_tokens} | {what}{mode} | {row['weights_gb']:.2f} | {row['cpu_s']:.0f} | "
                               f"{glibc} | {row['wall_s']:.0f} | {row['peak_gb']:.2f} | {row['estimate_gb']:.2f} | {ratio:.2f} | "
                               f"{guess} | {note} |")
                else:
                    note = row.get("error") or row.get("skipped", "")
                    out.append(f"| {name} | {n_tokens} | {what}{mode} | {row['weights_gb']:.2f} | — | — | — | — | "
                               f"{row['estimate_gb']:.2f} | — | {guess} | {note[:160]} |")
    return "\n".join(out)


def _fit_span(cache: dict, weight: float, rates: dict[str, float]) -> str:
    ratios = [_predicted_seconds(row, weight, rates) / row["cpu_s"] for row in cache.values()
              if "cpu_s" in row and row.get("flops") and row["what"] in rates]
    return f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "—"


if __name__ == "__main__":
    main()
