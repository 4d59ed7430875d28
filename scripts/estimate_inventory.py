"""Count what autograd keeps per layer for the backward of one attribution, by shape class: the table
``cage_lens.planning.SAVED`` of the estimate (docs/estimate.md#memory-model).

For each rule set, MLP kind (plain: GPT-2; gated: Llama with a head dimension that differs from
``d_model / heads``) and precision, a tiny random model of the installed TransformerLens line is
attributed with two and with three layers; every tensor autograd saves is recorded (weakly) and, when
the backward starts, the live ones are classified by shape — ``[head, T, T]`` (P), ``[T, d_mlp]`` (M),
``[T, d_model]`` (R), ``[T, heads·d_head]`` (A), ``[T, kv_heads·d_head]`` (K) — with the dimensions chosen
so that no two classes share a size. The difference of the two models is one layer; the counts are in
elements of the model's dtype (a float32 tensor of a bfloat16 model counts 2). Run once per TL venv:

    python scripts/estimate_inventory.py            # prints the rows of SAVED for this TL line

The causal-mask buffer HookedTransformer keeps per layer (``[n_ctx, n_ctx]``, part of the loaded model,
saved by reference) is left out.
"""

from __future__ import annotations

import weakref

import torch

import cage_lens
from cage_lens.core import engine
from cage_lens.loading import has_hooked_transformer
from cage_lens.testing import random_model

D, H, DH, HKV, M, T, N_CTX = 48, 4, 16, 2, 80, 24, 64


def _class(shape: tuple[int, ...]) -> str | None:
    if len(shape) >= 2 and shape[-1] == T and shape[-2] == T:
        return "P"
    last = shape[-1] if shape else 0
    heads = shape[-2] if len(shape) >= 2 else None
    if last == M:
        return "M"
    if last == D:
        return "R"
    if last == H * DH or (last == DH and heads == H) or (last == DH and len(shape) >= 3 and shape[-3] == H):
        return "A"
    if last == HKV * DH or (last == DH and heads == HKV) or (last == DH and len(shape) >= 3 and shape[-3] == HKV):
        return "K"
    return None


def live_saved(family: str, rules: str, dtype: torch.dtype, n_layers: int) -> dict[str, int]:
    """Bytes per shape class of the tensors autograd keeps when the backward of one attribution starts."""
    extra = {} if family == "gpt2" else {"n_kv_heads": HKV, "biases": False, "head_dim": DH}
    model = random_model(family, n_layers=n_layers, d_model=D, n_heads=H, d_mlp=M, d_vocab=100, n_ctx=N_CTX,
                         dtype=dtype, **extra)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    buffers = {b.untyped_storage().data_ptr() for b in model.buffers()}
    tokens = torch.randint(1, 100, (1, T), generator=torch.Generator().manual_seed(0))
    cage_lens.attribute(model, tokens, target=5, rules=rules, strict=False, long_context=False)
    refs, live = [], {}
    gradients = engine.gradients

    def snapshot(value, tensors):
        for ref in refs:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() not in parameters | buffers:
                live[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
        return gradients(value, tensors)

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    engine.gradients = snapshot
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cage_lens.attribute(model, tokens, target=5, rules=rules, strict=False, long_context=False)
    finally:
        engine.gradients = gradients
    out: dict[str, int] = {}
    for shape, nbytes in live.values():
        kind = _class(shape)
        if kind is not None:
            out[kind] = out.get(kind, 0) + nbytes
    return out


def per_layer(family: str, rules: str, dtype: torch.dtype) -> tuple[float, ...]:
    two, three = live_saved(family, rules, dtype, 2), live_saved(family, rules, dtype, 3)
    size = torch.finfo(dtype).bits // 8
    units = {"P": H * T * T, "M": T * M, "R": T * D, "A": T * H * DH, "K": T * HKV * DH}
    return tuple(round((three.get(k, 0) - two.get(k, 0)) / (units[k] * size), 2) for k in "PMRAK")


def main() -> None:
    torch.set_num_threads(1)
    line = "hooked" if has_hooked_transformer() else "bridge"
    for half in (False, True):
        for kind, family in (("plain", "gpt2"), ("gated", "llama")):
            for rules in ("attnlrp", "cplrp", "gxi"):
                counts = per_layer(family, rules, torch.bfloat16 if half else torch.float32)
                print(f'    ("{line}", "{kind}", "{rules}", {half}): {counts},')


if __name__ == "__main__":
    main()
