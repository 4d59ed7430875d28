"""Cost of ``cage_lens.attribute(rules="attnlrp")`` against bare TransformerLens gradient × input.

Models: random GPT-2-small-sized models (12 layers, d_model 768, 12 heads, vocab 50257, float32, CPU)
of the Llama, Qwen3 and Gemma-2 shapes (cage_lens.testing.random_model; Llama with 4 key/value
heads, Qwen3 with q/k norms, Gemma-2 with sandwich norms and soft-caps).

- **certificate**: the one-time completeness check of a model (first call on a fresh model).
- **bare G×I** (the baseline): one hook re-rooting ``hook_embed`` and one hook selecting the explained
  row just before the unembedding — the same single-row unembedding cage_lens does — one forward,
  one ``torch.autograd.grad`` of the target logit w.r.t. the embedding.
- **attnlrp**: ``cage_lens.attribute(model, tokens, target=42)``: the rules, relevance of every
  residual point, every head and the embeddings from the same single backward, the conservation
  report (certificate already cached).

Each (family, method, length) runs in a fresh subprocess; timings are the median of ``--repeats``
calls after a warm-up (wall and process CPU time). Memory is the peak resident set growth over the
warm-up and timed calls (Linux: the peak is reset after the model is built, ``/proc/self/clear_refs``). On a
shared machine use ``--threads 1``: idle OpenMP threads spin and inflate CPU time. One command
regenerates ``benchmarks/results/bench_lrp.md``:

    python benchmarks/bench_lrp.py                      # 128 and 512 tokens, all three shapes, 2 threads
    python benchmarks/bench_lrp.py --lengths 128 --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import LoadWatch, add_arguments, write_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "bench_lrp.md"
FAMILIES = ("llama", "qwen3", "gemma2")


def build_model(family: str):
    import torch

    from cage_lens.testing import random_model

    return random_model(family, n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_mlp=3072, d_vocab=50257,
                        n_ctx=1024, dtype=torch.float32, init_scale=0.02)


def bare_gradient_x_input(model, tokens):
    """Plain TL: re-root the embedding, unembed only the last row, one backward."""
    import torch

    store = {}

    def root(t, hook):
        t = t.detach().requires_grad_(True)
        store["embed"] = t
        return t

    def last_row(t, hook):
        return t[:, -1:].contiguous()

    embed = "embed.hook_out" if "embed.hook_out" in model.hook_dict else "hook_embed"
    final = "unembed.hook_in" if "unembed.hook_in" in model.hook_dict else "ln_final.hook_normalized"
    with model.hooks(fwd_hooks=[(embed, root), (final, last_row)]):
        logits = model(tokens)
    (grad,) = torch.autograd.grad(logits[0, -1, 42], store["embed"])
    return (store["embed"] * grad).sum(-1)


def cage_lens_attnlrp(model, tokens):
    import cage_lens

    return cage_lens.attribute(model, tokens, target=42, rules="attnlrp").token_relevance


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> float:
    """Reset the peak RSS (Linux ≥ 4.0) and return the current RSS in MB."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss_mb("VmRSS")


def worker(family: str, method: str, length: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model = build_model(family)
    if method == "certificate":
        from cage_lens.core.adapter import adapt
        from cage_lens.core.certificate import certify

        start, start_cpu = time.perf_counter(), time.process_time()
        cert = certify(adapt(model))
        return {"time_s": time.perf_counter() - start, "cpu_s": time.process_time() - start_cpu,
                "passed": cert.passed, "error": cert.max_error}
    fn = {"bare": bare_gradient_x_input, "attnlrp": cage_lens_attnlrp}[method]
    tokens = torch.randint(100, 50000, (1, length), generator=torch.Generator().manual_seed(length))
    if method == "attnlrp":
        from cage_lens.core.adapter import adapt
        from cage_lens.core.certificate import certify

        certify(adapt(model))  # one-time cost, measured separately
    base_rss = _reset_peak_rss()
    fn(model, tokens)  # warm-up (inside the memory window: the allocator keeps what it frees)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(model, tokens)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"time_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "peak_mb": _rss_mb("VmHWM") - base_rss}


def run(family: str, method: str, length: int, repeats: int, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", family, method, str(length), str(repeats), str(threads)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        family, method, length, repeats, threads = args.worker
        print(json.dumps(worker(family, method, int(length), int(repeats), int(threads))))
        return
    from importlib.metadata import version

    import torch

    lines = [
        "# attribute(rules=\"attnlrp\") vs bare gradient × input",
        "",
        f"Command: `python benchmarks/bench_lrp.py --lengths {' '.join(map(str, args.lengths))} --repeats {args.repeats} "
        f"--threads {args.threads}`. "
        f"transformer-lens {version('transformer-lens')}, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), float32; "
        "GPT-2-small-sized random models (12 layers, d_model 768, 12 heads, vocab 50257). Both methods unembed "
        "only the explained row. Ratios are attnlrp / bare; median of the repeats after a warm-up. Timings on a "
        "shared machine are indicative; the CPU-time ratio is the robust one.",
        "",
        "| shape | certificate (one-time) s | tokens | bare wall s | attnlrp wall s | wall ratio | bare cpu s | "
        "attnlrp cpu s | cpu ratio | bare peak MB | attnlrp peak MB | memory ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)
    watch = LoadWatch(own_threads=args.threads).start()
    for family in args.families:
        cert = run(family, "certificate", 0, 1, args.threads)
        for length in args.lengths:
            bare = run(family, "bare", length, args.repeats, args.threads)
            ours = run(family, "attnlrp", length, args.repeats, args.threads)
            row = (
                f"| {family} | {cert['time_s']:.2f} | {length} | {bare['time_s']:.3f} | {ours['time_s']:.3f} | "
                f"{ours['time_s'] / bare['time_s']:.2f} | {bare['cpu_s']:.3f} | {ours['cpu_s']:.3f} | "
                f"{ours['cpu_s'] / bare['cpu_s']:.2f} | {bare['peak_mb']:.0f} | {ours['peak_mb']:.0f} | "
                f"{ours['peak_mb'] / max(bare['peak_mb'], 1):.2f} |"
            )
            lines.append(row)
            print(row, flush=True)
    write_results(OUT, "\n".join(lines), watch.stop(), args.allow_busy)


if __name__ == "__main__":
    main()
