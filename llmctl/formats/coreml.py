"""Core ML models: compiled (.mlmodelc) and packaged (.mlpackage) folders, where a
repository keeps them, and the compute units Core ML runs them on."""

from __future__ import annotations

from pathlib import PurePosixPath

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
