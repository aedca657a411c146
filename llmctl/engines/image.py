"""The contract every image engine keeps, and the request checks made before loading one
(the memory estimate is in `llmctl.engines.memory`, with the text models').

`generate` yields one `Step` per denoising step (with a preview image when asked), then
one `Rendered` with the finished image. `llmctl.gallery` turns that stream into files and
`Image` events; `imagine` (and `bench`) consume it.

Import-light: no torch, no PIL, so that `imagine --help` and the option checks stay fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmctl.errors import UsageError
from llmctl.formats import coreml

# Scheduler names users type -> diffusers' classes (the Core ML engine uses them too).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++-sde": "DPMSolverSDEScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
}
DEVICES = ("cuda", "mps", "cpu")
COMPUTE_UNITS = tuple(coreml.COMPUTE_UNITS)  # llmctl's spellings
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class ImageLoadOptions:
    device: str | None = None  # None: cuda, then mps, then cpu
    low_memory: bool = False  # attention slicing, VAE tiling, CPU offload where available
    trust_pickle: bool = False  # load .bin/.ckpt weights (pickles can run code)
    compute_units: str = "all"  # Core ML only


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    seed: int
    steps: int
    guidance: float
    negative_prompt: str = ""
    width: int | None = None  # None: the model's own size
    height: int | None = None
    scheduler: str | None = None  # a SCHEDULERS name; None: the model's own
    preview_every: int = 0  # 0: no previews


@dataclass(frozen=True)
class Step:
    """Denoising step `index` of `total` (1-based) is done. `preview` is a PIL image from
    the engine; in the stream `llmctl.gallery` hands on, the path it was written to."""

    index: int
    total: int
    elapsed: float  # seconds since the first step started
    eta: float  # seconds left, from the measured time per step
    preview: Any = None


@dataclass(frozen=True)
class Rendered:
    """The finished image (PIL) and what the engine knows about how it was made."""

    image: Any
    seconds: float  # the whole generation: text encoding, denoising, decoding
    step_seconds: float  # mean time of one denoising step
    scheduler: str
    device: str


@dataclass(frozen=True)
class Image:
    """An image written to disk with its sidecar; `meta` is what both carry."""

    path: Path
    meta: dict[str, Any]


class ImageEngine(Protocol):
    name: str
    device: str

    def generate(self, request: ImageRequest) -> Iterator[Step | Rendered]:
        """Stream the denoising of one image. Closing the generator stops it at the next
        step (a KeyboardInterrupt does the same)."""
        ...

    def close(self) -> None: ...


class StepClock:
    """Elapsed time, the mean time per step and the time left. The first step also pays
    for what comes before the loop (text encoding), so from the second step on the mean
    is taken over the steps after the first."""

    def __init__(self, total: int, now: float):
        self.total = total
        self.started = now
        self.first_done: float | None = None
        self.per_step = 0.0

    def step(self, index: int, now: float, preview: Any = None) -> Step:
        if index == 1 or self.first_done is None:
            self.first_done = now
            self.per_step = (now - self.started) / index
        else:
            self.per_step = (now - self.first_done) / (index - 1)
        return Step(index, self.total, now - self.started,
                    self.per_step * max(self.total - index, 0), preview)


def check_request(width: int | None, height: int | None, scheduler: str | None) -> None:
    """What can be refused before any model loads (exit 2)."""
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"--{name} {value} is not a multiple of 8",
                             hint="Stable Diffusion works on 8x8 pixel blocks; try "
                                  f"{max(8, round(value / 8) * 8)}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise UsageError(f"unknown scheduler '{scheduler}'",
                         hint=f"choose one of: {', '.join(SCHEDULERS)}")
