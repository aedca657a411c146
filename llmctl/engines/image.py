"""The contract every image engine keeps, and what llmctl checks before loading one.

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

from llmctl.errors import InsufficientResources, UsageError
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


# --- memory ----------------------------------------------------------------------------

OVERHEAD = 256 * 1024**2  # Python, torch and its allocator, the tokenizer
# Working memory (activations, attention, the VAE decoder's full-size feature maps) per
# 512x512 pixels of output, for one image with classifier-free guidance: an allowance
# that leans high, like llmctl.memory's, not a measurement (no real Stable Diffusion
# weights can be downloaded where this was written).
WORK_PER_512 = 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".weights")


@dataclass(frozen=True)
class ImageMemoryEstimate:
    weights: int  # as loaded: half-precision files count twice when loaded in float32
    work: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.work + self.overhead


def estimate_image_memory(folder: Path, width: int, height: int, upcast: bool
                          ) -> ImageMemoryEstimate:
    """What generating one width x height image with the model in `folder` takes:
    its weights (doubled for float16 files loaded as float32 when `upcast`), working
    memory in proportion to the pixels, and a fixed overhead. Core ML weights (.bin in
    .mlmodelc) count as they are."""
    files = [p for p in folder.rglob("*") if p.is_file() and (
        p.name.endswith(WEIGHT_SUFFIXES) or p.parent.name == "weights")]
    # A folder holding the same weights as .safetensors and as a pickle loads one of them.
    with_tensors = {p.parent for p in files if p.suffix == ".safetensors"}
    weights = 0
    for path in files:
        if path.parent in with_tensors and path.suffix != ".safetensors":
            continue
        size = path.stat().st_size
        weights += size * 2 if upcast and ".fp16." in path.name else size
    work = int(WORK_PER_512 * width * height / (512 * 512))
    return ImageMemoryEstimate(weights, work, OVERHEAD)


def check_image_fits(folder: Path, width: int, height: int, upcast: bool, force: bool
                     ) -> tuple[ImageMemoryEstimate, int | None]:
    """Refuse (exit 5) a model whose estimate is above the share of memory llmctl plans
    for, as `run` does (llmctl.memory); `force` loads anyway and the caller warns."""
    from llmctl.host import usable_memory_bytes
    from llmctl.memory import SHARE

    estimate = estimate_image_memory(folder, width, height, upcast)
    usable = usable_memory_bytes()
    allowed = int(usable * SHARE) if usable else None
    if allowed is not None and estimate.total > allowed and not force:
        raise InsufficientResources(
            "memory", estimate.total, allowed,
            hint=f"llmctl plans for at most {SHARE:.0%} of the memory it may use; try a "
                 "smaller --width/--height, --low-memory, or load anyway with --force")
    return estimate, allowed
