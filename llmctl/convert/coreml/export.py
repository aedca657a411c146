"""The torch and coremltools half of `convert --to coreml`: each Stable Diffusion component
captured from PyTorch and converted to an ML program, the UNet split into two chunks,
weights palettized, and .mlpackage files inspected (inputs, outputs, weights, ops).

Which capture path works depends on the component (TESTDATA.md, "Core ML on Linux"; seen
with torch 2.13, diffusers 0.42, transformers 5, coremltools 9):
- UNet and the VAE: `torch.export.export(...).run_decompositions({})`. torch.jit.trace
  fails on them inside coremltools at `aten::Int`.
- CLIP (the text encoder, the safety checker's vision tower): `torch.jit.trace(...,
  strict=False)` with int32 token ids. torch.export fails on transformers 5's CLIP
  ("Unsupported fx node alias").
The choice is kept per component (CAPTURE), and the tests convert every component, so an
upgrade that breaks one path shows at once.

Model interfaces follow Apple's ml-stable-diffusion, whose Swift and Python pipelines read
these models (names, shapes, and the (B, C, 1, S) layout of the UNet's text input):

    TextEncoder   input_ids (1, 77) float32 -> last_hidden_state (1, 77, C), pooled_outputs (1, C)
    Unet          sample (2, 4, h, w), timestep (2,), encoder_hidden_states (2, C, 1, 77)
                  float16 -> noise_pred (2, 4, h, w)
    VAEDecoder    z (1, 4, h, w) float16 -> image (1, 3, H, W), in [-1, 1]
    VAEEncoder    x (1, 3, H, W) float16 -> latent (1, 8, h, w): the mean and log-variance
    SafetyChecker clip_input (1, 3, 224, 224), images (1, H, W, 3), adjustment (1,) float16
                  -> filtered_images, has_nsfw_concepts, concept_scores

Outputs are float32. Everything here imports torch, diffusers, transformers and
coremltools inside its functions; the module is only imported by a conversion.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.convert.coreml.attention import AttentionImplementation, check_attention
from llmctl.errors import EngineFailure, UsageError, VerificationFailed
from llmctl.formats.hf import folder_variant

Status = Callable[[str], None]

# How each component is captured from PyTorch (see the module's docstring).
CAPTURE = {"text_encoder": "torch.jit.trace", "unet": "torch.export",
           "vae_decoder": "torch.export", "vae_encoder": "torch.export",
           "safety_checker": "torch.jit.trace"}
DEPLOYMENT_TARGETS = ("macOS13", "macOS14", "iOS16", "iOS17")
UNET_BATCH = 2  # classifier-free guidance: the unconditioned and the prompted latents
# Timestep of the sample input: any value works (it only feeds the sinusoidal embedding);
# this is the first step of SD's usual 50-step schedules.
SAMPLE_TIMESTEP = 981.0
WEIGHTS = "Data/com.apple.CoreML/weights/weight.bin"


@dataclass(frozen=True)
class Geometry:
    """The shapes a conversion fixes, read from the pipeline's configs."""

    latent_h: int
    latent_w: int
    latent_channels: int
    vae_scale: int  # image pixels per latent position (8 for SD)
    text_length: int  # token positions (77)
    text_hidden: int  # text embedding width (768 for SD 1.x)
    unet_in_channels: int
    cross_attention_dim: int
    safety_image_size: int = 224

    @property
    def image_h(self) -> int:
        return self.latent_h * self.vae_scale

    @property
    def image_w(self) -> int:
        return self.latent_w * self.vae_scale


@dataclass(frozen=True)
class ExportSettings:
    attention: AttentionImplementation
    min_deployment_target: str
    compute_unit: str
    query_chunk_size: int


