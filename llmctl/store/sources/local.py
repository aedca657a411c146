"""Models already on this machine: a .gguf file, or a folder holding one."""

from __future__ import annotations

from pathlib import Path

from llmctl.errors import UsageError
from llmctl.store.sources import LocalFiles

SUFFIX = ".gguf"


def locate(path: Path) -> LocalFiles:
    path = path.expanduser()
    if not path.exists():
        raise UsageError(f"no such file or folder: {path}")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
        if len(found) != 1:
            what = "no .gguf file" if not found else f"{len(found)} .gguf files"
            raise UsageError(f"folder {path} holds {what}",
                             hint="name the .gguf file to use" if found else None)
        path = found[0]
    elif path.suffix.lower() != SUFFIX:
        raise UsageError(f"{path} is not a .gguf file",
                         hint="this version stores and runs GGUF models")
    return LocalFiles([path.resolve()], origin={"type": "path", "path": str(path.resolve())})
