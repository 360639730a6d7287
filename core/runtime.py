"""Process-level settings that make CPU training faster, applied where a run is built.

``tune_cpu_allocator`` keeps freed memory inside the process. A training step allocates and
frees hundreds of multi-megabyte activations; by default glibc hands blocks above its mmap
threshold back to the kernel and page-faults them in again on the next step (the step
benchmark measured ~10^5 minor faults per step and 6% of a step's time on this). The
setting is process-wide and only changes when memory is returned, never how much a step
needs; ``run.tune_allocator = false`` leaves glibc as it is.

Contended CPUs. torch's CPU ops run on an OpenMP team (libgomp in the PyPI wheels). By
default a libgomp thread that reaches a barrier first *spins* (GOMP_SPINCOUNT = 300,000
iterations, milliseconds) before it sleeps, and a training step passes thousands of
barriers. When another process holds one of the cores, the spinning thread burns the time
slice its partner needs: next to one busy process a 2-thread step on 2 cores took 3.4-5.6x
the 1-thread time, and 26x under heavier load (``benchmarks/contention.py`` measured each
choice below; numbers in ``benchmarks/RESULTS.md``):

- ``default_threads`` (``run.threads = 0``) lowers torch's thread count to the cores that
  other processes leave free, measured once per process from ``/proc/stat``: the fix (next
  to one busy process: as fast as 1 thread). No wait policy made 2 threads as fast as 1
  there, not even a passive one (1.2x). Once per process, so the runs of one process use
  the same count (results depend on it bit-wise);
- ``shorten_spin_wait`` sets ``GOMP_SPINCOUNT=10000`` unless the user chose a wait policy:
  as fast as libgomp's default on a quiet machine, and 2.2x instead of 5.6x the 1-thread
  time when other work starts after the thread count was chosen. ``OMP_WAIT_POLICY=PASSIVE``
  cost 60% on a quiet machine (every barrier wakes a sleeping thread, costly on this VM).
  libgomp reads the setting once, when torch loads it, so the package's ``__init__`` calls
  this before anything imports torch.

This module imports nothing heavy: it runs before torch is imported.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import NamedTuple

WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # a user's choice of any of them is kept
SPIN_COUNT = 10_000  # libgomp's busy-wait iterations before a waiting thread sleeps (its default: 300,000)


def shorten_spin_wait(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``GOMP_SPINCOUNT`` to ``SPIN_COUNT`` unless one of ``WAIT_POLICY_VARS`` is set or
    torch is already imported (its OpenMP runtime has then read the environment: setting it
    now would claim a setting the process does not have). Returns True when it set it."""
    if any(var in environ for var in WAIT_POLICY_VARS) or "torch" in sys.modules:
        return False
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True


# ----------------------------------------------------------------------------- the load of other processes


class CpuMark(NamedTuple):
    """CPU seconds spent on this process's CPUs (by all processes) and by this process with
    its finished children (a tokenizer's helper program is not "another process"), at ``wall``."""

    busy: float
    own: float
    wall: float


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_mark(cpus: list[int] | None = None, stat: Path = Path("/proc/stat")) -> CpuMark | None:
    """A snapshot of ``stat`` (Linux) for ``cpus``; ``None`` where there is none."""
    wanted = {f"cpu{c}" for c in (usable_cpus() if cpus is None else cpus)}
    try:
        lines = stat.read_text().splitlines()
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    ticks = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:  # user nice system idle iowait irq softirq steal ...
            ticks += sum(int(x) for x in fields[1:4]) + sum(int(x) for x in fields[6:9])
    return CpuMark(busy=ticks / hz, own=sum(os.times()[:4]), wall=time.monotonic())


def other_cores(start: CpuMark, end: CpuMark) -> float:
    """Cores that other processes kept busy between two marks, on average."""
    wall = end.wall - start.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((end.busy - start.busy) - (end.own - start.own)) / wall)


_IMPORTED = cpu_mark()  # the window from here to the first run covers torch's import: no waiting then


def busy_elsewhere(*, window: float = 0.2, max_age: float = 10.0) -> float | None:
    """Cores other processes keep busy now: over the time since this module was imported
    when that is between ``window`` and ``max_age`` seconds ago, else over a fresh
    ``window`` (it sleeps). ``None`` where ``/proc/stat`` does not exist."""
    start = _IMPORTED
    if start is None or not window <= time.monotonic() - start.wall <= max_age:
        start = cpu_mark()
        if start is None:
            return None
        time.sleep(window)
    end = cpu_mark()
    return None if end is None else other_cores(start, end)


def threads_for(current: int, cpus: int, other: float) -> int:
    """Threads to train on: ``current`` (torch's count), or fewer when other processes keep
    cores busy: the free cores rounded to nearest, at least 1. Never more than ``current``."""
    return max(1, min(current, math.floor(cpus - other + 0.5)))


_cap: list[int] = []  # the free cores, measured once per process


def default_threads(current: int) -> int:
    """What ``run.threads = 0`` means: ``threads_for(current, ...)`` with the load measured
    by the first call in this process (later calls reuse it, so the runs of one process
    agree). ``current`` where the load cannot be measured."""
    if not _cap:
        other = busy_elsewhere()
        cpus = len(usable_cpus())
        _cap.append(cpus if other is None else threads_for(cpus, cpus, other))
    return min(current, _cap[0])


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds (``mallopt``). Returns False where that does
    not apply (not Linux, no glibc) or glibc refused a setting."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1)
