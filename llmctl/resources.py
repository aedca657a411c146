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


MEMORY_LIMIT_ENV = "LLMCTL_MEMORY_LIMIT"
_SCALE = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "8G", "512MB", "1.5GiB". K, M, G, T are powers of 1000, as
    llmctl prints sizes (and as the Hub and Ollama do); Ki, Mi, Gi, Ti are powers of 1024.
    ValueError when unreadable."""
    import re

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)b?|b)?\s*", text.lower())
    if not found:
        raise ValueError(f"'{text}' is not a size")
    base = 1024 if found[3] else 1000
    return round(float(found[1]) * base ** _SCALE[found[2] or ""])


def usable_memory_bytes() -> int | None:
    """The memory this process may use: LLMCTL_MEMORY_LIMIT when set, else the machine's
    RAM capped by the cgroup's limit (a container's RAM is its limit, not the host's).

    Total, not currently free: what fits should not change with what else is running.
    None when nothing can be found out (then nothing is refused on memory grounds).
    Raises UsageError for an unreadable LLMCTL_MEMORY_LIMIT.
    """
    configured = os.environ.get(MEMORY_LIMIT_ENV)
    if configured:
        try:
            return parse_size(configured)
        except ValueError:
            from llmctl.errors import UsageError

            raise UsageError(f"{MEMORY_LIMIT_ENV}={configured!r} is not a size",
                             hint="use bytes or a number with K, M, G or T, e.g. 8G") from None
    amounts = [a for a in (_physical_memory(), _cgroup_limit()) if a]
    return min(amounts) if amounts else None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows, or a platform without them
        return None


def _cgroup_limit() -> int | None:
    """The tightest memory limit of this process's cgroup and its parents (v2 `memory.max`,
    or v1 `memory.limit_in_bytes`); None when unlimited or not on Linux. A few small reads."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: the unified hierarchy, limits nest down the path
            base = Path("/sys/fs/cgroup")
            names = ["memory.max"]
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            names = ["memory.limit_in_bytes"]
        else:
            continue
        # Inside a cgroup namespace the path is relative to a root that is mounted at
        # `base` itself: try the path, then each parent, down to `base`.
        folder = base / path.lstrip("/")
        for candidate in (folder, *folder.parents):
            if not candidate.is_relative_to(base):
                break
            for name in names:
                try:
                    value = (candidate / name).read_text().strip()
                except OSError:
                    continue
                if value.isdigit():
                    limits.append(int(value))
    # v1 writes "unlimited" as a huge number (2^63 rounded to pages): min() ignores it.
    return min(limits) if limits else None
