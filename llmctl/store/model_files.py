"""A stored model's files as engines open them: each blob checked (there, of the size it was
verified with; hashed again on request), and folder models as a folder of links."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from llmctl.errors import VerificationFailed
from llmctl.store.blobs import BlobStore
from llmctl.store.layout import StoreLayout
from llmctl.store.manifest import Manifest, ManifestFile

if TYPE_CHECKING:
    from llmctl.formats.gguf import GGUFHeader


def verify_files(layout: StoreLayout, manifest: Manifest,
                 on_progress: Callable[[str, int, int], None] | None = None) -> None:
    """Hash every file of a stored model now; VerificationFailed naming the first one
    whose content is not its digest. Files found sound are remembered as verified."""
    blobs = BlobStore(layout)
    for entry in manifest.files:
        _checked_blob(layout, manifest, entry)
        report = (lambda done, total, name=entry.name: on_progress(name, done, total)
                  ) if on_progress else None
        if not blobs.verify(entry.digest, report):
            what = "its file" if len(manifest.files) == 1 else f"its file {entry.name}"
            raise _damaged(manifest, f"{what} does not hold the content it was stored with "
                                     f"({entry.digest})")


def is_verified(layout: StoreLayout, manifest: Manifest) -> bool:
    """Whether every file of the model was read back and found to hold its digest."""
    blobs = BlobStore(layout)
    return all(blobs.is_verified(f.digest) for f in manifest.files)


def check_file(layout: StoreLayout, manifest: Manifest) -> tuple[Path, GGUFHeader]:
    """The stored model's file and header, after the checks that catch a damaged store
    (a file deleted, truncated or overwritten since it was verified) before any engine
    opens it."""
    from llmctl.formats.gguf import read_header

    path = _checked_blob(layout, manifest, manifest.primary)
    try:
        header = read_header(path)
    except VerificationFailed as exc:
        raise _damaged(manifest, exc.reason) from None
    return path, header


def _damaged(manifest: Manifest, reason: str) -> VerificationFailed:
    return VerificationFailed(
        manifest.reference,
        f"{reason}; re-pull it: llmctl rm {manifest.reference} && "
        f"llmctl pull {manifest.reference}",
    )


def _checked_blob(layout: StoreLayout, manifest: Manifest, entry: ManifestFile) -> Path:
    """The blob of one of the model's files, after checking that it is there and has the
    size it was verified with (a stat: cheap enough for every run)."""
    path = BlobStore(layout).path(entry.digest)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        what = "its file" if len(manifest.files) == 1 else f"its file {entry.name}"
        raise _damaged(manifest, f"{what} is missing") from None
    if size != entry.size:
        what = "its file" if len(manifest.files) == 1 else entry.name
        raise _damaged(manifest, f"{what} is {size} bytes, expected {entry.size}")
    return path


def model_folder(layout: StoreLayout, manifest: Manifest) -> Path:
    """The stored model as a folder that engines open by path (mlx-lm, diffusers, Core ML):
    `models/<id>/` with one link per file, named as the manifest names it (`config.json`,
    `unet/diffusion_pytorch_model.safetensors`), each pointing at its blob.

    The folder is built under tmp/ and renamed into place, so an engine never sees half of
    it, and reused while every link still reaches its blob. The links are relative symbolic
    links: a hard link would keep a blob's data alive after `rm` deleted the blob (and make
    `rm` count the blob as freeing nothing), and relative ones survive moving LLMCTL_HOME.
    """
    entries = [(_safe_name(manifest, f.name), _checked_blob(layout, manifest, f))
               for f in manifest.files]
    folder = layout.models / manifest.id
    if _complete(folder, entries):
        return folder
    layout.ensure()
    layout.models.mkdir(exist_ok=True)
    # tmp/<x>/ and models/<id>/ lie at the same depth below the root, so a link's relative
    # target is the same in both places.
    building = Path(tempfile.mkdtemp(dir=layout.tmp, prefix=f"model-{manifest.id}-"))
    try:
        building.chmod(0o755)  # mkdtemp's folders are private; the store's are not
        for name, blob in entries:
            link = building.joinpath(*name.parts)
            link.parent.mkdir(parents=True, exist_ok=True)
            final = folder.joinpath(*name.parts)
            os.symlink(os.path.relpath(blob, final.parent), link)
        if folder.exists() or folder.is_symlink():  # stale: a blob was re-stored elsewhere
            stale = Path(tempfile.mkdtemp(dir=layout.tmp, prefix=f"stale-{manifest.id}-"))
            os.replace(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(building, folder)
        except OSError:
            # Another llmctl built the same folder a moment ago: use that one.
            if not _complete(folder, entries):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def _safe_name(manifest: Manifest, name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise VerificationFailed(manifest.reference,
                                 f"its file name '{name}' points outside the model's folder")
    return path


def _complete(folder: Path, entries: list[tuple[PurePosixPath, Path]]) -> bool:
    for name, blob in entries:
        link = folder.joinpath(*name.parts)
        if not link.is_symlink() or not link.exists() or not link.samefile(blob):
            return False
    return True
