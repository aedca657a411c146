"""Core ML models: compiled (.mlmodelc) and packaged (.mlpackage) folders, where a
repository keeps them, and the compute units Core ML runs them on."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from llmctl.formats import hf

SUFFIXES = (".mlmodelc", ".mlpackage")  # compiled first: it loads without compiling again
# The compute units, as llmctl's options spell them -> coremltools' ComputeUnit names.
# Apple's tools spell them in capitals (--compute-unit CPU_AND_NE): both are accepted.
COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_and_gpu": "CPU_AND_GPU",
                 "cpu_only": "CPU_ONLY"}


def compute_unit(text: str) -> str | None:
    """llmctl's spelling ("cpu_and_ne") of a compute unit given in either spelling (or
    with dashes); None when it is none."""
    key = text.strip().lower().replace("-", "_")
    return key if key in COMPUTE_UNITS else None


def model_roots(names: list[str]) -> list[str]:
    """Folders holding Core ML models among repository names ("split_einsum/compiled"),
    "" for the top."""
    roots: set[str] = set()
    for name in names:
        parts = PurePosixPath(name).parts
        for i, part in enumerate(parts[:-1]):
            if part.endswith(SUFFIXES):
                roots.add("/".join(parts[:i]))
                break
    return sorted(roots)


# -- language models (llmctl.convert.coreml_lm writes them, llmctl.engines.coreml_text runs
# them) --------------------------------------------------------------------------------------

REPORT = "conversion.json"  # what the conversion recorded: options, interface, checks
KEY_CACHE = "keyCache"  # the state holding the keys: (layers, 1, kv_heads, context, head_dim)


def read_report(folder: Path) -> dict[str, Any]:
    """conversion.json, or {} where it is missing or unreadable."""
    return hf.read_config(folder, REPORT)


def context_of(report: dict[str, Any]) -> int:
    """The context the model's KV cache holds, as conversion.json records it (0: not
    said): the keyCache state's fourth dimension, else the options'."""
    for state in report.get("states", []):
        if isinstance(state, dict) and state.get("name") == KEY_CACHE:
            shape = state.get("shape") or []
            if len(shape) == 5 and isinstance(shape[3], int):
                return shape[3]
    options = report.get("options")
    value = options.get("context_length") if isinstance(options, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
