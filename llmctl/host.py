"""The machine llmctl runs on: the CPUs and the memory this process may use, and how
much of them other processes leave free."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmctl.units import parse_size

# -- CPUs ----------------------------------------------------------------------------------

# ggml's GGML_MAX_N_THREADS: llama.cpp refuses (asserts on) more threads than this.
MAX_THREADS = 512
# Another process counts as holding a CPU from half a CPU's worth of work on: below that,
# a thread of ours would rarely wait for it (see `free_threads`).
BUSY_THRESHOLD = 0.5
# The shortest window over which /proc/stat (100 ticks a second) tells busy from idle.
MIN_WINDOW = 0.1


def allowed_cpus() -> set[int] | None:
    """The CPUs this process may run on (its affinity); None where the OS does not say."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # macOS
        return None


def physical_cores(cpus: set[int]) -> int:
    """Physical cores among `cpus`: hardware threads of one core count once."""
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(len(cores), 1)


def usable_cpu_count() -> int:
    """Physical cores among the CPUs this process may run on, within its cgroup's CPU quota.

    Compute-bound inference gains nothing from a core's second hardware thread, which is
    why llama.cpp itself defaults to physical cores.
    """
    cpus = allowed_cpus()
    cores = physical_cores(cpus) if cpus is not None else (os.cpu_count() or 1)
    return _within_quota(cores)


def cpu_limit() -> int:
    """The most threads worth starting: the CPUs (hardware threads) this process may run
    on, within its cgroup's CPU quota and ggml's own maximum. More threads than this only
    queue for a CPU, and llama.cpp's threads, which wait for each other many times per
    token, then wait for the slowest one's turn each time."""
    cpus = allowed_cpus()
    count = len(cpus) if cpus is not None else (os.cpu_count() or 1)
    return min(_within_quota(max(count, 1)), MAX_THREADS)


def _within_quota(count: int) -> int:
    quota = cpu_quota()
    # Rounded up: a quota of 1.5 CPUs runs two threads 75% of each period, more than one
    # thread gets, and the cgroup's threads are throttled together, not one at a time.
    return max(1, min(count, math.ceil(quota))) if quota else count


