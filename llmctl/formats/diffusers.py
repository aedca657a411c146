"""diffusers pipelines: model_index.json names the components, each in a folder of its own
with a config and weights (see formats.hf for which weight files a folder loads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmctl.formats.hf import OTHER_WEIGHTS, pick_weights, with_index

INDEX = "model_index.json"


def components(index: Any) -> set[str]:
    """The component folders (unet, vae, text_encoder ...) a parsed model_index.json lists;
    a component given as [null, null] is absent."""
    if not isinstance(index, dict):
        return set()
    return {k for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and v and v[0]}


def read_components(path: Path) -> set[str]:
    """components() of the model_index.json at `path`; empty when unreadable."""
    try:
        return components(json.loads(path.read_text()))
    except (OSError, ValueError):
        return set()


def pipeline_files(names: list[str], folders: set[str]) -> list[str]:
    """The files a pipeline loads among repository names: model_index.json, and per
    component folder one copy of the weights (with its index) and the configs."""
    chosen = [INDEX] if INDEX in names else []
    for folder in sorted(folders):
        inside = [n for n in names if n.startswith(folder + "/") and n.count("/") == 1]
        weights = pick_weights(inside)
        text = [n for n in inside if n.endswith((".json", ".txt", ".model"))
                and not n.endswith(".index.json")]
        chosen += sorted({*weights, *with_index(weights, inside), *text})
    return chosen


def without_other_weights(names: list[str]) -> list[str]:
    """Names without other frameworks' copies of weights (.bin, .ckpt, .onnx ...) in the
    folders where safetensors are: diffusers loads the safetensors when both are there."""
    from pathlib import PurePosixPath

    with_tensors = {str(PurePosixPath(n).parent) for n in names if n.endswith(".safetensors")}
    return [n for n in names if not (PurePosixPath(n).suffix in OTHER_WEIGHTS
                                     and str(PurePosixPath(n).parent) in with_tensors)]


def default_size(folder: Path) -> tuple[int, int] | None:
    """A pipeline's own image size: the UNet's sample size times the VAE's scale (2 to the
    number of its down blocks less one), as diffusers computes it."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        sample = unet["sample_size"]
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(sample, list):
        return int(sample[1]) * scale, int(sample[0]) * scale
    return int(sample) * scale, int(sample) * scale
