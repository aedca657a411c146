"""Content-addressed files: `blobs/sha256-<hex>`, each kept once whatever uses it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from llmctl.store.layout import StoreLayout

CHUNK = 8 * 1024 * 1024

# Called with (bytes done, bytes total) while a file is read or written.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class BlobUsage:
    digest: str
    size: int
    path: Path
    # Bytes the disk gets back when the blob is deleted: zero for a link to a file that
    # lives on elsewhere (a pip package, a user's folder).
    reclaimable: int


def sha256_file(path: Path, on_progress: ProgressCallback | None = None) -> str:
    total = path.stat().st_size
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
            done += len(block)
            if on_progress:
                on_progress(done, total)
    return "sha256:" + digest.hexdigest()


class BlobStore:
    def __init__(self, layout: StoreLayout):
        self.layout = layout

    def path(self, digest: str) -> Path:
        return self.layout.blob_path(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def link(self, source: Path, digest: str) -> str:
        """Put `source` (already hashed to `digest`) in the store without copying it: a hard
        link where the filesystem allows, else a symbolic link. Returns how it was stored.
        Call under the store lock, together with saving the manifest that names it."""
        self.layout.ensure()
        target = self.path(digest)
        if target.exists():
            return "existing"
        tmp = self._tmp_name()
        try:
            os.link(source, tmp)
            how = "hardlink"
        except OSError as exc:
            # Another filesystem, or one without hard links.
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK,
                                 errno.EACCES):
                raise
            os.symlink(source.resolve(), tmp)
            how = "symlink"
        os.replace(tmp, target)
        return how

    def join_into_temp(
        self, parts: Iterable[Path], on_progress: ProgressCallback | None = None
    ) -> tuple[Path, str, int]:
        """Write the parts of a chunked file, joined in order, to a temporary file in the
        store and hash them on the way. This one is a copy: no link can join files.
        Returns (temporary path, digest, size); `adopt` or delete the file afterwards."""
        self.layout.ensure()
        parts = list(parts)
        total = sum(p.stat().st_size for p in parts)
        digest = hashlib.sha256()
        tmp = self._tmp_name()
        done = 0
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as handle:
                        while block := handle.read(CHUNK):
                            out.write(block)
                            digest.update(block)
                            done += len(block)
                            if on_progress:
                                on_progress(done, total)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return tmp, "sha256:" + digest.hexdigest(), total

    def adopt(self, tmp: Path, digest: str) -> str:
        """Move a finished temporary file to its blob name (call under the store lock)."""
        target = self.path(digest)
        if target.exists():
            tmp.unlink()
            return "existing"
        os.replace(tmp, target)
        return "copy"

    def usage(self, digest: str) -> BlobUsage | None:
        path = self.path(digest)
        try:
            link = path.lstat()
        except FileNotFoundError:
            return None
        if path.is_symlink():
            try:
                size = path.stat().st_size
            except FileNotFoundError:  # dangling: the linked file is gone
                size = 0
            return BlobUsage(digest, size, path, 0)
        reclaimable = link.st_size if link.st_nlink == 1 else 0
        return BlobUsage(digest, link.st_size, path, reclaimable)

    def all_digests(self) -> set[str]:
        if not self.layout.blobs.is_dir():
            return set()
        found = set()
        for entry in self.layout.blobs.iterdir():
            algorithm, sep, hexdigest = entry.name.partition("-")
            if sep and not entry.name.startswith("."):
                found.add(f"{algorithm}:{hexdigest}")
        return found

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def _tmp_name(self) -> Path:
        # In blobs/ itself so the final rename never crosses filesystems.
        fd, name = tempfile.mkstemp(dir=self.layout.blobs, prefix=".incoming-")
        os.close(fd)
        os.unlink(name)
        return Path(name)
