"""What this machine lets the process use: CPU cores, memory."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def usable_cpu_count() -> int:
    """Physical cores among the CPUs this process may run on.

    Compute-bound inference gains nothing from a core's second hardware thread, which is
    why llama.cpp itself defaults to physical cores.
    """
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # macOS
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(len(cores), 1)


def peak_memory_bytes() -> int:
    """The largest resident set this process has had."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
