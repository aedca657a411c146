"""What a benchmark measures: one `Result` row per model, engine, settings and test, with
every sample, and the `Machine` it ran on.

A row's samples are durations in nanoseconds (`samples_ns`) and the value each gives in
the row's unit (`samples`): tokens per second for pp/tg/pg tests, milliseconds for time to
first token, seconds for loads and image steps. `mean` and `stddev` (the sample standard
deviation, as llama-bench reports it; 0 for one sample) are those of `samples`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Unit = Literal["t/s", "ms", "s", "rtf"]
# What a row measures. pp: prompt processing; tg: generation; pg: both in one request;
# ttft: time to the first token; load: opening the model (cache "cold" or "warm");
# prompt-ttft / prompt-tg: one prompt of the shipped prompt set through the chat template;
# step / image: seconds per denoising step and per image of an image model; rtf: a speech
# model's real-time factor (seconds of processing per second of audio: below 1 is faster).
Kind = Literal["pp", "tg", "pg", "ttft", "load", "prompt-ttft", "prompt-tg", "step", "image",
               "rtf"]


def mean_stddev(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1; 0 for fewer than 2 values)."""
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass(frozen=True)
class Machine:
    """The machine a run measured, as rows carry it. `key` identifies the machine for
    --compare: the hardware and OS, not the library versions (a new llama.cpp on the same
    machine is what a comparison is for)."""

    cpu: str
    cores: int  # logical CPUs this process may use
    ram_bytes: int
    os: str
    gpu: str  # "" when there is none that an engine uses
    libraries: dict[str, str]  # "llama.cpp", "llama-cpp-python", "mlx", "mlx-lm", "torch"...
    llmctl_version: str
    python_version: str

    @property
    def key(self) -> str:
        import hashlib

        text = "\n".join((self.cpu, str(self.cores), str(self.ram_bytes), self.os, self.gpu))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key}


@dataclass(frozen=True)
class Result:
    """One row of a benchmark table."""

    model: str  # the reference it was run as, e.g. "smollm2:135m"
    model_digest: str  # "sha256:<hex>"; "" for a model run from a path
    model_format: str  # "gguf", "mlx", "diffusers", "coreml"
    model_size: int  # bytes of the model's files
    model_params: int | None  # parameter count where the model says
    engine: str  # "llama", "mlx", "diffusers", "coreml"
    backend: str  # "CPU", "Metal", "CUDA", "MPS"
    threads: int | None  # None where the engine sizes its own work (MLX, torch)
    ctx: int | None  # the context the model was opened with (text models)
    test: str  # "pp512", "tg128", "pg512,128", "ttft512", "load", "short", "step"...
    kind: Kind
    unit: Unit
    n_prompt: int = 0
    n_gen: int = 0
    depth: int = 0
    cache: str = ""  # load rows: "cold" (evicted from the page cache first) or "warm"
    steps: int = 0  # image rows
    width: int = 0
    height: int = 0
    samples_ns: list[int] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0

    @property
    def mean(self) -> float:
        return mean_stddev(self.samples)[0]

    @property
    def stddev(self) -> float:
        return mean_stddev(self.samples)[1]

    @property
    def label(self) -> str:
        """The test as a table shows it: "pp512", "tg128 @ d512", "load cold"."""
        label = self.test
        if self.kind == "load":
            label = f"load {self.cache}"
        elif self.kind in ("prompt-ttft", "prompt-tg"):
            label = f"{self.test} {'ttft' if self.kind == 'prompt-ttft' else 'tg'}"
        if self.depth:
            label += f" @ d{self.depth}"
        return label

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON output carries it (the machine is added by the caller)."""
        data = asdict(self)
        data["mean"] = self.mean
        data["stddev"] = self.stddev
        return data


@dataclass(frozen=True)
class Change:
    """A row against its counterpart in an earlier run."""

    before_mean: float
    before_stddev: float
    before_run: int
    percent: float  # (now - before) / before * 100
    noise: bool  # the difference is within the two standard deviations added
    machine_key: str  # the earlier run's: another machine's numbers say little


@dataclass
class Run:
    """One `llmctl bench` invocation: its rows, the machine, and (once saved) its id."""

    machine: Machine
    results: list[Result]
    started: str  # ISO 8601, UTC
    argv: list[str] = field(default_factory=list)
    id: int | None = None  # the history database's run id, once saved


def value(unit: Unit, tokens: int, seconds: float) -> float:
    """A sample's value in its row's unit: tokens/s, or the duration in ms or s (rtf rows
    hold their ratio as it is)."""
    if unit == "t/s":
        return tokens / seconds if seconds > 0 else 0.0
    return seconds * 1000.0 if unit == "ms" else seconds
