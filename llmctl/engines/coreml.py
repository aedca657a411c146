"""Apple Core ML: Stable Diffusion resource folders, as Apple publishes them
(apple/coreml-stable-diffusion-*) and `llmctl convert --to coreml` writes them:

    TextEncoder.mlmodelc|.mlpackage   input_ids (1, 77)            -> last_hidden_state
    Unet.mlmodelc|.mlpackage          sample, timestep,            -> noise_pred
      or UnetChunk1 + UnetChunk2      encoder_hidden_states
    VAEDecoder.mlmodelc|.mlpackage    z (latents / scaling factor) -> image in [-1, 1]
    vocab.json, merges.txt            the CLIP tokenizer
    scheduler_config.json, vae_config.json   optional: the source pipeline's own

The loop is diffusers' (its schedulers, its seeding): text encoding of the negative and
positive prompts, then per step the UNet on both halves (classifier-free guidance), the
guided noise handed to the scheduler, then the VAE decoder. A chunked UNet runs its chunks
in turn, each given the step's inputs plus every earlier chunk's outputs (UnetChunk1's
outputs are UnetChunk2's extra inputs), as Apple's pipelines do.

Core ML predictions need macOS. Each component is reached only through `predict(dict) ->
dict` and its declared inputs and outputs, so tests run the same orchestration on Linux
with stand-ins built on the torch modules of a diffusers pipeline.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmctl.engines.image import (
    SCHEDULERS,
    ImageLoadOptions,
    ImageRequest,
    Rendered,
    Step,
    StepClock,
)
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError
from llmctl.formats import coreml as coreml_format

TOKENS = 77  # CLIP's context, what every Stable Diffusion text encoder is converted for
# Stable Diffusion 1.x/2.x's own scheduler and VAE scale, for folders that carry neither
# (Apple's published ones).
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000,
                "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                "clip_sample": False, "prediction_type": "epsilon"}
SD_VAE_SCALING = 0.18215


@dataclass(frozen=True)
class Feature:
    """A model input or output: its shape and element type ("float32", "float16",
    "int32")."""

    shape: tuple[int, ...]
    dtype: str = "float32"


class Component(Protocol):
    """A Core ML model as the pipeline uses it (coremltools' MLModel, or a stand-in)."""

    inputs: dict[str, Feature]
    outputs: dict[str, Feature]

    def predict(self, data: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Resources:
    """Where a resource folder's parts are."""

    folder: Path
    text_encoder: Path
    unet: list[Path]  # one model, or the chunks in order
    vae_decoder: Path
    vocab: Path
    merges: Path


def _model(folder: Path, name: str) -> Path | None:
    for suffix in coreml_format.SUFFIXES:  # compiled first: it loads without compiling again
        if (folder / f"{name}{suffix}").exists():
            return folder / f"{name}{suffix}"
    return None


def find_resources(folder: Path) -> Resources:
    """The resource folder at or below `folder` (Apple's repositories put it at
    `split_einsum/compiled/`, zip files one folder down). Chunks win over the whole UNet
    when both are there, as in Apple's pipelines: they are what fits an iPhone's memory
    and load faster everywhere."""
    candidates = [folder, *sorted(p.parent for p in folder.rglob("vocab.json"))]
    for place in candidates:
        text_encoder = _model(place, "TextEncoder")
        vae = _model(place, "VAEDecoder")
        chunks = [_model(place, "UnetChunk1"), _model(place, "UnetChunk2")]
        unet = [c for c in chunks if c] if all(chunks) else [u for u in [_model(
            place, "Unet")] if u]
        if text_encoder and vae and unet and (place / "merges.txt").is_file():
            return Resources(place, text_encoder, unet, vae, place / "vocab.json",
                             place / "merges.txt")
    have = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise EngineFailure(
        f"{folder} is not a Core ML Stable Diffusion resource folder: it needs "
        "TextEncoder, Unet (or UnetChunk1 and UnetChunk2) and VAEDecoder models with "
        f"vocab.json and merges.txt (found: {', '.join(have[:8]) or 'nothing'})")


# --- real Core ML models ----------------------------------------------------------------

_DTYPES = {"float32": "float32", "float16": "float16", "int32": "int32", "double": "float64",
           "float64": "float64"}


def _feature(shape: Any, dtype: str) -> Feature:
    if isinstance(shape, str):  # metadata.json: "[1, 77]"
        shape = json.loads(shape)
    return Feature(tuple(int(s) for s in shape), _DTYPES.get(dtype.lower(), "float32"))


def _compiled_features(path: Path) -> tuple[dict[str, Feature], dict[str, Feature]]:
    """Inputs and outputs of a compiled model, from the metadata.json Core ML's compiler
    writes into every .mlmodelc (a list with one object: inputSchema, outputSchema)."""
    data = json.loads((path / "metadata.json").read_text())
    data = data[0] if isinstance(data, list) else data

    def read(key: str) -> dict[str, Feature]:
        return {f["name"]: _feature(f.get("shape", "[]"), f.get("dataType", "Float32"))
                for f in data.get(key, []) if f.get("type", "MultiArray") == "MultiArray"}

    return read("inputSchema"), read("outputSchema")


def _spec_features(spec: Any) -> tuple[dict[str, Feature], dict[str, Feature]]:
    """Inputs and outputs from a model's protobuf description (an .mlpackage)."""
    kinds = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}

    def read(features: Any) -> dict[str, Feature]:
        found = {}
        for feature in features:
            array = feature.type.multiArrayType
            found[feature.name] = Feature(tuple(int(s) for s in array.shape),
                                          kinds.get(array.dataType, "float32"))
        return found

    return read(spec.description.input), read(spec.description.output)


class CoreMLComponent:
    """One Core ML model through coremltools: a compiled .mlmodelc (CompiledMLModel) or
    an .mlpackage (MLModel, compiled by Core ML when loaded)."""

    def __init__(self, path: Path, compute_units: str):
        import coremltools as ct

        units = getattr(ct.ComputeUnit, coreml_format.COMPUTE_UNITS[compute_units])
        if path.suffix == ".mlmodelc":
            self.model = ct.models.CompiledMLModel(str(path), compute_units=units)
            self.inputs, self.outputs = _compiled_features(path)
        else:
            self.model = ct.models.MLModel(str(path), compute_units=units)
            self.inputs, self.outputs = _spec_features(self.model.get_spec())

    def predict(self, data: dict[str, Any]) -> dict[str, Any]:
        return self.model.predict(data)


OpenComponent = Callable[[Path, str], Component]


# --- the pipeline -----------------------------------------------------------------------


def _read_json(*paths: Path) -> dict[str, Any] | None:
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return data
    return None


class CoreMLEngine:
    name = "coreml"

    def __init__(self, folder: Path, options: ImageLoadOptions,
                 open_component: OpenComponent = CoreMLComponent):
        try:
            import numpy as np
            import torch
            from transformers import CLIPTokenizer
        except ImportError as exc:
            raise EngineUnavailable("coreml", f"the pipeline's libraries cannot be imported "
                                    f"({exc})", "pip install 'llmctl[coreml]'"
                                    ) from None
        self.np, self.torch = np, torch
        self.device = f"coreml:{options.compute_units}"
        resources = self.resources = find_resources(folder)
        self.tokenizer = CLIPTokenizer(vocab=str(resources.vocab),
                                       merges=str(resources.merges), model_max_length=TOKENS)
        units = options.compute_units
        self.text_encoder = open_component(resources.text_encoder, units)
        self.unet = [open_component(path, units) for path in resources.unet]
        self.vae_decoder = open_component(resources.vae_decoder, units)
        self.scheduler_config = _read_json(
            resources.folder / "scheduler_config.json",
            resources.folder / "scheduler" / "scheduler_config.json") or SD_SCHEDULER
        vae = _read_json(resources.folder / "vae_config.json",
                         resources.folder / "vae" / "config.json") or {}
        self.vae_scaling = float(vae.get("scaling_factor", SD_VAE_SCALING))
        self._check_wiring()

    def _check_wiring(self) -> None:
        sample = self.unet[0].inputs.get("sample")
        if sample is None or len(sample.shape) != 4:
            raise EngineFailure(f"{self.resources.unet[0].name} has no 4-D 'sample' input")
        extra = {"text_embeds", "time_ids"} & set().union(*(u.inputs for u in self.unet))
        if extra:
            raise EngineFailure("this Core ML UNet is Stable Diffusion XL's (inputs "
                                f"{', '.join(sorted(extra))}); llmctl's Core ML engine runs "
                                "Stable Diffusion 1.x and 2.x")
        known = {"sample", "timestep", "encoder_hidden_states"}
        for path, chunk in zip(self.resources.unet, self.unet, strict=True):
            missing = set(chunk.inputs) - known
            if missing:
                raise EngineFailure(f"{path.name} needs inputs no earlier part provides: "
                                    f"{', '.join(sorted(missing))}")
            known |= set(chunk.outputs)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        shape = self.unet[0].inputs["sample"].shape
        return shape[0], shape[1], shape[2], shape[3]

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height): Core ML models are converted for one size."""
        _, _, h, w = self.latent_shape
        out = next(iter(self.vae_decoder.outputs.values()), None)
        scale = out.shape[-1] // w if out is not None and len(out.shape) == 4 else 8
        return w * scale, h * scale

    def _encode(self, text: str) -> Any:
        """(1, 77, hidden) embeddings of one prompt, as the text encoder returns them."""
        np = self.np
        ids = self.tokenizer(text, padding="max_length", max_length=TOKENS, truncation=True,
                             return_tensors="np").input_ids
        feature = self.text_encoder.inputs.get("input_ids", Feature((1, TOKENS)))
        out = self.text_encoder.predict({"input_ids": ids.astype(feature.dtype)})
        hidden = out.get("last_hidden_state")
        if hidden is None:
            hidden = next(v for v in out.values() if np.asarray(v).ndim == 3)
        return np.asarray(hidden, dtype=np.float32)

    def _unet(self, sample: Any, timestep: float, embeddings: Any) -> Any:
        """The noise prediction for `sample` (both halves with guidance). A UNet converted
        for batch 1 is run once per half."""
        np = self.np
        batch = self.latent_shape[0]
        if sample.shape[0] > batch:
            return np.concatenate([self._unet(sample[i:i + batch], timestep,
                                              embeddings[i:i + batch])
                                   for i in range(0, sample.shape[0], batch)])
        known: dict[str, Any] = {
            "sample": sample, "timestep": np.full((sample.shape[0],), timestep, np.float32),
            "encoder_hidden_states": embeddings}
        outputs: dict[str, Any] = {}
        for chunk in self.unet:
            feed = {}
            for name, feature in chunk.inputs.items():
                value = np.asarray(known[name])
                if name == "encoder_hidden_states" and len(feature.shape) == 4:
                    # Apple's UNets take (batch, hidden, 1, tokens): the layout of 1x1
                    # convolutions, which the Neural Engine runs fastest.
                    value = value.transpose(0, 2, 1)[:, :, None, :]
                feed[name] = value.astype(feature.dtype)
            outputs = chunk.predict(feed)
            known.update(outputs)  # a chunk's outputs are the next chunk's inputs
        noise = outputs.get("noise_pred", next(iter(outputs.values())))
        return np.asarray(noise, dtype=np.float32)

    def _scheduler(self, name: str | None) -> tuple[Any, str]:
        import diffusers

        config = dict(self.scheduler_config)
        class_name = SCHEDULERS[name] if name else config.get("_class_name", "PNDMScheduler")
        known = {v: k for k, v in SCHEDULERS.items()}
        scheduler = getattr(diffusers, class_name).from_config(config)
        return scheduler, name or known.get(class_name, class_name)

    def generate(self, request: ImageRequest) -> Iterator[Step | Rendered]:
        np, torch = self.np, self.torch
        width, height = self.image_size
        if (request.width or width, request.height or height) != (width, height):
            raise UsageError(f"this Core ML model makes {width}x{height} images only",
                             hint="leave out --width/--height, or convert the model for "
                                  "another size: llmctl convert --to coreml --latent-h/-w")
        started = time.perf_counter()
        scheduler, scheduler_name = self._scheduler(request.scheduler)
        batch, channels, h, w = self.latent_shape
        guided = request.guidance > 1.0  # as diffusers: 1 or less turns guidance off
        positive = self._encode(request.prompt)
        if guided or batch == 2:
            # A UNet converted for batch 2 always takes two halves; without guidance the
            # second is the prompt again and only the first is used.
            negative = self._encode(request.negative_prompt) if guided else positive
            embeddings = np.concatenate([negative, positive])
        else:
            embeddings = positive
        generator = torch.Generator("cpu").manual_seed(request.seed)
        # The same draw as diffusers' prepare_latents, so the same seed gives the same
        # starting noise as the PyTorch engine.
        latents = torch.randn((1, channels, h, w), generator=generator, dtype=torch.float32)
        scheduler.set_timesteps(request.steps)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(
            scheduler.step).parameters else {}
        if "eta" in inspect.signature(scheduler.step).parameters:
            step_kwargs["eta"] = 0.0
        timesteps = scheduler.timesteps
        clock = StepClock(len(timesteps), started)
        for index, t in enumerate(timesteps, start=1):
            model_input = torch.cat([latents] * 2) if embeddings.shape[0] == 2 else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self._unet(model_input.numpy(), float(t), embeddings)
            if guided:
                uncond, text = noise[:1], noise[1:]
                noise = uncond + request.guidance * (text - uncond)
            else:
                noise = noise[:1]
            latents = scheduler.step(torch.from_numpy(noise), t, latents,
                                     **step_kwargs).prev_sample
            every = request.preview_every
            preview = (self._decode(latents) if every and index % every == 0
                       and index < len(timesteps) else None)
            yield clock.step(index, time.perf_counter(), preview)
        image = self._decode(latents)
        yield Rendered(image, time.perf_counter() - started, clock.per_step, scheduler_name,
                       self.device)

    def _decode(self, latents: Any) -> Any:
        """Latents to a PIL image, as diffusers' image processor does: [-1, 1] to [0, 1],
        then to 8 bits with rounding."""
        np = self.np
        from PIL import Image

        feature = self.vae_decoder.inputs.get("z", Feature(()))
        z = (latents.numpy() / self.vae_scaling).astype(feature.dtype)
        out = self.vae_decoder.predict({"z": z})
        image = np.asarray(out.get("image", next(iter(out.values()))), dtype=np.float32)
        image = np.clip(image / 2 + 0.5, 0, 1)[0].transpose(1, 2, 0)
        return Image.fromarray((image * 255).round().astype("uint8"))

    def close(self) -> None:
        self.text_encoder = self.vae_decoder = None  # type: ignore[assignment]
        self.unet = []


def build_backend() -> str:
    return "Core ML (the compute units --compute-unit picks)"


def load(path: Path, options: ImageLoadOptions) -> CoreMLEngine:
    return CoreMLEngine(path, options)
