"""bfloat16 relevance against float64 on the same rounded weights: the certificate, the accuracy of
token relevance, and what a higher-precision path buys (docs/rules.md#precision).

Models: random-weight models with real checkpoints' configurations (weights N(0, 0.02²), as such
checkpoints are initialised), in bfloat16:

- ``qwen3-0.6b``: Qwen3-0.6B (28 layers, d_model 1024, 16/8 heads, head_dim 128, d_mlp 3072, vocab
  151,936, q/k norms, tied embeddings);
- ``gemma3-1b``: Gemma-3-1B (26 layers, d_model 1152, 4/1 heads, head_dim 256, d_mlp 6912, vocab
  262,144, sandwich and q/k norms, 5 local layers (window 512) per global one);
- ``olmo3-7b``: OLMo-3-7B's layers (d_model 4096, 32 heads, d_mlp 11008, vocab 100,278, post-norms,
  q/k norms over all heads) — only as many of its 32 layers, and as large a vocabulary, as the case
  says (the float64 copy of more does not fit a 24 GB machine).

A case holds the bfloat16 model and its float64 copy at once, 10 bytes per parameter: the default
cases stay under ~7 GB (Gemma-3-1B with half of its layers, OLMo-3-7B with 2 layers and a 32,000-token
vocabulary, at 256 and at 2,048 tokens); 28-layer Qwen3-0.6B at 2,048 tokens is run with 4 layers (its
float64 attention patterns alone would take 15 GB).

Per case (one subprocess each: ``--cases``; ``NAME:LAYERS:TOKENS[:VOCAB]``): the bfloat16 model's
completeness certificate with default settings; then a float64 copy of the *same rounded weights and
constants* (``cage_lens.core.precision.upcast_copy``: bfloat16 → float64 is exact) explains its own
top-1 token at the last position, and the bfloat16 model explains the same token along three paths:

- ``bfloat16``: ``attribute(...)`` as a user calls it;
- ``bf16, rules in float32``: the rules' ratios and products formed in float32 (the autograd pieces
  patched *in this script only*, a measurement of what such an option would buy);
- ``precision="float32"``: ``attribute(..., precision="float32")`` on an exact float32 copy.

Accuracy: Pearson correlation of token relevance with float64 (also without the first token, the
attention sink), relative L2 error ‖R − R₆₄‖/‖R₆₄‖, the relative error of the bfloat16 target logit,
and the relative L2 error of the bfloat16 logits vector of the explained position. Criteria: Pearson
≥ 0.999; the target-logit criterion (relevance error ≤ 1.5× the target logit's relative error: one
number, a lottery of a few roundings, docs/rules.md#precision); cage_lens's (relevance error ≤ 16 unit
roundoffs of bfloat16).
Time: process CPU seconds of one call after a warm-up call (``--threads``, default 1), the load
recorded (benchmarks/harness.py); memory: the case process's peak resident set.

    python benchmarks/bench_precision.py
    python benchmarks/bench_precision.py --cases qwen3-0.6b:4:256 --allow-busy     # smoke run

Writes ``benchmarks/results/bench_precision.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from harness import LoadWatch, add_arguments, environment_line, write_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "bench_precision.md"
#: name -> (family, random_model arguments, config overrides); real checkpoints' configurations
SHAPES = {
    "qwen3-0.6b": ("qwen3", dict(d_model=1024, n_heads=16, n_kv_heads=8, d_mlp=3072, d_vocab=151936),
                   dict(head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "gemma3-1b": ("gemma3", dict(d_model=1152, n_heads=4, n_kv_heads=1, d_mlp=6912, d_vocab=262144),
                  dict(head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=1e-6, sliding_window=512)),
    "olmo3-7b": ("olmo3", dict(d_model=4096, n_heads=32, n_kv_heads=32, d_mlp=11008, d_vocab=100278),
                 dict(rms_norm_eps=1e-6)),
}
DEFAULT_CASES = ["qwen3-0.6b:28:256", "qwen3-0.6b:4:2048", "gemma3-1b:13:256", "olmo3-7b:2:256:32000",
                 "olmo3-7b:2:2048:32000"]
RULES = ("attnlrp", "cplrp")
UNIT_ROUNDOFF_BF16 = 2.0**-8
PATHS = ("bfloat16", "bf16, rules in float32", 'precision="float32"')


def build(name: str, n_layers: int, n_ctx: int, vocab: int | None = None):
    """The shape at ``n_layers`` layers in bfloat16 (``vocab`` replaces the checkpoint's vocabulary)."""
    import torch

    from cage_lens.testing import random_model

    family, sizes, overrides = SHAPES[name]
    sizes, overrides = dict(sizes, d_vocab=vocab or sizes["d_vocab"]), dict(overrides)
    if family == "gemma3":  # Gemma-3's 5 local layers per global one
        overrides["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
    return random_model(family, n_layers=n_layers, n_ctx=n_ctx, dtype=torch.bfloat16, init_scale=0.02, **sizes, **overrides)


class RulesInFloat32:
    """The autograd pieces forming their ratios and products in float32 (this script only)."""

    def __enter__(self):
        import torch

        from cage_lens.core import autograd as A
        from cage_lens.core import realise as R

        f32 = torch.float32
        self.saved = [(A.ElementwiseIdentity, "backward", A.ElementwiseIdentity.backward),
                      (A.CenteredIdentity, "backward", A.CenteredIdentity.backward),
                      (A.GatedProduct, "forward", A.GatedProduct.forward),
                      (A.GatedProduct, "backward", A.GatedProduct.backward), (R, "safe_ratio", R.safe_ratio)]

        def elementwise_backward(ctx, grad):
            pre, post = ctx.saved_tensors
            return (grad.to(f32) * A.safe_ratio(post.to(f32), pre.to(f32)) * ctx.factor).to(grad.dtype), None, None

        def centred_backward(ctx, grad):
            x, post, bias = ctx.saved_tensors
            x, post = x.to(f32), post.to(f32)
            shifted = post if bias is None else post - bias.to(f32)
            scaled = grad.to(f32) * A.safe_ratio(shifted, x - x.mean(-1, keepdim=True))
            return (scaled - scaled.mean(-1, keepdim=True)).to(grad.dtype), None, None

        def gated_forward(ctx, gate, up, post, act, act_grad, gate_weight, up_weight):
            to_gate = up.to(f32) * act_grad.to(f32) * gate_weight if gate_weight else None
            to_up = act.to(f32) * up_weight if up_weight else None
            ctx.save_for_backward(to_gate, to_up)
            return post.view_as(post)

        def gated_backward(ctx, grad):
            to_gate, to_up = ctx.saved_tensors
            wide = grad.to(f32)
            return (None if to_gate is None else (wide * to_gate).to(grad.dtype),
                    None if to_up is None else (wide * to_up).to(grad.dtype), None, None, None, None, None)

        A.ElementwiseIdentity.backward = staticmethod(elementwise_backward)
        A.CenteredIdentity.backward = staticmethod(centred_backward)
        A.GatedProduct.forward = staticmethod(gated_forward)
        A.GatedProduct.backward = staticmethod(gated_backward)
        R.safe_ratio = lambda num, den: A.safe_ratio(num.to(f32), den.to(f32))
        return self

    def __exit__(self, *exc):
        for owner, name, value in self.saved:
            setattr(owner, name, staticmethod(value) if isinstance(owner, type) else value)


def _verdict(holds: bool) -> str:
    return "holds" if holds else "**fails**"


def _pearson(x, y) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def _peak_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 2**20
    return float("nan")


def worker(case: str, threads: int) -> dict:
    import warnings

    import torch

    import cage_lens
    from cage_lens.core.adapter import adapt
    from cage_lens.core.certificate import certify
    from cage_lens.core.precision import upcast_copy

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    name, n_layers, n_tokens, *vocab = case.split(":")
    n_layers, n_tokens, vocab = int(n_layers), int(n_tokens), int(vocab[0]) if vocab else SHAPES[name][1]["d_vocab"]
    tokens = torch.randint(10, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(n_tokens))
    tokens[0, 0] = 0  # <bos>
    out = {"case": case}

    model = build(name, n_layers, n_tokens, vocab)
    ref = upcast_copy(model, torch.float64)  # the same rounded weights and constants, in float64
    with torch.no_grad():
        logits64 = ref(tokens)[0, -1].double()
    target = int(logits64.argmax())
    reference = {}
    for rules in RULES:
        cpu = time.process_time()
        a = cage_lens.attribute(ref, tokens, target=target, rules=rules)
        reference[rules] = (a.token_relevance[0].double(), float(a.target_value[0]), time.process_time() - cpu)
    del ref, a
    gc.collect()

    cpu = time.process_time()
    cert = certify(adapt(model))
    out["certificate"] = dict(passed=cert.passed, worst=cert.worst, probe=cert.probe, limits=cert.limits,
                              cpu_s=time.process_time() - cpu, reason=cert.reason[:300])
    with torch.no_grad(), model.hooks(fwd_hooks=adapt(model).repairs()):  # OLMo's bfloat16 forward (docs/architectures.md)
        logits16 = model(tokens)[0, -1].double()
    out["logits_rel_l2"] = float((logits16 - logits64).norm() / logits64.norm())
    out["top1_agrees"] = int(logits16.argmax()) == target
    out["rows"] = []
    for rules in RULES:
        relevance64, value64, cpu64 = reference[rules]
        for path in PATHS:
            precision = "float32" if path.startswith("precision") else "model"

            def call():
                return cage_lens.attribute(model, tokens, target=target, rules=rules, precision=precision)

            if path.startswith("bf16, rules"):
                with RulesInFloat32():
                    call()
                    cpu = time.process_time()
                    a = call()
            else:
                call()
                cpu = time.process_time()
                a = call()
            seconds = time.process_time() - cpu
            relevance, value = a.token_relevance[0].double(), float(a.target_value[0])
            out["rows"].append(dict(
                rules=rules, path=path, pearson=_pearson(relevance, relevance64),
                pearson_no_bos=_pearson(relevance[1:], relevance64[1:]),
                rel_l2=float((relevance - relevance64).norm() / relevance64.norm()),
                target_rel_err=abs(value - value64) / abs(value64), cpu_s=seconds, cpu64_s=cpu64))
            del a
    out["peak_gb"] = _peak_gb()
    return out


def run(case: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--worker", case, str(threads)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="NAME:LAYERS:TOKENS[:VOCAB]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    from importlib.metadata import version

    command = "python benchmarks/bench_precision.py " + shlex.join(sys.argv[1:])
    watch = LoadWatch(own_threads=args.threads).start()
    results = []
    for case in args.cases:
        results.append(run(case, args.threads))
        print(json.dumps(results[-1]), flush=True)
    watch.stop()
    lines = [
        "# bfloat16 relevance against float64 on the same rounded weights",
        "",
        f"Generated by `{command.strip()}`: {environment_line(args.threads)}, transformer-lens "
        f"{version('transformer-lens')}. Cases `shape:layers:tokens` (random weights N(0, 0.02²) with the "
        "checkpoints' configurations; the docstring of `benchmarks/bench_precision.py` lists them). Target: the "
        "float64 model's top-1 token at the last position.",
        "",
        "## Certificate (default settings)",
        "",
        "| case | certified | probe | worst segment / allowed leak | CPU s | peak memory of the case GB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        c = r["certificate"]
        lines.append(f"| {r['case']} | {'yes' if c['passed'] else 'NO: ' + c['reason']} | {c['probe']} | "
                     f"{c['worst']:.3g} | {c['cpu_s']:.2f} | {r['peak_gb']:.1f} |")
    lines += [
        "",
        "## Token relevance",
        "",
        "Criteria: Pearson ≥ 0.999; the target-logit criterion — relevance error ≤ 1.5 × the relative error of the "
        "target logit; cage_lens's — relevance error ≤ 16 u, u the unit roundoff of bfloat16 (2⁻⁸; 16 u = 6.25 %) "
        "(docs/rules.md#precision says why). The relative L2 error of the bfloat16 logits vector at the explained "
        "position is shown for scale. CPU s: one call after a warm-up (`precision=\"float32\"`: the float32 "
        "copy included); float64 CPU s: the reference call (certificate included).",
        "",
        "| case | rules | path | Pearson | Pearson w/o BOS | rel. L2 error | target rel. error | logits rel. L2 error "
        "| Pearson ≥ 0.999 | error ÷ target error | ≤ 1.5 | error ÷ u | ≤ 16 | CPU s | CPU ÷ bfloat16 "
        "| float64 CPU s |",
        "|" + " --- |" * 16,
    ]
    for r in results:
        base = {row["rules"]: row["cpu_s"] for row in r["rows"] if row["path"] == "bfloat16"}
        for row in r["rows"]:
            by_target = row["rel_l2"] / max(row["target_rel_err"], 1e-30)
            in_u = row["rel_l2"] / UNIT_ROUNDOFF_BF16
            lines.append(
                f"| {r['case']} | {row['rules']} | {row['path']} | {row['pearson']:.6f} | {row['pearson_no_bos']:.6f} | "
                f"{row['rel_l2']:.2e} | {row['target_rel_err']:.2e} | {r['logits_rel_l2']:.2e} | "
                f"{_verdict(row['pearson'] >= 0.999)} | {by_target:.3g} | {_verdict(by_target <= 1.5)} | {in_u:.3g} | "
                f"{_verdict(in_u <= 16)} | {row['cpu_s']:.2f} | {row['cpu_s'] / base[row['rules']]:.2f} | "
                f"{row['cpu64_s']:.2f} |")
    print("\n".join(lines))
    write_results(args.out, "\n".join(lines), watch, args.allow_busy)


if __name__ == "__main__":
    main()
