"""LLMCTL_HOME and the folders below it.

    $LLMCTL_HOME/
      blobs/sha256-<hex>          every model file, once, named by its content
      manifests/<name>/<tag>.json one per stored model; written last, atomically
      tmp/                        work in progress, same filesystem as blobs (for renames)
      store.lock                  held while manifests or blobs change
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "LLMCTL_HOME"


def default_home() -> Path:
    configured = os.environ.get(ENV_HOME)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return platformdirs.user_data_path("llmctl", appauthor=False)


@dataclass(frozen=True)
class StoreLayout:
    root: Path

    @classmethod
    def default(cls) -> StoreLayout:
        return cls(default_home())

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def blob_path(self, digest: str) -> Path:
        """`digest` is "sha256:<hex>"; the file name avoids ':' for Windows' sake."""
        algorithm, _, hexdigest = digest.partition(":")
        return self.blobs / f"{algorithm}-{hexdigest}"

    def manifest_path(self, name: str, tag: str) -> Path:
        return self.manifests.joinpath(*name.split("/"), f"{tag}.json")

    def ensure(self) -> None:
        for folder in (self.blobs, self.manifests, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise changes to manifests and blobs between llmctl processes.

        Readers (ls, show, run) never take it: a manifest is replaced atomically, so they
        see either the old or the new one.
        """
        self.ensure()
        with open(self.root / "store.lock", "a+b") as handle:
            try:
                import fcntl
            except ImportError:  # Windows: no advisory locks; single-process use only
                yield
                return
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
