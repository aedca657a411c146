"""The prompt caches the store keeps: the KV state `chat` saves with a conversation, so
that resuming it does not process its whole history again.

    $LLMCTL_HOME/caches/<model ID>/<conversation ID>.kv

They belong to the model they were made by: `rm MODEL` deletes its folder with the model,
`rm --caches` deletes them all, and `ls` counts them in the store's size. A cache a user
names (`run --prompt-cache FILE`) is the user's file, kept where they put it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from llmctl.store.layout import StoreLayout, path_part

SUFFIX = ".kv"


def conversation_cache(layout: StoreLayout, model_id: str, conversation_id: str) -> Path:
    folder = layout.caches / path_part(model_id, "model ID")
    return folder / f"{path_part(conversation_id, 'conversation ID')}{SUFFIX}"


@dataclass(frozen=True)
class CacheFiles:
    files: list[Path]
    size: int


def _folders(layout: StoreLayout, model_ids: list[str] | None) -> list[Path]:
    """The cache folders of the models with these IDs (all when None) that exist."""
    if model_ids is None:
        return [p for p in layout.caches.iterdir() if p.is_dir()] if layout.caches.is_dir() \
            else []
    return [f for f in (layout.caches / path_part(i, "model ID") for i in model_ids)
            if f.is_dir()]


def find_caches(layout: StoreLayout, model_ids: list[str] | None = None) -> CacheFiles:
    """The saved caches (of the models with these IDs, or all)."""
    files = sorted(f for folder in _folders(layout, model_ids)
                   for f in folder.iterdir() if f.is_file())
    return CacheFiles(files, sum(_size(f) for f in files))


def remove_caches(layout: StoreLayout, model_ids: list[str] | None = None) -> CacheFiles:
    """Delete the saved caches (of these models, or all); what was deleted."""
    found = find_caches(layout, model_ids)
    for folder in _folders(layout, model_ids):
        shutil.rmtree(folder, ignore_errors=True)
    return found


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # deleted meanwhile
        return 0
