"""PyTorch through diffusers: any text-to-image pipeline folder (model_index.json), opened
with AutoPipelineForText2Image on CUDA, Apple's MPS or the CPU.

The pipeline's own `__call__` runs the denoising loop (so every pipeline diffusers knows
works, SDXL and the turbo models included), in a worker thread: its step callback hands
each step to `generate`'s stream through a queue, and raises at the next step once the
stream is closed or interrupted (Ctrl-C reaches the main thread, which is waiting on the
queue). The worker adds one queue hand-off per step; the benchmark in README shows it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.engines.image import (
    SCHEDULERS,
    ImageLoadOptions,
    ImageRequest,
    Rendered,
    Step,
    StepClock,
)
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError
from llmctl.formats import diffusers as diffusers_format
from llmctl.formats import hf
from llmctl.host import quiet_stderr

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class _Stopped(Exception):
    """Raised in the step callback to leave the pipeline's loop at once (setting the
    pipeline's `_interrupt` would still decode an image nobody wants)."""


def weight_files(folder: Path) -> dict[str, list[str]]:
    """Component folder -> its weight files (pickles included), for the components
    model_index.json names."""
    if not (folder / diffusers_format.INDEX).is_file():
        raise EngineFailure(f"{folder} has no model_index.json")
    found = {}
    for component in sorted(diffusers_format.read_components(folder / diffusers_format.INDEX)):
        if (folder / component).is_dir():
            found[component] = sorted(
                p.name for p in (folder / component).iterdir()
                if p.name.endswith((".safetensors", *PICKLE_SUFFIXES)))
    return found


def check_weights(folder: Path, trust_pickle: bool) -> None:
    """Refuse pickled weights unless trusted: unpickling can run any code the file holds."""
    if trust_pickle:
        return
    pickled = [f"{component}/{names[0]}" for component, names in weight_files(folder).items()
               if names and not any(n.endswith(".safetensors") for n in names)]
    if pickled:
        raise UsageError(
            f"{folder.name} keeps weights as Python pickles ({', '.join(pickled)}), which "
            "can run code when loaded",
            hint="load it only if you trust where it came from: add --trust-pickle")


def _variant(folder: Path) -> str | None:
    """"fp16" when the weights are only there as fp16 variants
    (diffusion_pytorch_model.fp16.safetensors), as the catalog pulls them."""
    variants = {hf.folder_variant(folder / c) for c, files in weight_files(folder).items()
                if files}
    return "fp16" if variants == {"fp16"} else None


def _missing_components(folder: Path) -> dict[str, None]:
    """Components model_index.json names whose folder was not pulled (the catalog leaves
    out the safety checker): loaded as None instead of failing."""
    return {name: None for name in sorted(diffusers_format.read_components(
        folder / diffusers_format.INDEX)) if not (folder / name).is_dir()}


