"""The source pipeline, checked without torch: a diffusers Stable Diffusion pipeline with
every component the options ask for (`inspect_pipeline`), the files the result takes from it
besides the models (`pipeline_files`), and the memory its conversion is expected to need."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.convert.coreml.options import CoremlOptions
from llmctl.errors import UsageError
from llmctl.store.resolve import Runnable
from llmctl.units import format_bytes


@dataclass(frozen=True)
class Pipeline:
    path: Path
    name: str
    geometry: Any  # export.Geometry
    tokenizer: tuple[Path, Path] | Path  # (vocab.json, merges.txt), or tokenizer.json


REQUIRED = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder",
            "tokenizer": "tokenizer"}


def inspect_pipeline(source: Runnable, options: CoremlOptions) -> Pipeline:
    """The pipeline's shapes, after checking it is a Stable Diffusion pipeline with every
    component the options ask for."""
    from llmctl.convert.coreml.export import Geometry, check_latent

    if source.kind != "image" or source.format != "diffusers":
        what = "an image" if source.kind == "image" else "a text"
        raise UsageError(f"{source.name} is {what} model ({source.format}), not a diffusers "
                         "Stable Diffusion pipeline",
                         hint="--to coreml converts Stable Diffusion pipelines (a diffusers "
                         "folder with model_index.json); text models convert --to mlx")
    folder = source.path
    index = _read_json(folder / "model_index.json", source.name)
    if index.get("text_encoder_2") or index.get("tokenizer_2"):
        raise UsageError(f"{source.name} is a {index.get('_class_name', 'SDXL')} pipeline "
                         "(two text encoders), which llmctl does not convert yet",
                         hint="Stable Diffusion 1.x and 2.x convert; for SDXL run Apple's "
                         "torch2coreml with --xl-version yourself")
    wanted = dict(REQUIRED)
    if options.safety_checker:
        wanted["safety_checker"] = "safety checker"
    for component, label in wanted.items():
        entry = index.get(component)
        if not entry or entry == [None, None] or not (folder / component).is_dir():
            hint = ("leave out --safety-checker" if component == "safety_checker"
                    else "convert a complete Stable Diffusion pipeline")
            raise UsageError(f"{source.name} has no {label} ('{component}' is missing from "
                             "the pipeline)", hint=hint)
    unet = _read_json(folder / "unet" / "config.json", source.name)
    vae = _read_json(folder / "vae" / "config.json", source.name)
    text = _read_json(folder / "text_encoder" / "config.json", source.name)
    tokenizer_config = _read_json(folder / "tokenizer" / "tokenizer_config.json", source.name,
                                  required=False)
    text_length = int(text.get("max_position_embeddings", 77))
    if isinstance(tokenizer_config.get("model_max_length"), int):
        text_length = min(text_length, tokenizer_config["model_max_length"])
    sample_size = unet.get("sample_size", 64)
    sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
    factor = 2 ** (len(unet.get("block_out_channels", [0])) - 1)
    latent_h = options.latent_h or sample_size
    latent_w = options.latent_w or sample_size
    check_latent(latent_h, factor, "--latent-h")
    check_latent(latent_w, factor, "--latent-w")
    safety_size = 224
    if options.safety_checker:
        checker = _read_json(folder / "safety_checker" / "config.json", source.name)
        safety_size = int((checker.get("vision_config") or {}).get("image_size", 224))
    geometry = Geometry(
        latent_h=latent_h, latent_w=latent_w,
        latent_channels=int(vae.get("latent_channels", 4)),
        vae_scale=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
        text_length=text_length, text_hidden=int(text.get("hidden_size", 768)),
        unet_in_channels=int(unet.get("in_channels", 4)),
        cross_attention_dim=int(unet.get("cross_attention_dim") or text.get("hidden_size")),
        safety_image_size=safety_size)
    tokenizer = folder / "tokenizer"
    if (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file():
        tokens: tuple[Path, Path] | Path = (tokenizer / "vocab.json", tokenizer / "merges.txt")
    elif (tokenizer / "tokenizer.json").is_file():
        tokens = tokenizer / "tokenizer.json"
    else:
        raise UsageError(f"{source.name}'s tokenizer has neither vocab.json and merges.txt "
                         "nor tokenizer.json", hint="convert a complete pipeline")
    return Pipeline(folder, source.name, geometry, tokens)


def _read_json(path: Path, model: str, required: bool = True) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if not required:
            return {}
        raise UsageError(f"{model} has no {path.parent.name}/{path.name}"
                         if path.name != "model_index.json" else
                         f"{model} is not a diffusers pipeline (no model_index.json)",
                         hint="--to coreml converts Stable Diffusion pipelines") from None
    except ValueError as exc:
        raise UsageError(f"{model}: {path.name} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def pipeline_files(pipeline: Pipeline, resources: Path) -> None:
    """The files besides the models: vocab.json and merges.txt as the source pipeline's
    tokenizer has them (Apple's script downloads CLIP's; a fine-tuned model's own are the
    right ones; a tokenizer saved only as tokenizer.json gives them from its BPE model),
    and the pipeline's scheduler and VAE configs (scheduler_config.json, vae_config.json:
    the scheduler it was trained with and the VAE's scaling factor, which llmctl's Core ML
    engine reads; Apple's pipelines ignore them)."""
    for config, name in (("scheduler/scheduler_config.json", "scheduler_config.json"),
                         ("vae/config.json", "vae_config.json")):
        if (pipeline.path / config).is_file():
            shutil.copyfile(pipeline.path / config, resources / name)
    if isinstance(pipeline.tokenizer, tuple):
        vocab, merges = pipeline.tokenizer
        shutil.copyfile(vocab, resources / "vocab.json")
        shutil.copyfile(merges, resources / "merges.txt")
        return
    model = json.loads(pipeline.tokenizer.read_text()).get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UsageError(f"{pipeline.name}'s tokenizer.json is not a BPE tokenizer",
                         hint="Apple's pipelines read CLIP's BPE vocab.json and merges.txt")
    (resources / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    lines = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (resources / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in lines))