def quiet_coremltools() -> None:
    """coremltools logs a warning for each native library missing off macOS, and for
    library versions it has not tested: noise for an llmctl user (they stay in the log)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)


def _ct() -> Any:
    quiet_coremltools()
    import coremltools

    return coremltools


# -- capture and conversion, per component ---------------------------------------------------


def convert_component(component: str, source: Path, geometry: Geometry,
                      settings: ExportSettings, out: Path, status: Status) -> dict[str, Any]:
    """Convert one component of the pipeline at `source` to the ML program `out`
    (.mlpackage, written by coremltools). Returns facts for the conversion report."""
    import torch

    torch.set_grad_enabled(False)
    build = {"text_encoder": _text_encoder, "unet": _unet, "vae_decoder": _vae_decoder,
             "vae_encoder": _vae_encoder, "safety_checker": _safety_checker}[component]
    status(f"loading from {source.name}/{_folder(component)}")
    report: dict[str, Any] = {"capture": CAPTURE[component]}
    captured, inputs, outputs = build(source, geometry, settings, status, report)
    ct = _ct()
    import numpy as np

    status(f"converting to Core ML ({CAPTURE[component]}, coremltools {ct.__version__})")
    model = ct.convert(
        captured, convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, settings.min_deployment_target),
        inputs=[ct.TensorType(name=name, shape=tuple(tensor.shape),
                              dtype=np.float32 if dtype == "float32" else np.float16)
                for name, (tensor, dtype) in inputs.items()],
        outputs=[ct.TensorType(name=name, dtype=np.float32) for name in outputs],
        compute_units=getattr(ct.ComputeUnit, settings.compute_unit),
        skip_model_load=True,  # loading needs macOS; nothing here predicts
    )
    del captured
    model.short_description = f"Stable Diffusion {component}, converted by llmctl"
    model.user_defined_metadata["llmctl.attention"] = settings.attention.value
    model.save(str(out))
    return report


def _folder(component: str) -> str:
    return {"vae_decoder": "vae", "vae_encoder": "vae"}.get(component, component)


Built = tuple[Any, dict[str, tuple[Any, str]], list[str]]


def _text_encoder(source: Path, geometry: Geometry, settings: ExportSettings,
                  status: Status, report: dict[str, Any]) -> Built:
    import torch
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(source / "text_encoder", dtype=torch.float32,
                                          variant=folder_variant(source / "text_encoder")
                                          ).eval()

    class TextEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hidden, pooled = self.model(input_ids, return_dict=False)[:2]
            return hidden, pooled

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, geometry.text_length),
                        generator=generator, dtype=torch.int32)
    status("tracing (torch.jit.trace)")
    with _no_tracer_warnings():
        traced = torch.jit.trace(TextEncoder().eval(), (ids,), strict=False)
    # Apple's pipelines pass the token ids as float32 (coremltools issue 1423).
    return traced, {"input_ids": (ids, "float32")}, ["last_hidden_state", "pooled_outputs"]


def _unet(source: Path, geometry: Geometry, settings: ExportSettings, status: Status,
          report: dict[str, Any]) -> Built:
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=torch.float32,
                                                variant=folder_variant(source / "unet")
                                                ).eval()

    class Unet(torch.nn.Module):
        """Apple's interface: the text embeddings arrive as (B, C, 1, S)."""

        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            context = encoder_hidden_states.squeeze(2).transpose(1, 2)
            return self.unet(sample, timestep, context, return_dict=False)[0]

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(UNET_BATCH, geometry.unet_in_channels, geometry.latent_h,
                         geometry.latent_w, generator=generator)
    timestep = torch.full((UNET_BATCH,), SAMPLE_TIMESTEP)
    context = torch.randn(UNET_BATCH, geometry.cross_attention_dim, 1, geometry.text_length,
                          generator=generator)
    wrapper = Unet().eval()
    args = (sample, timestep, context)
    if settings.attention is not AttentionImplementation.ORIGINAL:
        status(f"checking {settings.attention.value} attention against the original "
               "(PyTorch, float32)")
        check = check_attention(unet, lambda _m: wrapper(*args), settings.attention,
                                settings.query_chunk_size)
        layer, worst = check.worst
        report["attention_check"] = {
            "implementation": settings.attention.value, "layers": len(check.layers),
            "worst_layer": layer, "worst_psnr_db": round(worst, 1),
            "output_psnr_db": round(check.output_psnr, 1), "threshold_db": check.threshold}
        if not check.passed:
            raise VerificationFailed(
                "Unet", f"the {settings.attention.value} attention differs from the original "
                f"(PSNR {min(worst, check.output_psnr):.1f} dB at {layer}, minimum "
                f"{check.threshold:.0f} dB); convert with --attention-implementation ORIGINAL"
                " and report this")
        status(f"attention matches the original: worst layer {worst:.0f} dB, output "
               f"{check.output_psnr:.0f} dB (minimum {check.threshold:.0f} dB)")
    status("capturing (torch.export)")
    program = torch.export.export(wrapper, args).run_decompositions({})
    return program, {"sample": (sample, "float16"), "timestep": (timestep, "float16"),
                     "encoder_hidden_states": (context, "float16")}, ["noise_pred"]


