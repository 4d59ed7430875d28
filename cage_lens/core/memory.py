"""Free memory on a device, read without importing torch for the CPU (the planner, ``cage_lens.estimate``
on a configuration, must not import it); the plans and the certificate's float32 copy both read it. And
the row-chunked attention's budget on a device and when an attention is chunked, which the long-context
mode uses and the planner counts."""

from __future__ import annotations

import os

from cage_lens.errors import InputError

__all__ = ["free_bytes", "available_memory", "attention_budget", "is_accelerator", "CPU_ATTENTION_BUDGET",
           "EAGER_MULTIPLE", "ROW_CHUNK_ENTRY_BYTES", "causal_key_extent"]

#: bytes of one chunk's ``[…, rows, key]`` intermediates of the row-chunked attention on the CPU
CPU_ATTENTION_BUDGET = 128 * 2**20
#: on an accelerator a chunk's kernels and Python round trip cost about fixed time, so chunks are larger
#: there: the memory available over this divisor, at least the CPU's budget and at most
#: :data:`ACCELERATOR_ATTENTION_BUDGET` (docs/long_context.md#the-chunk-budget)
ACCELERATOR_BUDGET_DIVISOR = 32
ACCELERATOR_ATTENTION_BUDGET = 4 * 2**30
#: bytes per ``[…, rows, key]`` entry alive in one chunk's backward: four float32 tensors (the pattern, its
#: gradient, the scores' gradient, a mask); chunks and a layer's eager backward are both counted in them
ROW_CHUNK_ENTRY_BYTES = 4 * 4
#: an attention whose eager backward holds at most this many budgets is computed eagerly: row
#: chunks cost a third more time, and one layer's pattern is small
EAGER_MULTIPLE = 8
#: a causal row chunk's backward reads its keys up to its last row rounded up to a multiple of
#: ``T / CAUSAL_KEY_STEPS``: a few distinct shapes, so that freed blocks and oneDNN's cached kernels serve
#: the next chunk (a new shape per chunk grew the peak; docs/long_context.md#causal-chunks)
CAUSAL_KEY_STEPS = 8


def causal_key_extent(stop: int, n_keys: int) -> int:
    """The keys a row chunk ending at row ``stop`` reads in its backward when every later key is masked:
    ``stop`` rounded up to the grid of :data:`CAUSAL_KEY_STEPS` (any extent from ``stop`` on is exact)."""
    step = -(-n_keys // CAUSAL_KEY_STEPS)
    return min(n_keys, -(-stop // step) * step)


def free_bytes(device) -> float | None:
    """Free memory on ``device`` (a ``torch.device`` or its name): on CUDA the driver's free memory and the
    blocks torch's caching allocator holds unused (it hands them out again before asking the driver); on
    the CPU the kernel's ``MemAvailable``; ``None`` when it cannot be read."""
    name = str(device)
    if name.startswith("cuda"):
        import torch

        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return float(torch.cuda.mem_get_info(device)[0] + cached)
    if name != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device: str = "cpu") -> float | None:
    """Bytes the process may still use: ``CAGE_LENS_MAX_MEMORY`` (e.g. ``12G``) when set, else
    :func:`free_bytes` of the device; ``None`` when unknown."""
    limit = os.environ.get("CAGE_LENS_MAX_MEMORY")
    return _parse_bytes(limit) if limit else free_bytes(device)


def _parse_bytes(text: str) -> float:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        return float(value[: len(value) - len(unit)]) * units[unit]
    except ValueError:
        raise InputError(f"CAGE_LENS_MAX_MEMORY={text!r} is not a size such as 12G or 800M") from None


def is_accelerator(device) -> bool:
    """Whether ``device`` (a ``torch.device`` or its name) is other than the CPU."""
    return not str(device).startswith("cpu")


def attention_budget(device, available: float | None, cpu_budget: int = CPU_ATTENTION_BUDGET) -> int:
    """Bytes of one chunk of the row-chunked attention on ``device`` with ``available`` bytes free:
    ``cpu_budget`` on the CPU (larger chunks were slower there) and where the memory is unknown; on an
    accelerator ``available / ACCELERATOR_BUDGET_DIVISOR`` between ``cpu_budget`` and
    ``ACCELERATOR_ATTENTION_BUDGET``."""
    if not is_accelerator(device) or not available:
        return cpu_budget
    return int(min(ACCELERATOR_ATTENTION_BUDGET, max(cpu_budget, available / ACCELERATOR_BUDGET_DIVISOR)))
