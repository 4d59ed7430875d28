"""What the long-context benchmarks share: one measurement per fresh process, its peak memory and time.

:func:`measured` runs one call and returns its wall and CPU seconds and its peak resident memory: the
growth over the resident memory just before the call (``VmHWM`` after ``/proc/self/clear_refs``,
Linux) and the process's whole peak. :func:`child` runs a benchmark's ``--child`` in a new process
with glibc told to return freed tensors at once (``MALLOC_MMAP_THRESHOLD_``), so that resident
memory follows the live tensors instead of the allocator's history, and with ``CAGE_LENS_MAX_MEMORY``
— the memory the automatic long-context choice plans for — set for every child alike. That allocator
setting costs time where a computation allocates anew in a loop (docs/estimate.md#the-allocator), so
a child may also run under glibc's default (``allocator_setting=False``) for its seconds alone.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

__all__ = ["measured", "child", "resident", "CHILD_ENV"]

#: environment of every measured child
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def resident(field: str = "VmRSS") -> float:
    """Bytes of ``field`` (``VmRSS``, ``VmHWM``) of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measured(fn, *args, **kwargs) -> tuple[dict, object]:
    """``({wall_s, cpu_s, peak_gb, process_peak_gb}, result)`` of one call."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # reset the high-water mark to the current resident memory
    base = resident()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    stats = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
             "peak_gb": (resident("VmHWM") - base) / 2**30, "process_peak_gb": resident("VmHWM") / 2**30}
    return stats, out


def child(script: str, args: list[str], memory: str | None = None, timeout: float | None = None,
          allocator_setting: bool = True) -> dict:
    """Run ``script --child ARGS`` in a new process (with :data:`CHILD_ENV` unless ``allocator_setting`` is
    false); its last stdout line is a JSON object. A failed child gives ``{"error": its last stderr line}``."""
    env = dict(os.environ)
    for key, value in CHILD_ENV.items():
        if allocator_setting:
            env[key] = value
        else:
            env.pop(key, None)
    if memory:
        env["CAGE_LENS_MAX_MEMORY"] = memory
    try:
        out = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True,
                             env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {timeout:.0f} s"}
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        if out.returncode < 0:   # a signal leaves no line of its own (SIGKILL: the kernel's out-of-memory killer, or a user)
            return {"error": f"killed by signal {-out.returncode}" + (f" after: {lines[-1][:200]}" if lines else "")}
        return {"error": lines[-1][:300] if lines else f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])
