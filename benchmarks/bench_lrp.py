"""Cost of ``cage_lens.attribute(rules="attnlrp")`` against a bare TransformerLens gradient × input.

Model: a random GPT-2-small-sized model (12 layers, d_model 768, 12 heads, vocab 50257), float32, CPU.
Baseline ("bare TL G×I"): one hook on ``hook_embed`` that re-roots the embedding, one forward, one
``torch.autograd.grad`` of the target logit w.r.t. the embedding — the cheapest way to get token
relevance in plain TransformerLens. cage_lens additionally installs the AttnLRP rules and returns
relevance for every residual point, every head and the position embeddings, plus the conservation
report, from the same single backward pass.

Each (method, length) runs in a fresh subprocess so that peak RSS (``ru_maxrss``) is its own; the
reported memory is the peak RSS growth over the process's state right after building the model
(each process warms up its own method once, inside the measured window).

    python benchmarks/bench_lrp.py            # 128, 512, 1024 tokens
    python benchmarks/bench_lrp.py --lengths 128 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def build_model():
    import torch

    from cage_lens.testing import random_model

    torch.manual_seed(0)
    return random_model(
        "gpt2", n_layers=12, d_model=768, n_heads=12, d_vocab=50257, n_ctx=1024, dtype=torch.float32, init_scale=0.02
    )


def bare_gradient_x_input(model, tokens):
    import torch

    store = {}

    def root(t, hook):
        t = t.detach().requires_grad_(True)
        store["embed"] = t
        return t

    with model.hooks(fwd_hooks=[("hook_embed", root)]):
        logits = model(tokens)
    (grad,) = torch.autograd.grad(logits[0, -1, 42], store["embed"])
    return (store["embed"] * grad).sum(-1)


def cage_lens_attnlrp(model, tokens):
    import cage_lens

    return cage_lens.attribute(model, tokens, target=42, rules="attnlrp").token_relevance


def worker(method: str, length: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    model = build_model()
    fn = {"bare": bare_gradient_x_input, "attnlrp": cage_lens_attnlrp}[method]
    tokens = torch.randint(100, 50000, (1, length), generator=torch.Generator().manual_seed(length))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(model, tokens)  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(model, tokens)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"time_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "peak_mb": (peak - base_rss) / 1024}


def run(method: str, length: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, str(length), str(repeats)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, length, repeats = args.worker
        print(json.dumps(worker(method, int(length), int(repeats))))
        return
    print("GPT-2-small-sized random model, float32, CPU; median of", args.repeats, "runs after a warm-up")
    print("wall = elapsed seconds; cpu = process CPU seconds (robust when other jobs share the cores)")
    print(f"{'tokens':>6} | {'bare wall':>9} {'lrp wall':>9} {'ratio':>6} | {'bare cpu':>8} {'lrp cpu':>8} {'ratio':>6} | "
          f"{'bare peak MB':>12} {'lrp peak MB':>11} {'ratio':>6}")
    for length in args.lengths:
        bare = run("bare", length, args.repeats)
        ours = run("attnlrp", length, args.repeats)
        print(
            f"{length:>6} | {bare['time_s']:>9.3f} {ours['time_s']:>9.3f} {ours['time_s'] / bare['time_s']:>6.2f} | "
            f"{bare['cpu_s']:>8.3f} {ours['cpu_s']:>8.3f} {ours['cpu_s'] / bare['cpu_s']:>6.2f} | "
            f"{bare['peak_mb']:>12.0f} {ours['peak_mb']:>11.0f} {ours['peak_mb'] / max(bare['peak_mb'], 1):>6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
