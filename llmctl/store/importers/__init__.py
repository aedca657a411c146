"""Other tools' model stores, read from their folders: each module here reads one tool's
layout and says what models it holds, as `FoundModel`s; `llmctl.store.imports` decides
what to do with each. An importer is a module with two functions, listed in IMPORTERS:

    find_root(given: Path | None) -> Path   the folder to read (UsageError if none)
    scan(root: Path) -> list[FoundModel]    the models in it, problems included

    ollama.py     Ollama's store (~/.ollama/models)
    hf_cache.py   the Hugging Face hub cache (~/.cache/huggingface/hub)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError
from llmctl.formats import ModelFormat

# The name `import --from` takes -> the module that reads that tool's store.
IMPORTERS = {"ollama": "llmctl.store.importers.ollama",
             "hf-cache": "llmctl.store.importers.hf_cache"}


def read(source: str, folder: Path | None) -> tuple[Path, list[FoundModel]]:
    """The folder read (the tool's default one when `folder` is None) and what it holds."""
    if source not in IMPORTERS:
        raise UsageError(f"unknown import source '{source}'",
                         hint=f"choose one of: {', '.join(IMPORTERS)}")
    module = importlib.import_module(IMPORTERS[source])
    root = module.find_root(folder)
    return root, module.scan(root)


@dataclass(frozen=True)
class FoundModel:
    """A model in another tool's folder, as it would be stored."""

    name: str
    tag: str
    format: ModelFormat | None
    paths: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # each file's name inside the model
    # "sha256:<hex>" where the other tool's layout already states it (Ollama's blob names,
    # the Hub's LFS blobs); None where it must be computed (small git-stored files).
    digests: list[str | None] = field(default_factory=list)
    origin: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why it cannot be imported

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.paths)
