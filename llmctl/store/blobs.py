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
    """The blobs, and which of them llmctl has read back and found to hold their digest.

    A blob may be reused by a later model with the same digest. Its name alone proves
    nothing (issue 10: an Ollama store crafted with a blob named after SmolLM2's sha256 but
    holding other bytes poisoned every later pull of SmolLM2), so a blob is reused only once
    its content was checked, and that check is remembered: an empty marker file
    `verified/sha256-<hex>`, written after the check and deleted with the blob.
    """

    def __init__(self, layout: StoreLayout):
        self.layout = layout

    def path(self, digest: str) -> Path:
        return self.layout.blob_path(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    # -- verification ----------------------------------------------------------------------

    def _marker(self, digest: str) -> Path:
        return self.layout.verified / self.path(digest).name

    def is_verified(self, digest: str) -> bool:
        return self._marker(digest).exists()

    def mark_verified(self, digest: str) -> None:
        marker = self._marker(digest)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def verify(self, digest: str, on_progress: ProgressCallback | None = None) -> bool:
        """Hash the stored blob; True (and remembered) when it holds `digest`."""
        try:
            good = sha256_file(self.path(digest), on_progress) == digest
        except FileNotFoundError:
            return False
        if good:
            self.mark_verified(digest)
        else:
            self._marker(digest).unlink(missing_ok=True)
        return good

    def _reusable(self, target: Path, source: Path | None, digest: str) -> bool:
        """Whether the blob already stored under `digest` may stand for a file that was
        just hashed to it (`source`): the same file, or a blob checked now or before."""
        if source is not None:
            with contextlib.suppress(OSError):
                if target.samefile(source):
                    self.mark_verified(digest)
                    return True
        if self.is_verified(digest):
            return True
        return self.verify(digest)

    # -- adding ----------------------------------------------------------------------------

    def link(self, source: Path, digest: str) -> str:
        """Put `source` (already hashed to `digest`) in the store without copying it: a hard
        link where the filesystem allows, else a symbolic link. Returns how it was stored
        ("existing" when a sound blob of that digest was there). A blob of that name whose
        content is not `digest` is replaced. Call under the store lock, together with
        saving the manifest that names it."""
        self.layout.ensure()
        target = self.path(digest)
        if target.exists() and self._reusable(target, source, digest):
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
        self.mark_verified(digest)
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
        """Move a finished temporary file (hashed to `digest`) to its blob name, unless a
        sound blob of that digest is there already (call under the store lock)."""
        target = self.path(digest)
        if target.exists() and self._reusable(target, tmp, digest):
            tmp.unlink()
            return "existing"
        os.replace(tmp, target)
        self.mark_verified(digest)
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
            if sep and not entry.name.startswith(".") and algorithm == "sha256":
                found.add(f"{algorithm}:{hexdigest}")
        return found

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()
        self._marker(digest).unlink(missing_ok=True)

    def _tmp_name(self) -> Path:
        # In blobs/ itself so the final rename never crosses filesystems.
        fd, name = tempfile.mkstemp(dir=self.layout.blobs, prefix=".incoming-")
        os.close(fd)
        os.unlink(name)
        return Path(name)
