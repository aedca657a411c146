"""What a stored model is: its files (by digest), engine, format, source and metadata.

A manifest is the last thing written when a model is stored, with an atomic rename, so a
model is listed only once every file it names is in place and verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import InvalidName, StoreWarning
from llmctl.store.layout import (
    StoreLayout,
    checked_digest,
    path_part,
    relative_name,
    write_atomically,
)

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
    engine: str  # the engine it was stored with: "llama", "mlx", "transformers", "onnx", ...
    format: str  # a key of llmctl.formats.FORMATS: "gguf", "safetensors", "mlx", "onnx", ...
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

    @property
    def engine_here(self) -> str:
        """The engine that runs the model on this machine unless --engine says otherwise:
        its format's default here (a safetensors checkpoint stored on a Mac, where MLX is
        the default, runs on transformers on Linux), else the engine it was stored with."""
        from llmctl.formats import FORMATS

        info = FORMATS.get(self.format)
        return info.default_engine if info else self.engine

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["stored_digest"]
        data["id"] = self.id
        data["digest"] = self.digest
        data["size"] = self.size
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """A manifest from its JSON, checked: a manifest is data on disk that anything
        may have written, and its digests and file names become paths (`rm` deletes
        them, `show` reads them). ValueError (InvalidName is one) when it is not sound."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            files = [_file(f) for f in data["files"]]
            strings = {key: data[key] for key in ("name", "tag", "kind", "engine", "format",
                                                  "created")}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or malformed {exc}") from None
        if not files or not all(isinstance(v, str) for v in strings.values()):
            raise ValueError("malformed fields")
        for part in strings["name"].split("/"):
            path_part(part, "model name")
        path_part(strings["tag"], "tag")
        source, metadata = data.get("source", {}), data.get("metadata", {})
        if not isinstance(source, dict) or not isinstance(metadata, dict):
            raise ValueError("malformed source or metadata")
        digest = data.get("digest")
        return cls(files=files, source=source, metadata=metadata,
                   schema=data.get("schema", SCHEMA_VERSION),
                   stored_digest=checked_digest(digest) if digest is not None else None,
                   **strings)


def _file(entry: Any) -> ManifestFile:
    if not isinstance(entry, dict) or not {"name", "digest", "size"} <= set(entry):
        raise ValueError("malformed file entry")
    size = entry["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"file size {size!r} is not a number of bytes")
    relative_name(entry["name"])
    return ManifestFile(entry["name"], checked_digest(entry["digest"]), size)


@dataclass(frozen=True)
class BrokenManifest:
    """A file under manifests/ that is not a sound manifest (truncated, edited, written
    by something else): skipped by every reader, removed by `llmctl rm --broken`."""

    path: Path
    reason: str


def read(layout: StoreLayout, path: Path) -> Manifest:
    """The manifest in `path`; ValueError (with the reason) when it is unreadable or is
    not the manifest its place in the store says (manifests/<name>/<tag>.json)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    try:
        manifest = Manifest.from_dict(data)
        where = layout.manifest_path(manifest.name, manifest.tag)
    except InvalidName as exc:
        raise ValueError(str(exc)) from None
    if where != path:
        raise ValueError(f"it names {manifest.reference}, which belongs elsewhere")
    return manifest


def _skipped(path: Path, reason: str) -> None:
    warnings.warn(StoreWarning(
        f"skipped the unreadable manifest {path} ({reason}); remove it with "
        "`llmctl rm --broken` (or delete the file)"), stacklevel=3)


def save(layout: StoreLayout, manifest: Manifest) -> Path:
    path = layout.manifest_path(manifest.name, manifest.tag)
    body = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    write_atomically(path, body.encode())
    return path


def load(layout: StoreLayout, name: str, tag: str) -> Manifest | None:
    """The stored model name:tag; None when there is none, or only an unreadable manifest
    (with a warning: pulling the model again replaces it)."""
    path = layout.manifest_path(name, tag)
    try:
        return read(layout, path)
    except FileNotFoundError:
        return None
    except (ValueError, IsADirectoryError) as exc:
        _skipped(path, str(exc) if isinstance(exc, ValueError) else "a folder")
        return None


def delete(layout: StoreLayout, manifest: Manifest) -> None:
    path = layout.manifest_path(manifest.name, manifest.tag)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    _prune(layout, path.parent)


def _prune(layout: StoreLayout, folder: Path) -> None:
    """Drop folders a deletion left empty, up to manifests/ itself."""
    while folder != layout.manifests and folder.is_relative_to(layout.manifests):
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent


def _manifest_files(layout: StoreLayout) -> Iterator[Path]:
    """Every file that should be a manifest, in name order. Temporary files (".name.tmp")
    are not manifests."""
    root = layout.manifests
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            if not filename.startswith(".") and filename.endswith(".json"):
                yield Path(dirpath, filename)


def iter_manifests(layout: StoreLayout) -> Iterator[Manifest]:
    """Every stored model, in name order. An unreadable manifest is skipped with a
    warning: one damaged file must not take `ls`, `rm` or name lookups down with it."""
    for path in _manifest_files(layout):
        try:
            yield read(layout, path)
        except FileNotFoundError:  # removed by a concurrent rm
            continue
        except (ValueError, OSError) as exc:
            _skipped(path, str(exc) if isinstance(exc, ValueError) else
                     exc.strerror or type(exc).__name__)


def broken_manifests(layout: StoreLayout) -> list[BrokenManifest]:
    """The files under manifests/ that iter_manifests skips."""
    found = []
    for path in _manifest_files(layout):
        try:
            read(layout, path)
        except FileNotFoundError:
            continue
        except (ValueError, OSError) as exc:
            found.append(BrokenManifest(path, str(exc) if isinstance(exc, ValueError) else
                                        exc.strerror or type(exc).__name__))
    return found


def delete_broken(layout: StoreLayout, broken: BrokenManifest) -> None:
    """Delete an unreadable manifest file (only a file under manifests/)."""
    if layout.manifests not in broken.path.parents:
        raise ValueError(f"{broken.path} is not under {layout.manifests}")
    with contextlib.suppress(FileNotFoundError):
        broken.path.unlink()
    _prune(layout, broken.path.parent)


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
