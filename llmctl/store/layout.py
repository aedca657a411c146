"""LLMCTL_HOME and the folders below it.

    $LLMCTL_HOME/
      blobs/sha256-<hex>          every model file, once, named by its content
      manifests/<name>/<tag>.json one per stored model; written last, atomically
      models/<id>/                a folder model (MLX, diffusers...) as engines open it:
                                  links to the blobs, named as the manifest names them
      tmp/                        work in progress, same filesystem as blobs (for renames)
        downloads/<key>.part      a download in progress, with <key>.json (its state)
        locks/<key>.lock          held by the llmctl pulling that model or file
      store.lock                  held while manifests or blobs change
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
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
    def models(self) -> Path:
        return self.root / "models"

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
        with named_lock(self.root / "store.lock"):
            yield

    @property
    def downloads(self) -> Path:
        return self.tmp / "downloads"

    def work_lock(self, key: str, on_wait: Callable[[], None] | None = None,
                  blocking: bool = True) -> contextlib.AbstractContextManager[None]:
        """Held while one process pulls one thing (a model, a file): a second `llmctl
        pull` of the same thing waits for the first, then finds it done."""
        return named_lock(self.tmp / "locks" / f"{key}.lock", on_wait, blocking)


@contextlib.contextmanager
def named_lock(path: Path, on_wait: Callable[[], None] | None = None,
               blocking: bool = True) -> Iterator[None]:
    """An exclusive lock between processes on `path`, released when the holder exits or
    is killed (the kernel drops flock locks with the process). `on_wait` is called once
    if another process holds it, before waiting for it; with `blocking=False`,
    BlockingIOError is raised instead of waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; single-process use only
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                raise
            if on_wait:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, data: bytes, sync: bool = True) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half.
    `sync=False` skips the fsync, for files rewritten many times a second whose loss in a
    power cut costs nothing (a download's progress)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
