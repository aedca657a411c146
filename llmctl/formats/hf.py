"""Hugging Face model folders: config.json, which weight files a folder loads, its
tokenizer files and chat template; and which files of a Whisper conversion (CTranslate2,
mlx-whisper) make the model. Names are repository paths ("model.safetensors",
"unet/config.json"): the same rules serve a Hub listing, a cache snapshot and a folder."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

# Text files a tokenizer or chat template may live in, beside the weights.
TOKENIZER_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*")
# What a text model's folder needs beside its weights: configs, tokenizers, templates.
TEXT_SUFFIXES = {".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken"}
# Weights in formats llmctl does not run, skipped when safetensors sit beside them.
OTHER_WEIGHTS = {".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".onnx_data"}


# -- config.json ---------------------------------------------------------------------------

def read_config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    """The folder's config.json (or the file `name` in it: a stored blob's own name);
    {} when it is missing, unreadable or not an object."""
    try:
        config = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def mlx_quantized(config: dict[str, Any]) -> bool:
    """Whether MLX quantized the checkpoint: mlx-lm writes a "quantization" table (bits,
    group size) that no other library reads; transformers' own are "quantization_config"."""
    return isinstance(config.get("quantization"), dict)


def text_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of the text model a config describes: a vision-language model nests
    them under "text_config", which wins over the top level."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def trained_context(config: dict[str, Any]) -> int:
    """The context the model was trained for (0: the config does not say)."""
    return _int(text_settings(config).get("max_position_embeddings"))


def vocabulary(config: dict[str, Any]) -> int:
    """The width of the model's output (its logits): what top-k is taken over."""
    return _int(text_settings(config).get("vocab_size"))


def chat_template(folder: Path) -> str | None:
    """The chat template: chat_template.jinja, else tokenizer_config.json's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get(
            "chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None


# -- which weight files ----------------------------------------------------------------------

def special_token(folder: Path, key: str) -> str:
    """A special token's text from tokenizer_config.json ("" when it does not say): the
    bos_token and eos_token chat templates write."""
    value = read_config(folder, "tokenizer_config.json").get(key)
    if isinstance(value, dict):  # older files: {"content": "<s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def weight_family(name: str) -> str:
    """"model-00001-of-00002.safetensors" and "model.safetensors.index.json" both belong
    to "model.safetensors"."""
    name = PurePosixPath(name).name.removesuffix(".index.json")
    return re.sub(r"-\d+-of-\d+(?=\.[a-z]+$)", "", name)


def is_variant(name: str) -> bool:
    """"diffusion_pytorch_model.fp16.safetensors" is a variant (a second copy of the
    weights at another precision) of "diffusion_pytorch_model.safetensors"."""
    stem = weight_family(name).rsplit(".", 1)[0]
    return "." in stem


def variant(name: str) -> str | None:
    """"fp16" for "model.fp16.safetensors" (shards too); None for the plain weights."""
    return weight_family(name).split(".")[-2] if is_variant(name) else None


def pick_weights(names: list[str]) -> list[str]:
    """One copy of the weights, as from_pretrained loads them: safetensors rather than
    pickles (.bin: duplicates that are slower and unsafe to load), the full-precision
    files rather than variants, else one variant (fp16 first: some repositories publish
    only that)."""
    tensors = [n for n in names if n.endswith(".safetensors")]
    if not tensors:
        tensors = [n for n in names if n.endswith(".bin")]
    plain = [n for n in tensors if not is_variant(n)]
    if plain:
        return plain
    families = sorted({weight_family(n) for n in tensors},
                      key=lambda f: (".fp16." not in f, f))
    return [n for n in tensors if families and weight_family(n) == families[0]]


def with_index(weights: list[str], names: list[str]) -> list[str]:
    """The shard indexes (model.safetensors.index.json) of the chosen weights."""
    families = {weight_family(w) for w in weights}
    return [n for n in names
            if n.endswith(".index.json") and weight_family(n) in families]


def checkpoint_files(top: list[str]) -> list[str]:
    """The files of a text checkpoint among a folder's top-level names: one copy of the
    weights, their index, configs, tokenizer files and chat template."""
    tensors = [f for f in top if f.endswith(".safetensors")]
    # Mistral-style repos carry the same weights twice: sharded "model-*" files for
    # Transformers and MLX, and "consolidated.safetensors" for their own tools.
    if any(not f.startswith("consolidated") for f in tensors):
        tensors = [f for f in tensors if not f.startswith("consolidated")]
    weights = pick_weights(tensors)
    text = [f for f in top if any(fnmatch.fnmatchcase(f, p) for p in TOKENIZER_PATTERNS)
            and not f.endswith(".index.json")]
    return sorted({*weights, *with_index(weights, top), *text})


# What a Whisper conversion needs beside its weights: config.json, preprocessor_config.json,
# tokenizer.json and CTranslate2's vocabulary.txt/.json (faster-whisper downloads the same).
SPEECH_SUFFIXES = {".json", ".txt"}


def speech_files(top: list[str]) -> list[str] | None:
    """The files of a Whisper conversion among a folder's top-level names: its weights
    (CTranslate2's model.bin, mlx-whisper's weights.*) and its JSON and text files; None
    when the names are not one. Asked before `checkpoint_files`: CTranslate2's model.bin
    is no pickle of transformers', and an mlx-whisper folder no transformers checkpoint."""
    from llmctl.formats.whisper import CT2_WEIGHTS, MLX_WEIGHTS, layout_of

    layout = layout_of(top)
    if layout not in ("ctranslate2", "mlx-whisper"):
        return None  # a lone ggml file is named by its file name, not found by a folder rule
    weights = {CT2_WEIGHTS} if layout == "ctranslate2" else set(MLX_WEIGHTS)
    return sorted(f for f in top if f in weights or (
        PurePosixPath(f).suffix in SPEECH_SUFFIXES and not f.endswith(".index.json")))


def weight_files(folder: Path) -> list[Path]:
    """The weight files from_pretrained loads from one folder (see pick_weights)."""
    names = sorted(p.name for p in folder.glob("*") if p.is_file())
    return [folder / name for name in pick_weights(names)]


def folder_variant(folder: Path) -> str | None:
    """The variant ("fp16") a folder's weights are only there as (from_pretrained's
    `variant=`), None when it has the plain weights."""
    files = weight_files(folder)
    return variant(files[0].name) if files else None