# -- memory ------------------------------------------------------------------------------

# Converting a component holds its float32 weights in torch, coremltools' copy of them in
# its program and the float16 result: measured at 1.9x the float32 weights on top of what
# torch, diffusers and coremltools take once imported (0.6 GB), for the 220M-parameter
# UNet of benchmarks/convert_coreml.py (2.30 GB at the peak). The factor leans high.
MEMORY_PER_FP32_BYTE = 2.0
MEMORY_BASE = 700_000_000


def conversion_memory(pipeline: Pipeline) -> int:
    """The peak memory the conversion is expected to need: its largest component's."""
    from llmctl.formats.hf import weight_files
    from llmctl.formats.safetensors import tensors as safetensors_tensors

    largest = 0
    for component in ("unet", "text_encoder", "vae", "safety_checker"):
        count = 0
        for path in weight_files(pipeline.path / component):
            if path.suffix == ".safetensors":
                count += sum(n for _, n in safetensors_tensors(path).values())
            else:  # a pickle has no header to count from: assume float32
                count += path.stat().st_size // 4
        largest = max(largest, count)
    return MEMORY_BASE + int(largest * 4 * MEMORY_PER_FP32_BYTE)


def memory_warning(pipeline: Pipeline) -> str | None:
    from llmctl.host import MEMORY_SHARE, allowed_memory, usable_memory_bytes

    need, allowed = conversion_memory(pipeline), allowed_memory()
    if allowed is None or need <= allowed:
        return None
    return (f"converting {pipeline.name} needs about {format_bytes(need)} of memory at its "
            f"peak (the UNet), more than the {MEMORY_SHARE:.0%} of "
            f"{format_bytes(usable_memory_bytes())} llmctl plans for; it may be killed for "
            "lack of memory: finished components are kept and the same command continues "
            "from them")
