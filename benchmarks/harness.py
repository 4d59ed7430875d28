"""What every benchmark shares: the machine's load recorded while it runs, and a results file written
only when the timings were taken on a machine that was not busier than its cores.

A benchmark on a shared machine measures the machine as much as the code. Each script here opens a
:class:`LoadWatch` before its first timed call and closes it after the last; the watch samples the
1-minute load average in a background thread. :func:`write_results` then

- puts the load at start and end (and the highest sample) into the results file's header, and
- refuses to write (one line on stderr, exit status 3) when the machine was busier than its cores
  during the run: a sampled load above ``cores + own_threads · slack``, or a load above ``cores`` at the
  start (the run's own threads count only once it runs).

``--allow-busy`` (every script has it through :func:`add_arguments`) writes the file anyway with a
warning line at its top, for a smoke run; such a file is never committed (``tests/test_benchmarks.py``
checks every committed results file for the warning).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LoadWatch", "add_arguments", "write_results", "elapsed", "environment_line", "BUSY_WARNING", "BusyMachine"]

#: first line of a results file written with ``--allow-busy``
BUSY_WARNING = "> **Taken on a busy machine (--allow-busy): timings are not comparable; do not commit.**"
#: exit status of a benchmark that refused to write its results
BUSY_EXIT = 3


class BusyMachine(SystemExit):
    """The machine was busier than its cores: the results are not written."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class LoadWatch:
    """Samples ``os.getloadavg()[0]`` every ``interval`` seconds between ``start()`` and ``stop()``.

    ``own_threads`` is how many cores the benchmark itself keeps busy (its torch threads); the 1-minute
    load average counts them too, so the limit while it runs is ``cores + slack`` with ``slack`` half a
    core (the average lags and rounds)."""

    own_threads: int = 1
    interval: float = 5.0
    slack: float = 0.5
    samples: list[float] = field(default_factory=list)
    start_load: float | None = None
    end_load: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, settle: float = 120.0) -> "LoadWatch":
        """Start sampling. The 1-minute average lags the machine by about a minute, so a benchmark started
        just after another process ended first waits (up to ``settle`` seconds) for it to fall to the
        number of cores; a machine still busier than its cores after that is recorded as such."""
        deadline = time.monotonic() + settle
        while os.getloadavg()[0] > cores() and time.monotonic() < deadline:
            time.sleep(min(self.interval, max(0.0, deadline - time.monotonic())))
        self.start_load = os.getloadavg()[0]
        self.samples = [self.start_load]
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> "LoadWatch":
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end_load = os.getloadavg()[0]
        self.samples.append(self.end_load)
        return self

    def __enter__(self) -> "LoadWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def peak(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def problem(self) -> str | None:
        """Why the run does not count, or None."""
        n = cores()
        if self.start_load is not None and self.start_load > n:
            return f"the 1-minute load average was {self.start_load:.2f} at the start, above the machine's {n} cores"
        limit = n + self.slack
        if self.peak > limit:
            return (f"the 1-minute load average reached {self.peak:.2f} during the run (limit {limit:.1f}: "
                    f"{n} cores, this benchmark's {self.own_threads} thread(s) included)")
        return None

    def header_line(self) -> str:
        return (f"Load average (1 min) at start {self.start_load:.2f}, at end {self.end_load:.2f}, highest "
                f"{self.peak:.2f} ({len(self.samples)} samples; {cores()} cores).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-busy", action="store_true",
                        help="write the results even when the machine was busier than its cores (smoke runs; "
                             "the file is marked and must not be committed)")


def environment_line(threads: int) -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {cores()} cores, torch {torch.__version__}, "
            f"{threads} torch thread(s), Python {platform.python_version()}")


def write_results(path: Path, text: str, watch: LoadWatch, allow_busy: bool = False) -> Path:
    """Write ``text`` to ``path`` with the load line after its first line (the title), or refuse."""
    problem = watch.problem()
    lines = text.rstrip("\n").split("\n")
    lines.insert(1, "\n" + watch.header_line())
    if problem is not None:
        if not allow_busy:
            print(f"{Path(sys.argv[0]).name}: not writing {path}: {problem}; rerun on a quiet machine "
                  "(or pass --allow-busy for a smoke run that is not committed)", file=sys.stderr)
            raise BusyMachine(BUSY_EXIT)
        lines.insert(0, BUSY_WARNING + f" ({problem})\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {path}" + (" (busy machine: not for committing)" if problem else ""))
    return path


def elapsed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """``(wall seconds, process CPU seconds, result)`` of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu, out
