"""Where a model's files come from. Each module turns one kind of source into local files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SourceMissing(Exception):
    """This source cannot provide the model here; the next source may. The message says
    why, and what would make it work."""


@dataclass(frozen=True)
class LocalFiles:
    """Files on this machine that make up a model, ready to be linked into the store."""

    paths: list[Path]
    # True when the paths are consecutive parts of one file (a model split into chunks).
    joined: bool = False
    # Recorded in the manifest as where the model came from.
    origin: dict[str, Any] = field(default_factory=dict)
