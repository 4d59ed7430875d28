"""Free memory on a device, read without importing torch for the CPU (the planner, ``cage_lens.estimate``
on a configuration, must not import it); the plans and the certificate's float32 copy both read it."""

from __future__ import annotations

import os

__all__ = ["free_bytes"]


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
