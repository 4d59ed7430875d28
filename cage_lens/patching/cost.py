"""The cost unit of patching: forward-equivalents (docs/patching.md#cost).

One forward-equivalent (fe) is the arithmetic of one full forward pass of the patched batch. Work is
counted in multiply-adds × 2 (FLOPs) from the model's shape — projections, attention over the keys
each query row reads, MLP, unembedding — and divided by the FLOPs of that forward; a backward pass
counts 2 fe. Norms, activations, softmax and Python overhead are not counted, so fe measure
arithmetic, not wall time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cage_lens.core.adapter import Architecture

__all__ = ["layer_flops", "unembed_flops", "forward_flops", "key_reads", "Ledger"]


def layer_flops(arch: Architecture, rows: int, keys_read: int) -> float:
    """FLOPs of one transformer block for ``rows`` query rows that read ``keys_read`` keys in total
    (the sum over the rows of how many keys each attends to)."""
    d, h, dh, hkv = arch.d_model, arch.n_heads, arch.d_head, arch.n_kv_heads
    projections = 2 * d * (h * dh + 2 * hkv * dh) + 2 * h * dh * d
    mlp = 0 if arch.attn_only else 2 * d * (arch.d_mlp or 0) * (3 if arch.gated_mlp else 2)
    return rows * (projections + mlp) + 2 * 2 * h * dh * keys_read


def unembed_flops(arch: Architecture, rows: int) -> float:
    return 2.0 * arch.d_model * arch.d_vocab * rows


def key_reads(first: int, end: int) -> int:
    """Keys read by the causal query rows ``first .. end − 1`` (row ``i`` reads keys ``0 .. i``)."""
    return (end * (end + 1) - first * (first + 1)) // 2


def forward_flops(arch: Architecture, length: int, batch: int) -> float:
    """FLOPs of one forward pass of a ``[batch, length]`` token batch: the unit of every cost here."""
    return batch * (arch.n_layers * layer_flops(arch, length, key_reads(0, length)) + unembed_flops(arch, length))


@dataclass
class Ledger:
    """FLOPs spent per stage of one patching call, read out in forward-equivalents."""

    unit: float  # FLOPs of one forward of the patched batch
    flops: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, flops: float) -> None:
        self.flops[stage] = self.flops.get(stage, 0.0) + float(flops)

    def add_fe(self, stage: str, fe: float) -> None:
        self.add(stage, fe * self.unit)

    def fe(self) -> dict[str, float]:
        return {stage: value / self.unit for stage, value in self.flops.items()}

    @property
    def total(self) -> float:
        return sum(self.flops.values()) / self.unit
