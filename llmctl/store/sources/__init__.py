"""Where a model's files come from. Each module turns one kind of source into local files.

    bundled.py   files shipped in a pip-installed package
    local.py     a file or folder the user names
    url.py       plain https:// downloads (through llmctl.store.download)
    hf.py        Hugging Face repositories (through huggingface_hub and its cache)

A catalog source (a [[model.sources]] table) is fetched through one contract: the module
SOURCES names for its type has

    catalog_files(layout, options, quantization, pull_options, *, on_progress, model)
        -> a context manager giving LocalFiles, held while the files are stored

raising SourceMissing when it cannot provide the model here (the next source may). Adding
a source type: write that function in a module of its own, add a row to SOURCES, and let
llmctl.store.catalog.check_source know its fields.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmctl.store.layout import StoreLayout


# Source type -> the module that fetches it (imported when a pull needs it: huggingface_hub
# and httpx are not start-up's business).
SOURCES = {"package": "llmctl.store.sources.bundled", "hf": "llmctl.store.sources.hf",
           "url": "llmctl.store.sources.url"}
# The source types that use the network: none of them is tried under --offline.
NETWORK = {"hf", "url"}
OFFLINE_ENV = "LLMCTL_OFFLINE"
OFFLINE_REASON = "--offline: nothing is downloaded (run without --offline to pull it)"


def offline() -> bool:
    """Whether `--offline` (or LLMCTL_OFFLINE=1) forbids every network access."""
    import os

    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")
# (file name, bytes done, bytes total) while a source fetches a file.
FileProgress = Callable[[str, int, int], None]


class SourceMissing(Exception):
    """This source cannot provide the model here; the next source may. The message says
    why, and what would make it work."""


@dataclass(frozen=True)
class LocalFiles:
    """Files on this machine that make up a model, ready to be put into the store."""

    paths: list[Path]
    # True when the paths are consecutive parts of one file (a model split into chunks).
    joined: bool = False
    # Recorded in the manifest as where the model came from.
    origin: dict[str, Any] = field(default_factory=dict)
    # Each file's name inside the model ("model.gguf", "unet/config.json"); default: the
    # path's own name. Several files make a folder model (MLX, diffusers, Core ML).
    names: list[str] | None = None
    # sha256 digests ("sha256:<hex>") of the paths that llmctl computed itself, while
    # downloading, so that the files are not read a second time.
    digests: list[str] | None = None
    # Digests another tool's layout states for the paths (Ollama's and the Hub cache's
    # blob names); None where it states none. Checked against the content, never trusted.
    claimed: list[str | None] | None = None
    # True when the paths are temporary files of llmctl's own (downloads): they are moved
    # into the store. Otherwise they belong to someone else and are linked.
    owned: bool = False
    # Called once the store has the files (a download's leftovers are deleted then).
    cleanup: Callable[[], None] | None = None

    @property
    def file_names(self) -> list[str]:
        return self.names if self.names is not None else [p.name for p in self.paths]


@dataclass(frozen=True)
class PullOptions:
    """How network sources download: parts fetched at once per file, and a cap on the
    total speed in bytes per second (None: no cap)."""

    parts: int = 4
    rate_limit: int | None = None


def catalog_files(kind: str, layout: StoreLayout, options: dict[str, Any],
                  quantization: str | None, pull_options: PullOptions, *,
                  on_progress: FileProgress, model: str
                  ) -> contextlib.AbstractContextManager[LocalFiles]:
    """The files a catalog source of type `kind` provides (see the module docstring)."""
    import importlib

    if kind not in SOURCES:
        raise SourceMissing(f"unknown source type '{kind}'")
    if kind in NETWORK and offline():  # checked before anything that could open a socket
        raise SourceMissing(OFFLINE_REASON)
    module = importlib.import_module(SOURCES[kind])
    return module.catalog_files(layout, options, quantization, pull_options,
                                on_progress=on_progress, model=model)