def parse_cpu_max(text: str) -> float | None:
    """CPUs from a cgroup v2 `cpu.max` ("150000 100000": 1.5; "max 100000": None)."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs_quota(quota: str, period: str) -> float | None:
    """CPUs from cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` (-1: unlimited)."""
    return parse_cpu_max(f"{quota.strip()} {period.strip()}") if quota.strip() != "-1" else None


def cpu_quota() -> float | None:
    """The tightest CPU quota of this process's cgroup and its parents, in CPUs; None when
    unlimited or not on Linux. A container given 2 of a host's 64 CPUs sees 64 in its
    affinity: only the quota says 2."""
    quotas = []
    for folder, version in _cgroup_folders("cpu"):
        try:
            if version == 2:
                quota = parse_cpu_max((folder / "cpu.max").read_text())
            else:
                quota = parse_cfs_quota((folder / "cpu.cfs_quota_us").read_text(),
                                        (folder / "cpu.cfs_period_us").read_text())
        except OSError:
            continue
        if quota:
            quotas.append(quota)
    return min(quotas) if quotas else None


@dataclass(frozen=True)
class CpuSample:
    """CPU time on the CPUs this process may use, by everything and by this process: two
    samples tell how much of those CPUs other processes kept busy in between."""

    busy: int  # clock ticks those CPUs spent running anything (steal included)
    total: int  # clock ticks those CPUs existed for: busy + idle + waiting on I/O
    own: float  # seconds of CPU this process has used, all its threads
    at: float  # time.monotonic()
    cpus: int  # how many CPUs the ticks cover


def parse_proc_stat(text: str, cpus: set[int] | None) -> tuple[int, int, int] | None:
    """(busy ticks, total ticks, CPUs counted) from /proc/stat's per-CPU lines, for the
    CPUs in `cpus` (None: all). Idle and I/O wait are not busy; steal is (the hypervisor
    gave that time to someone else)."""
    busy = total = counted = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit():
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user).
        ticks = [int(v) for v in rest.split()[:8]]
        ticks += [0] * (8 - len(ticks))
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
        counted += 1
    return (busy, total, counted) if counted else None


def sample_cpu() -> CpuSample | None:
    """Now's CPU counters; None where /proc/stat does not exist (macOS)."""
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return None
    found = parse_proc_stat(text, allowed_cpus())
    if found is None:
        return None
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return CpuSample(found[0], found[1], usage.ru_utime + usage.ru_stime, time.monotonic(),
                     found[2])


def busy_elsewhere(before: CpuSample, after: CpuSample) -> float | None:
    """How many CPUs (of those this process may use) other processes kept busy between
    the two samples: all the busy time minus this process's own. None for a window too
    short to tell."""
    elapsed = after.at - before.at
    total = after.total - before.total
    if elapsed < MIN_WINDOW or total <= 0:
        return None
    busy_cpus = after.cpus * (after.busy - before.busy) / total
    own_cpus = (after.own - before.own) / elapsed
    return max(busy_cpus - own_cpus, 0.0)


def load_elsewhere() -> float | None:
    """Where no CPU counters exist (macOS), the 1-minute load average stands in for what
    other processes keep busy. It lags by a minute and counts this process's recent past
    too, so it is only the fallback."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def free_threads(cores: int, cpus: int, busy: float | None) -> int:
    """The default thread count: one per physical core (`cores`), but never more than the
    CPUs (`cpus`, hardware threads) that other processes leave free (`busy`: how many they
    keep busy, None when unknown).

    llama.cpp's threads meet at a barrier after every operation, hundreds of times per
    token, so a thread that has to queue for a CPU holds all the others up at each one.
    Measured on a 2-core machine with one core kept busy by another process
    (benchmarks/contention.py, 9 repetitions, best run): 2 threads generated 23 tokens/s
    where 1 made 65 (issue 10 saw 0.34 against 152); this default chose 1 and made 65, and
    idle chose 2 and made 97 against 95 for --threads 2.
    Another process's half-busy CPU counts as taken (BUSY_THRESHOLD).
    """
    if not busy:
        return max(cores, 1)
    taken = math.floor(busy + (1 - BUSY_THRESHOLD))
    return max(1, min(cores, cpus - taken))


def default_threads(since: CpuSample | None) -> tuple[int, float | None]:
    """The thread count to use when none is asked for, and how many CPUs other processes
    kept busy since `since` (a `sample_cpu()` taken before loading the model, so that the
    load's own time is the window; the load average without one). A window shorter than
    MIN_WINDOW is waited out: a tenth of a second at most, on a model that loaded faster."""
    if since is None:
        busy = load_elsewhere()
    else:
        if (wait := MIN_WINDOW - (time.monotonic() - since.at)) > 0:
            time.sleep(wait)
        now = sample_cpu()
        busy = busy_elsewhere(since, now) if now is not None else None
    return free_threads(usable_cpu_count(), cpu_limit(), busy), busy


# -- memory --------------------------------------------------------------------------------

def peak_memory_bytes(children: bool = False) -> int:
    """The largest resident set this process has had; with `children`, also any child
    process it waited for (conversions run components in child processes).

    On Linux the kernel's high-water mark of this program's memory (VmHWM), not
    getrusage's ru_maxrss: that one survives exec, so a process started by a large one
    (a test runner, a notebook) would report its parent's peak as its own."""
    import resource

    peak = _high_water_mark()
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RUSAGE_UNIT
    if children:
        # A child's figure is at least this process's size when it was started: still a
        # bound on what the two needed at once.
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _RUSAGE_UNIT)
    return peak


_RUSAGE_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB


def _high_water_mark() -> int | None:
    """VmHWM from /proc/self/status in bytes; None where there is no such file."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


MEMORY_LIMIT_ENV = "LLMCTL_MEMORY_LIMIT"
# The share of the usable memory llmctl plans for a model to need, leaving the rest to the
# system and other programs. The one rule: run, chat and imagine refuse a model whose
# estimate is above it (llmctl.engines.memory), `ls --available --fits` lists only catalog
# models within it, convert warns above it.
MEMORY_SHARE = 0.9


def allowed_memory() -> int | None:
    """The most memory llmctl plans for a model to need: MEMORY_SHARE of what this process
    may use (`usable_memory_bytes`). None when that is unknown: then nothing is refused."""
    usable = usable_memory_bytes()
    return int(usable * MEMORY_SHARE) if usable is not None else None


def usable_memory_bytes() -> int | None:
    """The memory this process may use: LLMCTL_MEMORY_LIMIT when set, else the machine's
    RAM capped by the cgroup's limit (a container's RAM is its limit, not the host's).

    Total, not currently free: what fits should not change with what else is running.
    None when nothing can be found out (then nothing is refused on memory grounds).
    Raises UsageError for an LLMCTL_MEMORY_LIMIT that is unreadable or zero (an empty
    value is unset, as for any environment variable).
    """
    configured = os.environ.get(MEMORY_LIMIT_ENV)
    if configured:
        return _configured_limit(configured)
    amounts = [a for a in (physical_memory_bytes(), _cgroup_limit()) if a]
    return min(amounts) if amounts else None


def _configured_limit(text: str) -> int:
    from llmctl.errors import UsageError

    try:
        limit = parse_size(text)
    except ValueError:
        raise UsageError(f"{MEMORY_LIMIT_ENV}={text!r} is not a size",
                         hint="use bytes or a number with K, M, G or T, e.g. 8G") from None
    if limit <= 0:
        # Zero used to read as "unset" and turned the memory check off: a limit of nothing
        # is a mistake to report, not a way to say "no limit".
        raise UsageError(f"{MEMORY_LIMIT_ENV}={text!r} leaves no memory to load a model in",
                         hint=f"give a size above zero, e.g. 8G, or unset {MEMORY_LIMIT_ENV} "
                              "to use this machine's RAM")
    return limit


def physical_memory_bytes() -> int | None:
    """The machine's RAM (what a benchmark says it ran on); None where it cannot tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows, or a platform without them
        return None


def _cgroup_folders(controller: str) -> list[tuple[Path, int]]:
    """The folders holding `controller`'s settings for this process's cgroup and each of
    its parents, with the cgroup version (1 or 2); none when not on Linux. Limits nest:
    the tightest along the path applies."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: the unified hierarchy, every controller in one tree
            base, version = Path("/sys/fs/cgroup"), 2
        elif controller in controllers.split(","):
            base, version = Path("/sys/fs/cgroup") / controller, 1
        else:
            continue
        # Inside a cgroup namespace the path is relative to a root that is mounted at
        # `base` itself: try the path, then each parent, down to `base`.
        folder = base / path.lstrip("/")
        for candidate in (folder, *folder.parents):
            if not candidate.is_relative_to(base):
                break
            folders.append((candidate, version))
    return folders


def _cgroup_limit() -> int | None:
    """The tightest memory limit of this process's cgroup and its parents (v2 `memory.max`,
    or v1 `memory.limit_in_bytes`); None when unlimited or not on Linux. A few small reads."""
    limits = []
    for folder, version in _cgroup_folders("memory"):
        name = "memory.max" if version == 2 else "memory.limit_in_bytes"
        try:
            value = (folder / name).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            limits.append(int(value))
    # v1 writes "unlimited" as a huge number (2^63 rounded to pages): min() ignores it.
    return min(limits) if limits else None


def platform_tag() -> str:
    """This machine as "<sys.platform>-<machine>" ("linux-x86_64", "darwin-arm64"): how
    the engine table says where an engine runs, or is the default."""
    import platform

    return f"{sys.platform}-{platform.machine().lower()}"


def default_torch_device() -> str:
    """The device PyTorch engines pick ("cuda", then "mps", then "cpu"), told without
    importing torch: what the memory estimate needs to know (a CPU computes float16
    weights as float32, so they count twice)."""
    import platform
    import shutil

    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps"
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


# -- the process's stderr ----------------------------------------------------------------


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null, and Python's warnings off, for the span of
    a library's import or load: torchao (pulled in by transformers and ExecuTorch) logs the
    CUDA kernels it cannot load and torch's deprecations, C++ runtimes log what they read
    of the CPU, and none of it belongs in a pipe. Exceptions still reach the caller;
    LLMCTL_DEBUG=1 keeps the libraries' output."""
    if os.environ.get("LLMCTL_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
