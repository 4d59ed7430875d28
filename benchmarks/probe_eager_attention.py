"""Probe (a GPU lease's scratch script, kept as it ran; only this docstring was rewritten): what the
attention's backward holds at the peak of ``attribute`` on cuda, against ``cage_lens.estimate``.

Random models of Qwen3-0.6B's shape (16/8 heads; 32/8 after) in bfloat16 with 2 and 4 layers, 4,096 and
8,192 tokens; ``attribute`` in the long-context pass (with a GPU's chunk budget the attention stays eager)
and the default pass; the peak of cuda memory above the loaded model, the estimate and its parts, and the
float32 patterns an eager attention must hold to explain the peak. For 2 layers at 8,192 tokens it replays
the caching allocator's trace and lists the largest blocks alive at the peak. Run from the repository's
root on a machine with a GPU (a CPU run only exercises the code at toy sizes):

    python benchmarks/probe_eager_attention.py

The H200 run's output is ``benchmarks/results/raw/gpu_eager_probe.log`` (it stopped at its 130 s limit
before the 32-head models); docs/estimate.md#on-an-accelerator reads it."""
import sys, time, pickle
sys.path.insert(0, "benchmarks")
import torch
import cage_lens
from cage_lens import planning
from cage_lens.core import memory
from cage_lens.testing import random_model

dev = "cuda" if torch.cuda.is_available() else "cpu"
small = dev == "cpu"


def model_of(L, heads=16, kv=8, d=1024, mlp=3072):
    return random_model("qwen3", n_layers=L, d_model=d, n_heads=heads, n_kv_heads=kv, d_mlp=mlp,
                        d_vocab=151936 if not small else 1000, n_ctx=16384, dtype=torch.bfloat16,
                        init_scale=0.02, biases=False, head_dim=128 if not small else 32).to(dev)


def peak_of(fn):
    if dev == "cpu":
        t = time.perf_counter(); fn(); return time.perf_counter() - t, float("nan")
    torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated(); t = time.perf_counter()
    out = fn(); torch.cuda.synchronize(); s = time.perf_counter() - t
    del out
    return s, (torch.cuda.max_memory_allocated() - base)


def live_at_peak(fn, top=14):
    """Replays the allocator's trace of ``fn`` and prints the largest blocks alive at its peak."""
    if dev == "cpu":
        fn(); return
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    fn(); torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][0]
    live, cur, best, best_live = {}, 0, -1, {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e; cur += e["size"]
            if cur > best:
                best, best_live = cur, dict(live)
        elif e["action"] in ("free_requested",):
            if e["addr"] in live:
                cur -= live.pop(e["addr"])["size"]
    print(f"  trace peak {best / 2**30:.2f} GB above the trace's start, {len(best_live)} blocks", flush=True)
    blocks = sorted(best_live.values(), key=lambda e: -e["size"])[:top]
    for b in blocks:
        frames = [f for f in b.get("frames", []) if any(k in f["filename"] for k in ("cage_lens", "transformers", "transformer_lens", "torch/autograd", "torch/nn/functional"))]
        where = " <- ".join(f"{f['filename'].split('/')[-1]}:{f['line']}:{f['name']}" for f in frames[:4])
        print(f"  {b['size'] / 2**30:7.3f} GB  {where}", flush=True)


print(torch.cuda.get_device_name() if dev == "cuda" else "cpu", flush=True)
cases = [(2, 8192), (4, 8192), (2, 4096), (4, 4096)] if not small else [(2, 256)]
for heads, kv in ((16, 8), (32, 8)):
    for L, T in cases:
        if heads == 32 and T == 8192 and L == 4:
            continue
        m = model_of(L, heads, kv)
        tok = torch.randint(3, 1000, (1, T), generator=torch.Generator().manual_seed(0)).to(dev)
        cage_lens.attribute(m, tok[:, :16], target=5, strict=False)
        avail = memory.available_memory(dev)
        for lc in (True, False):
            try:
                s, peak = peak_of(lambda: cage_lens.attribute(m, tok, target=5, strict=False, long_context=lc))
            except torch.OutOfMemoryError:
                print(f"heads {heads} L {L} T {T} lc {lc}: OOM", flush=True); torch.cuda.empty_cache(); continue
            est = cage_lens.estimate(m, T, "attribute", long_context=lc, available_bytes=avail, device=dev)
            att = est.parts.get("attention", 0.0)
            pattern = 4 * heads * T * T
            implied = (peak - (est.peak_bytes - att)) / pattern if lc else float("nan")
            budget = memory.attention_budget(dev, avail)
            chunked = 16 * heads * T * T > 8 * budget
            print(f"heads {heads} L {L} T {T} lc {lc}: {s:.2f} s peak {peak / 2**30:.2f} GB est {est.peak_bytes / 2**30:.2f} "
                  f"(att {att / 2**30:.2f}, chunked {chunked}, budget {budget / 2**30:.2f} GB) est/meas {est.peak_bytes / peak:.3f} "
                  f"implied eager patterns {implied:.2f}; parts " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in est.parts.items()),
                  flush=True)
        if (L, T) == (2, 8192) or small:
            print(f"live at the peak, heads {heads} L {L} T {T} lc:", flush=True)
            live_at_peak(lambda: cage_lens.attribute(m, tok, target=5, strict=False, long_context=True))
        del m
        if dev == "cuda":
            torch.cuda.empty_cache()
