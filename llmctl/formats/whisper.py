"""Whisper speech models in the three layouts their engines read.

    ctranslate2   CTranslate2's conversion (faster-whisper): config.json, model.bin and
                  vocabulary.txt/.json (tokenizer.json beside them in most repositories)
    mlx-whisper   mlx-whisper's conversion: config.json with the model's dimensions
                  (n_mels, n_audio_ctx, ...) and weights.npz or weights.safetensors
    ggml          whisper.cpp's single file (ggml-tiny.bin, ...): the "ggml" magic, then
                  the hyper-parameters, the mel filters, the vocabulary and the tensors

Names alone tell the layouts apart (`detect_format` in this package asks `layout_of`);
`ggml_header` reads a ggml file's hyper-parameters without loading it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CT2_WEIGHTS = "model.bin"
CT2_VOCABULARIES = ("vocabulary.txt", "vocabulary.json")
MLX_WEIGHTS = ("weights.npz", "weights.safetensors")
GGML_MAGIC = 0x67676D6C  # "ggml", little-endian uint32 at offset 0


def layout_of(names: list[str]) -> str | None:
    """"ctranslate2", "mlx-whisper" or "ggml" for a Whisper model's file names (paths
    inside the model), None for anything else."""
    top = {PurePosixPath(n).as_posix() for n in names if "/" not in n}
    if len(names) == 1 and PurePosixPath(names[0]).suffix.lower() == ".bin" \
            and not PurePosixPath(names[0]).name.startswith("pytorch_model"):
        return "ggml"
    if "config.json" in top and CT2_WEIGHTS in top and top & set(CT2_VOCABULARIES):
        return "ctranslate2"
    if "config.json" in top and top & set(MLX_WEIGHTS) and not any(
            n.startswith("model") and n.endswith(".safetensors") for n in top):
        return "mlx-whisper"
    return None


@dataclass(frozen=True)
class GgmlHeader:
    """whisper.cpp's hyper-parameters, in the order the file stores them."""

    n_vocab: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int
    n_mels: int
    ftype: int


def ggml_header(path: Path) -> GgmlHeader | None:
    """The header of a whisper.cpp model file; None when the file is not one."""
    with open(path, "rb") as f:
        raw = f.read(4 + 11 * 4)
    if len(raw) < 48 or struct.unpack("<I", raw[:4])[0] != GGML_MAGIC:
        return None
    return GgmlHeader(*struct.unpack("<11i", raw[4:48]))


def model_dims(path: Path) -> dict[str, int]:
    """The dimensions a Whisper model states (n_mels, n_text_layer, ...), from whichever
    layout it is in; {} when it states none llmctl can read. CTranslate2's config.json
    holds no dimensions (model.bin does, in its own binary layout)."""
    if path.is_file():
        header = ggml_header(path)
        return vars(header).copy() if header else {}
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    return {k: v for k, v in config.items() if k.startswith("n_") and isinstance(v, int)}
