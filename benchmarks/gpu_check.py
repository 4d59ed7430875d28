"""GPU check (< 5 minutes on one GPU): cage_lens on cuda gives the CPU's numbers, and how long it takes.

For each row — ``attribute`` in the default pass and in the long-context mode (whose recomputed blocks
run in the device's backward thread: docs/long_context.md#the-backward-in-another-thread), and a whole
cross-layer graph (``node_threshold=None``, long-context mode) — the same random model and tokens are
computed on the CPU and on cuda; the token relevance, every residual node's relevance and, for the
graph, the kept edges' values are compared (largest difference relative to the largest CPU value;
float32 rounding for float32 models, bfloat16 rounding for the Qwen3-0.6B-shaped bfloat16 model), and
both wall times are reported. The long-context attributions are also compared with the default pass on
each device. Models: GPT-2-small-sized (float32) and Qwen3-0.6B-sized (bfloat16, 8 of its 28 layers).

Without a GPU it runs the CPU part at reduced sizes and says that cuda was not available (exit status
0); the results file is written only when cuda ran:

    python benchmarks/gpu_check.py            # on a machine with a GPU -> results/gpu_check.md
    python benchmarks/gpu_check.py --quick    # reduced sizes (what a CPU-only run does anyway)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from harness import LoadWatch, add_arguments, environment_line, write_results

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
    short, long = (64, 256) if quick else (1024, 4096)
    return [("gpt2-small shape, float32", "attribute", long), ("gpt2-small shape, float32", "attribute lc", long),
            ("gpt2-small shape, float32", "whole graph lc", short),
            ("qwen3-0.6b shape (8 layers), bfloat16", "attribute lc", short)]


def _run(model, kind: str, tokens: torch.Tensor):
    import cage_lens

    if kind.startswith("attribute"):
        return cage_lens.attribute(model, tokens[None], target=7, strict=False, long_context=kind.endswith("lc"))
    return cage_lens.circuit_graph(model, tokens, target=7, levels="block", node_threshold=None, top_p=0.85,
                                   dense_limit=0, strict=False, long_context=True)


def _values(result) -> dict[str, torch.Tensor]:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_arguments(parser)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    quick = args.quick or not cuda
    torch.set_num_threads(args.threads)
    if not cuda:
        print("cuda: NOT available (torch.cuda.is_available() is False): running the CPU part only, at reduced "
              "sizes; nothing is compared with a GPU and no results file is written", flush=True)
    out = ["# GPU check: cuda against the CPU", "",
           f"Command: `python benchmarks/gpu_check.py{' --quick' if args.quick else ''}`; {environment_line(args.threads)}"
           + (f"; {torch.cuda.get_device_name()}" if cuda else "; cuda not available"), "",
           "| model | row | tokens | CPU s | lc vs default, CPU (rel.) | cuda s | cuda vs CPU (rel.) | "
           "lc vs default, cuda (rel.) | within |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(out[2:]), flush=True)
    watch = LoadWatch(own_threads=args.threads).start()
    models, failures = _models(quick), 0
    for name, kind, n_tokens in _rows(quick):
        model = models[name]()
        dtype = next(model.parameters()).dtype
        tokens = torch.randint(3, 90, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
        lc_attribution = kind.startswith("attribute") and kind.endswith("lc")

        def against_default(result) -> float | None:
            return _difference(_values(_run(model, "attribute", tokens)), _values(result)) if lc_attribution else None

        cpu_s, cpu_out = _timed(lambda: _run(model, kind, tokens))
        on_cpu = against_default(cpu_out)
        cells = [name, kind, str(n_tokens), f"{cpu_s:.1f}", "—" if on_cpu is None else f"{on_cpu:.1e}"]
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
        failures += not ok
        cells.append(("yes" if ok else f"NO (tolerance {TOLERANCE[dtype]:g})") + ("" if cuda else "; cuda not available"))
        out.append("| " + " | ".join(cells) + " |")
        print(out[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    watch.stop()
    if not cuda:
        print("cuda: NOT available — the CPU part ran (above); run this script on a machine with a GPU to check cuda")
        return 1 if failures else 0
    write_results(Path(__file__).resolve().parent / "results" / "gpu_check.md", "\n".join(out), watch, args.allow_busy)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
