"""ONNX Runtime GenAI folders: genai_config.json (the model's shape, its files, the
default search options) beside model.onnx, its external data file and the tokenizer files.

A folder published with several builds keeps each in a subfolder of its own (Microsoft's
`cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/`); a stored model holds one build, at
the top or in one such subfolder, and `genai_folder` finds it.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

CONFIG = "genai_config.json"


def genai_folder(path: Path) -> Path | None:
    """The folder holding the build's genai_config.json: `path` itself, else the one
    subfolder (at any depth) that holds one; None when there is none, or several."""
    if (path / CONFIG).is_file():
        return path
    found = sorted(p.parent for p in path.rglob(CONFIG) if p.is_file())
    return found[0] if len(found) == 1 else None


def build_roots(names: list[str]) -> list[str]:
    """The folders among a repository's file names that hold a build, "" for the top:
    genai_config.json with the .onnx graph beside it (a genai_config.json alone is no
    model). As `coreml.model_roots` is for Core ML variants."""
    from llmctl.formats import detect_format

    def folder_of(name: str) -> str:
        parent = PurePosixPath(name).parent.as_posix()
        return "" if parent == "." else parent

    folders = {folder_of(n) for n in names if PurePosixPath(n).name == CONFIG}
    return sorted(folder for folder in folders if (found := detect_format(
        [n for n in names if folder_of(n) == folder])) and found.format == "onnx")


def read_genai_config(folder: Path) -> dict[str, Any]:
    """genai_config.json of the build in `folder` (see genai_folder); {} when missing or
    unreadable."""
    build = genai_folder(folder)
    if build is None:
        return {}
    try:
        config = json.loads((build / CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(values cached per token, vocabulary size, trained context) from a genai config's
    "model" section; 0 for what it does not say."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    decoder = model.get("decoder") if isinstance(model.get("decoder"), dict) else {}

    def number(table: dict[str, Any], key: str) -> int:
        value = table.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    layers, kv_heads = number(decoder, "num_hidden_layers"), number(decoder,
                                                                    "num_key_value_heads")
    head = number(decoder, "head_size")
    return layers * kv_heads * 2 * head, number(model, "vocab_size"), number(model,
                                                                             "context_length")