def _vae_part(source: Path, decoder: bool, sample: Any) -> Any:
    """The VAE's decoder (post_quant_conv, then the decoder) or encoder (the encoder, then
    quant_conv), as one module captured with torch.export."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(source / "vae", torch_dtype=torch.float32,
                                        variant=folder_variant(source / "vae")).eval()
    layers = ([vae.post_quant_conv, vae.decoder] if decoder
              else [vae.encoder, vae.quant_conv])
    # Some VAEs have no quant_conv/post_quant_conv (use_quant_conv=False): None here.
    return torch.export.export(torch.nn.Sequential(*filter(None, layers)).eval(),
                               (sample,)).run_decompositions({})


def _vae_decoder(source: Path, geometry: Geometry, settings: ExportSettings,
                 status: Status, report: dict[str, Any]) -> Built:
    import torch

    z = torch.randn(1, geometry.latent_channels, geometry.latent_h, geometry.latent_w,
                    generator=torch.Generator().manual_seed(0))
    status("capturing (torch.export)")
    return _vae_part(source, True, z), {"z": (z, "float16")}, ["image"]


def _vae_encoder(source: Path, geometry: Geometry, settings: ExportSettings,
                 status: Status, report: dict[str, Any]) -> Built:
    import torch

    x = torch.rand(1, 3, geometry.image_h, geometry.image_w,
                   generator=torch.Generator().manual_seed(0)) * 2 - 1
    status("capturing (torch.export)")
    return _vae_part(source, False, x), {"x": (x, "float16")}, ["latent"]


def _safety_checker(source: Path, geometry: Geometry, settings: ExportSettings,
                    status: Status, report: dict[str, Any]) -> Built:
    import torch
    import torch.nn.functional as F
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )

    checker = StableDiffusionSafetyChecker.from_pretrained(
        source / "safety_checker", torch_dtype=torch.float32,
        variant=folder_variant(source / "safety_checker")).eval()

    class SafetyChecker(torch.nn.Module):
        """diffusers' checker without its Python loop over images: every image's scores
        at once, flagged images replaced by black ones with a select."""

        def __init__(self) -> None:
            super().__init__()
            self.checker = checker

        def forward(self, clip_input: torch.Tensor, images: torch.Tensor,
                    adjustment: torch.Tensor) -> tuple[torch.Tensor, ...]:
            c = self.checker
            pooled = c.vision_model(clip_input)[1]
            embeds = F.normalize(c.visual_projection(pooled), dim=-1)
            special = (embeds @ F.normalize(c.special_care_embeds, dim=-1).T
                       - c.special_care_embeds_weights + adjustment)
            # diffusers lowers every concept threshold by 0.01 for an image that touches a
            # "special care" concept.
            special_hit = (special > 0).float().amax(dim=1, keepdim=True)
            scores = (embeds @ F.normalize(c.concept_embeds, dim=-1).T
                      - c.concept_embeds_weights + special_hit * 0.01)
            flagged = (scores > 0).float().amax(dim=1)
            keep = (1.0 - flagged).reshape(-1, 1, 1, 1)
            return images * keep, flagged, scores

    generator = torch.Generator().manual_seed(0)
    size = geometry.safety_image_size
    clip_input = torch.randn(1, 3, size, size, generator=generator)
    images = torch.rand(1, geometry.image_h, geometry.image_w, 3, generator=generator)
    adjustment = torch.zeros(1)
    status("tracing (torch.jit.trace)")
    with _no_tracer_warnings():
        traced = torch.jit.trace(SafetyChecker().eval(), (clip_input, images, adjustment),
                                 strict=False)
    return traced, {"clip_input": (clip_input, "float16"), "images": (images, "float16"),
                    "adjustment": (adjustment, "float16")}, [
        "filtered_images", "has_nsfw_concepts", "concept_scores"]


class _no_tracer_warnings:
    """The tracer warns about every shape check in transformers' code; with fixed shapes
    they are expected, and they would bury llmctl's own progress."""

    def __enter__(self) -> None:
        import warnings

        import torch

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", torch.jit.TracerWarning)

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)