def _quiet_libraries() -> None:
    """diffusers and transformers log notes and draw tqdm bars on stderr; llmctl shows its
    own progress. LLMCTL_DEBUG=1 keeps their output."""
    if os.environ.get("LLMCTL_DEBUG"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")


def choose_device(torch: Any, asked: str | None) -> str:
    """cuda, then mps, then cpu; an asked device that is missing is an error, not a
    silent fall back to something twenty times slower."""
    available = {"cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None
                 and torch.backends.mps.is_available(),
                 "cpu": True}
    if asked:
        if not available.get(asked):
            raise EngineUnavailable("diffusers", f"torch {torch.__version__} sees no {asked} "
                                    "device; try --device cpu")
        return asked
    return next(name for name, ok in available.items() if ok)


class DiffusersEngine:
    name = "diffusers"

    def __init__(self, folder: Path, options: ImageLoadOptions):
        check_weights(folder, options.trust_pickle)
        _quiet_libraries()
        try:
            import torch
            from diffusers import AutoPipelineForText2Image
            from diffusers.utils import logging as diffusers_logging
        except ImportError as exc:
            raise EngineUnavailable("diffusers", f"diffusers or torch cannot be imported "
                                    f"({exc})", "pip install 'llmctl[diffusers]'") from None
        if not os.environ.get("LLMCTL_DEBUG"):
            diffusers_logging.disable_progress_bar()
        self.torch = torch
        self.device = choose_device(torch, options.device)
        # Half precision where the hardware computes it fast; the CPU computes float32.
        self.dtype = torch.float32 if self.device == "cpu" else torch.float16
        try:
            with quiet_stderr():  # transformers imports torchao, if installed, here
                self.pipe = AutoPipelineForText2Image.from_pretrained(
                    folder, torch_dtype=self.dtype, variant=_variant(folder),
                    use_safetensors=None if options.trust_pickle else True,
                    **_missing_components(folder))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EngineFailure(f"diffusers could not load {folder}: {exc}") from None
        self.pipe.set_progress_bar_config(disable=True)
        if options.low_memory:
            self.pipe.enable_attention_slicing()
            if hasattr(self.pipe, "vae") and hasattr(self.pipe.vae, "enable_tiling"):
                self.pipe.vae.enable_tiling()
            if self.device == "cuda":  # weights wait in RAM until their turn on the GPU
                self.pipe.enable_model_cpu_offload()
        if not (options.low_memory and self.device == "cuda"):
            self.pipe.to(self.device)
        self.own_scheduler = self.pipe.scheduler

    def _scheduler(self, name: str | None) -> str:
        """Set the request's scheduler (from the model's own configuration) and return
        the name it is recorded under."""
        own = self.own_scheduler
        if name is None:
            self.pipe.scheduler = own
            known = {v: k for k, v in SCHEDULERS.items()}
            return known.get(type(own).__name__, type(own).__name__)
        import diffusers

        cls = getattr(diffusers, SCHEDULERS[name])
        self.pipe.scheduler = cls.from_config(own.config)
        return name

    def _preview(self, latents: Any) -> Any:
        """The latents decoded as they stand (a VAE decode: it costs about what a step
        does at 512x512). None when this pipeline's latents are not a plain image."""
        pipe = self.pipe
        try:
            vae = pipe.vae
            with self.torch.no_grad():
                image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor,
                                   return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type="pil")[0]
        except Exception:  # e.g. packed latents (Flux): no preview rather than no image
            return None

    def generate(self, request: ImageRequest) -> Iterator[Step | Rendered]:
        torch = self.torch
        scheduler = self._scheduler(request.scheduler)
        events: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()
        started = time.perf_counter()
        clock = StepClock(request.steps, started)

        def on_step(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]
                    ) -> dict[str, Any]:
            if stop.is_set():
                raise _Stopped
            now = time.perf_counter()
            clock.total = getattr(pipe, "num_timesteps", None) or request.steps
            done = index + 1
            every = request.preview_every
            preview = (self._preview(tensors["latents"])
                       if every and (done % every == 0) and done < clock.total else None)
            events.put(clock.step(done, now, preview))
            return {}

        kwargs: dict[str, Any] = dict(
            prompt=request.prompt, negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps, guidance_scale=request.guidance,
            width=request.width, height=request.height,
            # A CPU generator: the same seed starts from the same noise on every device.
            generator=torch.Generator("cpu").manual_seed(request.seed),
            callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])

        def work() -> None:
            try:
                with torch.inference_mode():
                    events.put(("image", self.pipe(**kwargs).images[0]))
            except _Stopped:
                events.put(("stopped", None))
            except BaseException as exc:  # handed to the main thread, raised there
                events.put(("error", exc))

        worker = threading.Thread(target=work, name="llmctl-diffusers", daemon=True)
        worker.start()
        try:
            while True:
                event = events.get()
                if isinstance(event, Step):
                    yield event
                    continue
                kind, value = event
                if kind == "error":
                    raise EngineFailure(f"diffusers failed: {value}") from value
                if kind == "stopped":
                    raise KeyboardInterrupt
                yield Rendered(value, time.perf_counter() - started, clock.per_step,
                               scheduler, self.device)
                return
        finally:
            if worker.is_alive():  # closed or interrupted: stop at the next step
                stop.set()
                worker.join()

    def close(self) -> None:
        self.pipe = None


def build_backend() -> str:
    """The device PyTorch would pick here (`show`), told without importing torch."""
    from llmctl.host import default_torch_device

    return {"cuda": "CUDA", "mps": "MPS"}.get(default_torch_device(), "CPU")


def load(path: Path, options: ImageLoadOptions) -> DiffusersEngine:
    return DiffusersEngine(path, options)
