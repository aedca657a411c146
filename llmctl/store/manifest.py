"""What a stored model is: its files (by digest), engine, format, source and metadata.

A manifest is the last thing written when a model is stored, with an atomic rename, so a
model is listed only once every file it names is in place and verified.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmctl.store.layout import StoreLayout, write_atomically

SCHEMA_VERSION = 1


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ManifestFile:
    name: str  # the file's name inside the model, e.g. "model.gguf"
    digest: str  # "sha256:<hex>"
    size: int


@dataclass
class Manifest:
    name: str
    tag: str
    kind: str  # "text" | "image"
    engine: str  # "llama" | "mlx" | "coreml" | "diffusers"
    format: str  # "gguf" | "mlx" | "coreml" | "diffusers"
    files: list[ManifestFile]
    source: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    schema: int = SCHEMA_VERSION
    # The digest as last written, so that listing need not hash (nor import hashlib).
    stored_digest: str | None = field(default=None, repr=False, compare=False)

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def digest(self) -> str:
        """A digest of the model's content (its files), stable across re-pulls and tags."""
        if self.stored_digest:
            return self.stored_digest
        import hashlib

        lines = sorted(f"{f.digest} {f.name}\n" for f in self.files)
        return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()

    @property
    def id(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def primary(self) -> ManifestFile:
        """The file an engine opens: the single file of a GGUF model."""
        return self.files[0]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["stored_digest"]
        data["id"] = self.id
        data["digest"] = self.digest
        data["size"] = self.size
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            name=data["name"],
            tag=data["tag"],
            kind=data["kind"],
            engine=data["engine"],
            format=data["format"],
            files=[ManifestFile(**f) for f in data["files"]],
            source=data.get("source", {}),
            metadata=data.get("metadata", {}),
            created=data["created"],
            schema=data.get("schema", SCHEMA_VERSION),
            stored_digest=data.get("digest"),
        )


def save(layout: StoreLayout, manifest: Manifest) -> Path:
    path = layout.manifest_path(manifest.name, manifest.tag)
    body = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    write_atomically(path, body.encode())
    return path


def load(layout: StoreLayout, name: str, tag: str) -> Manifest | None:
    path = layout.manifest_path(name, tag)
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def delete(layout: StoreLayout, manifest: Manifest) -> None:
    path = layout.manifest_path(manifest.name, manifest.tag)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    # Drop folders the deletion left empty, up to manifests/ itself.
    folder = path.parent
    while folder != layout.manifests and folder.is_relative_to(layout.manifests):
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent


def iter_manifests(layout: StoreLayout) -> Iterator[Manifest]:
    """Every stored model, in name order. Temporary files (".name.tmp") are not manifests."""
    root = layout.manifests
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            if filename.startswith(".") or not filename.endswith(".json"):
                continue
            path = Path(dirpath, filename)
            with contextlib.suppress(FileNotFoundError):  # removed by a concurrent rm
                yield Manifest.from_dict(json.loads(path.read_text()))


def modified_time(layout: StoreLayout, manifest: Manifest) -> float:
    return layout.manifest_path(manifest.name, manifest.tag).stat().st_mtime


@dataclass(frozen=True)
class StoredModel:
    manifest: Manifest
    modified: float  # when the model was stored (the manifest's mtime), seconds since epoch


def list_models(layout: StoreLayout) -> list[StoredModel]:
    """What `ls` shows. Kept here, beside the manifests, so that listing imports nothing
    more: `ls` runs in scripts' loops and on shell completion."""
    return [StoredModel(m, modified_time(layout, m)) for m in iter_manifests(layout)]


def store_size(models: list[StoredModel]) -> int:
    """Bytes the models use, each blob counted once however many models share it."""
    sizes = {f.digest: f.size for model in models for f in model.manifest.files}
    return sum(sizes.values())