# -- after conversion: palettization, chunking, inspection --------------------------------------


def palettize(package: Path, out: Path, nbits: int, min_elements: int) -> None:
    """k-means palettization of every weight with at least `min_elements` values (the
    embedding table excepted, as Apple does: its rows are looked up, not multiplied)."""
    ct = _ct()
    from coremltools.optimize.coreml import (
        OpPalettizerConfig,
        OptimizationConfig,
        palettize_weights,
    )

    model = ct.models.MLModel(str(package), skip_model_load=True)
    config = OptimizationConfig(
        global_config=OpPalettizerConfig(mode="kmeans", nbits=nbits,
                                         weight_threshold=min_elements),
        op_type_configs={"gather": None})
    palettize_weights(model, config).save(str(out))


def bisect(package: Path, out_dir: Path) -> tuple[Path, Path]:
    """Split an ML program into two of about equal weight size (coremltools'
    bisect_model). The first one's outputs feed the second one."""
    ct = _ct()
    out_dir.mkdir(parents=True, exist_ok=True)
    ct.models.utils.bisect_model(str(package), str(out_dir), merge_chunks_to_pipeline=False,
                                 check_output_correctness=False)  # needs macOS to predict
    stem = package.name.removesuffix(".mlpackage")
    return out_dir / f"{stem}_chunk1.mlpackage", out_dir / f"{stem}_chunk2.mlpackage"


Feature = tuple[str, tuple[int, ...], str]  # name, shape, data type


@dataclass(frozen=True)
class PackageInfo:
    inputs: list[Feature]
    outputs: list[Feature]
    weight_bytes: int
    op_types: Counter[str]

    @property
    def palettized_ops(self) -> int:
        """Weights stored as a palette plus indices (lookup-table ops)."""
        return sum(n for op, n in self.op_types.items() if op.startswith("constexpr_lut"))

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [_feature_dict(f) for f in self.inputs],
                "outputs": [_feature_dict(f) for f in self.outputs],
                "weight_bytes": self.weight_bytes, "palettized_weights": self.palettized_ops}


def _feature_dict(feature: Feature) -> dict[str, Any]:
    name, shape, dtype = feature
    return {"name": name, "shape": list(shape), "dtype": dtype}


def inspect_package(package: Path) -> PackageInfo:
    """What an .mlpackage takes and gives, how large its weights are, and which ops its
    main function holds; read from its files, without loading the model (macOS only)."""
    ct = _ct()
    from coremltools.proto import FeatureTypes_pb2

    spec = ct.utils.load_spec(str(package))
    names = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType

    def features(entries: Any) -> list[Feature]:
        return [(f.name, tuple(f.type.multiArrayType.shape),
                 names.Name(f.type.multiArrayType.dataType).lower()) for f in entries]

    ops: Counter[str] = Counter()
    if spec.WhichOneof("Type") == "mlProgram":
        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                ops.update(op.type for op in block.operations)
    weights = package / WEIGHTS
    return PackageInfo(features(spec.description.input), features(spec.description.output),
                       weights.stat().st_size if weights.exists() else 0, ops)


