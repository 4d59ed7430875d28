"""Cost of ``cage_lens.attribute`` (AttnLRP, CP-LRP) against bare TransformerLens gradient × input:
CPU time and peak memory, 128 to 4,096 tokens, on every TransformerLens line given.

Models: random GPT-2-small-sized models (12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257,
float32, CPU, weights N(0, 0.02²)) of the Llama shape (4 key/value heads, gated MLP, RMSNorm; the
default) and optionally the Qwen3 (q/k norms) and Gemma-2 (sandwich norms, soft-caps) shapes.

- **certificate**: the one-time completeness check of a model (first call on a fresh model).
- **bare G×I** (the baseline): one hook re-rooting ``hook_embed`` and one hook selecting the explained
  row just before the unembedding — the same single-row unembedding cage_lens does — one forward,
  one ``torch.autograd.grad`` of the target logit w.r.t. the embedding.
- **attnlrp** / **cplrp**: ``cage_lens.attribute(model, tokens, target=42, rules=...)``: the rules,
  relevance of every residual point, every head and the embeddings from one backward, the
  conservation report (certificate already cached).

Method. Each (line, shape, method, length) runs in a fresh subprocess. Memory is the peak resident
set growth over the loaded model (``VmHWM`` after ``/proc/self/clear_refs``, Linux), taken after a
warm-up call at the same length (outside the window: the first call builds caches and grows the
allocator's arenas) and with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc gives every freed tensor
back to the kernel at once and the resident set follows the live tensors (with glibc's adaptive
default, freed blocks are kept and the peak reflects allocation order: the ratio once reported as
1.55–2.03× was mostly that). Times are the median of ``--repeats`` calls (wall and process CPU time;
CPU time is the robust one on a shared machine). A length is skipped, and the file says so, when
bare gradient × input itself would not fit ``--max-gb`` (its peak extrapolated from the previous
lengths as ``a·T + b·T²``).

    python benchmarks/bench_lrp.py                                   # this interpreter's TL line
    python benchmarks/bench_lrp.py --pythons /path/tl4/bin/python /path/tl2/bin/python
    python benchmarks/bench_lrp.py --lengths 128 512 --repeats 1 --allow-busy   # smoke run

Writes ``benchmarks/results/bench_lrp.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import LoadWatch, add_arguments, environment_line, write_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "bench_lrp.md"
FAMILIES = ("llama", "qwen3", "gemma2")
METHODS = ("attnlrp", "cplrp")
#: glibc returns every freed block above this size to the kernel at once (see the module docstring)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def build_model(family: str):
    import torch

    from cage_lens.testing import random_model

    return random_model(family, n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_mlp=3072, d_vocab=50257,
                        n_ctx=4096, dtype=torch.float32, init_scale=0.02)


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


def cage_lens_attribute(rules: str):
    def call(model, tokens):
        import cage_lens

        return cage_lens.attribute(model, tokens, target=42, rules=rules).token_relevance
    return call


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
    from importlib.metadata import version

    import torch

    torch.set_num_threads(threads)
    line = f"TL {version('transformer-lens')}"
    model = build_model(family)
    from cage_lens.core.adapter import adapt
    from cage_lens.core.certificate import certify

    if method == "certificate":
        start, start_cpu = time.perf_counter(), time.process_time()
        cert = certify(adapt(model))
        return {"line": line, "time_s": time.perf_counter() - start, "cpu_s": time.process_time() - start_cpu,
                "passed": cert.passed}
    fn = bare_gradient_x_input if method == "bare" else cage_lens_attribute(method)
    tokens = torch.randint(100, 50000, (1, length), generator=torch.Generator().manual_seed(length))
    if method != "bare":
        certify(adapt(model))  # one-time cost, measured separately
    fn(model, tokens)  # warm-up, outside the memory window
    base_rss = _reset_peak_rss()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(model, tokens)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"line": line, "time_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "peak_mb": _rss_mb("VmHWM") - base_rss}


def run(python: str, family: str, method: str, length: int, repeats: int, threads: int) -> dict:
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [python, __file__, "--worker", family, method, str(length), str(repeats), str(threads)],
        capture_output=True, text=True, check=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tl_version(python: str) -> str:
    code = "from importlib.metadata import version; print(version('transformer-lens'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def _predicted_mb(measured: list[tuple[int, float]], length: int) -> float:
    """Peak of bare gradient × input at ``length`` from the last measured ones: ``a·T + b·T²`` through
    the last two (activations grow linearly, attention patterns quadratically), or ``b·T²`` from one."""
    if len(measured) == 1:
        (t0, m0), = measured
        return m0 * (length / t0) ** 2
    (t0, m0), (t1, m1) = measured[-2:]
    b = (m1 / t1 - m0 / t0) / (t1 - t0)
    a = m0 / t0 - b * t0
    return max(a * length + b * length**2, m1 * length / t1)


def _ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / max(b[key], 1e-9):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--families", nargs="+", default=["llama"], choices=FAMILIES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--pythons", nargs="+", default=[sys.executable],
                        help="interpreters to run the workers with, one per TransformerLens line")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-gb", type=float, default=12.0,
                        help="skip a length when bare gradient × input would need more than this")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        family, method, length, repeats, threads = args.worker
        print(json.dumps(worker(family, method, int(length), int(repeats), int(threads))))
        return

    # interpreters by their TL line, not by a path of this machine
    shown = [f"<TL {_tl_version(a)} python>" if a in args.pythons else a for a in sys.argv[1:]]
    command = "python benchmarks/bench_lrp.py " + shlex.join(shown)
    lines = [
        "# attribute() vs bare gradient × input: time and peak memory",
        "",
        f"Generated by `{command.strip()}`: {environment_line(args.threads)}. GPT-2-small-sized random models "
        "(12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257, float32, weights N(0, 0.02²)); both methods "
        "unembed only the explained row. Peak = resident-set growth over the loaded model after a warm-up call, "
        "glibc returning freed memory at once (`MALLOC_MMAP_THRESHOLD_=65536`); times are the median of "
        f"{args.repeats} call(s). Ratios are attribute / bare (≤ 1.25 memory and ≤ 1.1 CPU time is the target). "
        "Method: the docstring of `benchmarks/bench_lrp.py`.",
        "",
    ]
    header = ["line", "shape", "tokens", "bare CPU s", "bare MB"]
    for m in args.methods:
        header += [f"{m} CPU s", f"{m} MB", f"{m} CPU ratio", f"{m} memory ratio"]
    header += ["bare wall s"] + [f"{m} wall ratio" for m in args.methods]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    print("\n".join(lines), flush=True)
    notes, certificates = [], []
    watch = LoadWatch(own_threads=args.threads).start()
    for python in args.pythons:
        for family in args.families:
            cert = run(python, family, "certificate", 0, 1, args.threads)
            certificates.append(f"{cert['line']} {family}: {cert['cpu_s']:.2f} s CPU ({cert['time_s']:.2f} s wall)")
            measured: list[tuple[int, float]] = []
            for length in args.lengths:
                if measured:
                    need_gb = _predicted_mb(measured, length) / 1024
                    if need_gb > args.max_gb:
                        notes.append(f"{cert['line']} {family}, {length} tokens: not run — bare gradient × input "
                                     f"would need ≈ {need_gb:.1f} GB (> --max-gb {args.max_gb:g}).")
                        continue
                bare = run(python, family, "bare", length, args.repeats, args.threads)
                ours = {m: run(python, family, m, length, args.repeats, args.threads) for m in args.methods}
                measured.append((length, bare["peak_mb"]))
                cells = [bare["line"], family, str(length), f"{bare['cpu_s']:.2f}", f"{bare['peak_mb']:.0f}"]
                for m in args.methods:
                    cells += [f"{ours[m]['cpu_s']:.2f}", f"{ours[m]['peak_mb']:.0f}", _ratio(ours[m], bare, "cpu_s"),
                              _ratio(ours[m], bare, "peak_mb")]
                cells += [f"{bare['time_s']:.2f}"] + [_ratio(ours[m], bare, "time_s") for m in args.methods]
                row = "| " + " | ".join(cells) + " |"
                lines.append(row)
                print(row, flush=True)
    lines += ["", "Certificate (one-time per model): " + "; ".join(certificates) + "."]
    if notes:
        lines += [""] + notes
    print("\n".join(lines[-1 - len(notes):]))
    write_results(args.out, "\n".join(lines), watch.stop(), args.allow_busy)


if __name__ == "__main__":
    main()
