"""Bring a model into the store, and find the file an engine should open.

Pulling never copies what is already on disk: files from a path or a pip package are
linked. Every file is hashed and its header checked before the manifest is written, and
the manifest is written last, so a model is listed only when it is complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmctl.errors import ModelNotFound, SourceUnavailable, UsageError, VerificationFailed
from llmctl.store import manifest as manifests
from llmctl.store.blobs import BlobStore, sha256_file
from llmctl.store.catalog import Catalog, CatalogMatch
from llmctl.store.gguf_header import GGUFHeader, read_header
from llmctl.store.layout import StoreLayout
from llmctl.store.manifest import Manifest, ManifestFile
from llmctl.store.models import check_file
from llmctl.store.names import (
    DEFAULT_TAG,
    HubRef,
    NameRef,
    PathRef,
    UrlRef,
    find_by_digest,
    find_stored,
    parse_reference,
    sanitize_name,
    suggestions,
)
from llmctl.store.sources import LocalFiles, SourceMissing, bundled, local


@dataclass(frozen=True)
class PullEvent:
    """Progress of one step of a pull: `status` says what, `completed`/`total` how far."""

    model: str
    status: str
    completed: int = 0
    total: int = 0


OnEvent = Callable[[PullEvent], None]


@dataclass(frozen=True)
class PullResult:
    manifest: Manifest
    status: Literal["pulled", "exists"]
    how: str = "existing"  # "hardlink" | "symlink" | "copy" | "existing"


@dataclass(frozen=True)
class Runnable:
    """What an engine needs to open a model: its file and its description."""

    path: Path
    name: str
    kind: str
    format: str
    engine: str
    header: GGUFHeader
    manifest: Manifest | None  # None for a file run straight from a path


def _quiet(_event: PullEvent) -> None:
    pass


def _split_target(name: str | None, default_name: str) -> tuple[str, str]:
    if not name:
        return default_name, DEFAULT_TAG
    ref = parse_reference(name)
    if not isinstance(ref, NameRef):
        raise UsageError(f"--name '{name}' is not a model name", hint="use NAME[:TAG]")
    return ref.name, ref.tag or DEFAULT_TAG


def _register(
    layout: StoreLayout,
    files: LocalFiles,
    *,
    name: str,
    tag: str,
    expected_sha256: str | None,
    on_event: OnEvent,
    kind: str = "text",
    engine: str = "llama",
    format: str = "gguf",
) -> PullResult:
    """Hash and check the files, then link them and write the manifest. Only GGUF files
    are read and checked here; other formats arrive with their engines."""
    blobs = BlobStore(layout)
    reference = f"{name}:{tag}"
    layout.ensure()

    def progress(status: str) -> Callable[[int, int], None]:
        return lambda done, total: on_event(PullEvent(reference, status, done, total))

    tmp: Path | None = None
    try:
        if files.joined:
            tmp, digest, size = blobs.join_into_temp(files.paths, progress("joining parts"))
            checked = tmp
        else:
            checked = files.paths[0]
            digest = sha256_file(checked, progress("verifying sha256"))
            size = checked.stat().st_size
        if expected_sha256 and digest != "sha256:" + expected_sha256.removeprefix("sha256:"):
            raise VerificationFailed(
                reference,
                f"sha256 of {files.paths[0]} is {digest.removeprefix('sha256:')}, "
                f"expected {expected_sha256}",
            )
        header = read_header(checked)
        file_name = files.paths[0].name if not files.joined else f"{name.split('/')[-1]}.gguf"
        manifest = Manifest(
            name=name, tag=tag, kind=kind, engine=engine, format=format,
            files=[ManifestFile(file_name, digest, size)],
            source=files.origin, metadata=header.summary(),
        )
        on_event(PullEvent(reference, "writing manifest"))
        # Linking and the manifest go together under the lock, so that an `rm` running at
        # the same time cannot delete a blob this model is about to use.
        with layout.lock():
            how = blobs.adopt(tmp, digest) if tmp else blobs.link(checked, digest)
            tmp = None
            manifests.save(layout, manifest)
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    on_event(PullEvent(reference, "success"))
    return PullResult(manifest, "pulled", how)


def _from_catalog(layout: StoreLayout, match: CatalogMatch, on_event: OnEvent) -> PullResult:
    reasons = []
    for source in match.entry.sources:
        try:
            if source.type == "package":
                files = bundled.locate(source.options)
            elif source.type == "hf":
                if source.file(match.quantization) is None:
                    continue  # this repository does not publish that quantization
                raise SourceMissing(f"hf://{source.options['repo']}: downloading from "
                                    "Hugging Face is not in this version of llmctl yet")
            else:
                raise SourceMissing(f"unknown source type '{source.type}'")
        except SourceMissing as exc:
            reasons.append(str(exc))
            continue
        origin = dict(files.origin, quantization=match.quantization)
        files = LocalFiles(files.paths, files.joined, origin)
        entry = match.entry
        return _register(layout, files, name=entry.name, tag=match.tag,
                         expected_sha256=source.sha256(match.quantization or ""),
                         on_event=on_event, kind=entry.kind, engine=entry.engine,
                         format=entry.format)
    raise SourceUnavailable(match.reference, reasons)


def pull(
    text: str,
    layout: StoreLayout,
    catalog: Catalog,
    *,
    name: str | None = None,
    force: bool = False,
    on_event: OnEvent = _quiet,
) -> PullResult:
    """Store the model `text` names. A model already stored is left alone unless `force`."""
    ref = parse_reference(text)
    if isinstance(ref, HubRef | UrlRef):
        raise UsageError(
            f"cannot pull '{text}': downloads from hf:// and https:// are not in this "
            "version of llmctl yet",
            hint="pull a catalog model (llmctl pull smollm2) or a local .gguf file",
        )
    if isinstance(ref, PathRef):
        files = local.locate(ref.path)
        target_name, tag = _split_target(name, sanitize_name(files.paths[0].stem))
        return _register(layout, files, name=target_name, tag=tag, expected_sha256=None,
                         on_event=on_event)
    if name:
        raise UsageError("--name applies only to pulls from a path")
    if not force and (stored := find_stored(layout, catalog, ref)):
        return PullResult(stored, "exists")
    match = catalog.find(ref.name, ref.tag)
    if match is None:
        raise ModelNotFound(text, suggestions(text, layout, catalog))
    return _from_catalog(layout, match, on_event)


def runnable(
    text: str,
    layout: StoreLayout,
    catalog: Catalog,
    *,
    on_event: OnEvent = _quiet,
) -> Runnable:
    """The model to run for `text`: a stored model, a catalog model (pulled first, as
    Ollama does), or a file given by path (run in place, not stored)."""
    ref = parse_reference(text)
    if isinstance(ref, PathRef):
        path = local.locate(ref.path).paths[0]
        header = read_header(path)
        return Runnable(path, path.stem, "text", "gguf", "llama", header, None)
    if isinstance(ref, HubRef | UrlRef):
        raise UsageError(f"cannot run '{text}' directly",
                         hint="network sources come in a later version; pull a catalog model")
    manifest = find_stored(layout, catalog, ref)
    if manifest is None and ref.tag is None:
        manifest = find_by_digest(layout, ref.name)
    if manifest is None:
        match = catalog.find(ref.name, ref.tag)
        if match is None:
            raise ModelNotFound(text, suggestions(text, layout, catalog))
        on_event(PullEvent(match.reference, "pulling (not in the store yet)"))
        manifest = _from_catalog(layout, match, on_event).manifest
    path, header = check_file(layout, manifest)
    return Runnable(path, manifest.reference, manifest.kind, manifest.format, manifest.engine,
                    header, manifest)