def check_chunks(full: PackageInfo, first: PackageInfo, second: PackageInfo) -> None:
    """The chunks are the model cut in two: the first takes the model's inputs, the second
    gives its outputs, and what the second takes beyond the model's inputs is exactly what
    the first gives (names, shapes and types)."""
    full_inputs = set(full.inputs)
    problems = []
    if not set(first.inputs) <= full_inputs:
        problems.append(f"chunk 1 takes {sorted(set(first.inputs) - full_inputs)}, "
                        "which the model does not")
    extra = set(second.inputs) - full_inputs
    if extra != set(first.outputs):
        problems.append(f"chunk 2's inputs beyond the model's ({sorted(extra)}) are not "
                        f"chunk 1's outputs ({sorted(first.outputs)})")
    if set(second.outputs) != set(full.outputs):
        problems.append(f"chunk 2 gives {sorted(second.outputs)}, the model "
                        f"{sorted(full.outputs)}")
    if problems:
        raise VerificationFailed("Unet chunks", "; ".join(problems))


def compare_chunks_on_macos(full: Path, first: Path, second: Path) -> float:
    """PSNR of the chunked pipeline's output against the whole model's, on random inputs
    (Core ML predictions: macOS only)."""
    import numpy as np

    ct = _ct()
    cpu = ct.ComputeUnit.CPU_ONLY
    whole = ct.models.MLModel(str(full), compute_units=cpu)
    chunk1 = ct.models.MLModel(str(first), compute_units=cpu)
    chunk2 = ct.models.MLModel(str(second), compute_units=cpu)
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal(shape).astype(np.float32)
              for name, shape, _ in inspect_package(full).inputs}
    expected = whole.predict(inputs)
    middle = chunk1.predict(inputs)
    final = chunk2.predict({**inputs, **middle})
    from llmctl.convert.coreml.attention import psnr

    return min(psnr(expected[name], final[name]) for name in expected)


def compile_package(package: Path, out_dir: Path) -> Path:
    """xcrun coremlcompiler: .mlpackage -> .mlmodelc (what Apple's Swift pipeline loads;
    it saves Core ML compiling the model at each load). macOS with Xcode's tools only."""
    import subprocess

    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), str(out_dir)],
                            capture_output=True, text=True)
    compiled = out_dir / (package.name.removesuffix(".mlpackage") + ".mlmodelc")
    if result.returncode != 0 or not compiled.is_dir():
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [""]
        raise EngineFailure(f"xcrun coremlcompiler could not compile {package.name} (exit "
                            f"{result.returncode}): {last[0]}")
    return compiled


def can_compile() -> bool:
    import sys

    return sys.platform == "darwin" and shutil.which("xcrun") is not None


def library_versions(quantize: bool) -> dict[str, str]:
    """The versions that made a conversion (the report and the store's manifest)."""
    import importlib.metadata
    import platform

    from llmctl import __version__

    versions = {"llmctl": __version__, "python": platform.python_version(),
                "platform": f"{platform.system()}-{platform.machine()}"}
    packages = ["torch", "coremltools", "diffusers", "transformers", "numpy"]
    if quantize:
        packages.append("scikit-learn")
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def require_libraries(quantize: bool) -> None:
    """Say which libraries are missing, before anything starts."""
    import importlib.util

    needed = ["torch", "coremltools", "diffusers", "transformers"]
    if quantize:
        needed.append("sklearn")  # palettization's k-means
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join("scikit-learn" if n == "sklearn" else n for n in missing)
        raise EngineFailure(f"converting to Core ML needs {names}, which "
                            f"{'is' if len(missing) == 1 else 'are'} not installed; install: "
                            "pip install 'llmctl[coreml,diffusers]'")


def check_latent(value: int, factor: int, option: str) -> None:
    if value < 1 or value % factor:
        raise UsageError(f"{option} {value} does not fit this UNet",
                         hint=f"use a positive multiple of {factor} (the UNet halves the "
                         "latent that many times over)")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        os.unlink(path)
