"""LLMCTL_HOME and the folders below it.

    $LLMCTL_HOME/
      blobs/sha256-<hex>          every model file, once, named by its content
      verified/sha256-<hex>       an empty marker: llmctl read that blob back and found
                                  its content to be its digest (checked before reuse)
      manifests/<name>/<tag>.json one per stored model; written last, atomically
      models/<id>/                a folder model (MLX, diffusers...) as engines open it:
                                  links to the blobs, named as the manifest names them
      tmp/                        work in progress, same filesystem as blobs (for renames)
        downloads/<key>.part      a download in progress, with <key>.json (its state)
        downloaded/<key>.json     what a finished download served (URL without
                                  credentials, digest, size, validators), for reuse
        locks/<key>.lock          held by the llmctl pulling that model or file
      store.lock                  held while manifests or blobs change
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from llmctl.errors import InvalidName, UsageError

ENV_HOME = "LLMCTL_HOME"

# -- names that become paths -----------------------------------------------------------------
# Every ID, digest, name and file name that comes from a user or from data (a manifest, a
# conversation file, a catalog entry, a download's state) and becomes a path in the store
# goes through one of these three, so that none can name a place outside it (issue 10: a
# conversation "id" of "../../x", a manifest digest of "../../x/y").

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def path_part(text: object, what: str) -> str:
    """`text` as one file or folder name in the store: letters, digits and '.', '_', '-',
    '@', '+', starting with a letter or digit, at most 200 characters (a file system takes
    255, and suffixes come on top). InvalidName otherwise."""
    if not isinstance(text, str) or not _PART.match(text):
        shown = text if isinstance(text, str) else type(text).__name__
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InvalidName(f"{what} '{shown}' is not a valid name",
                          hint="use letters, digits, '.', '_' and '-' (200 at most)")
    return text


def reference_part(reference: str) -> str:
    """A model reference (org/name:tag) as part of one file name, for the locks held
    while a model is pulled or converted: '/' -> '--', ':' -> '@'."""
    return reference.replace("/", "--").replace(":", "@")


def checked_digest(text: object) -> str:
    """A content digest as the store names blobs by: "sha256:" and 64 lower-case hex."""
    if not isinstance(text, str) or not _DIGEST.match(text):
        shown = str(text)[:80]
        raise InvalidName(f"'{shown}' is not a sha256 digest",
                          hint='a digest is "sha256:" followed by 64 hexadecimal digits')
    return text


def relative_name(text: object, what: str = "file name") -> PurePosixPath:
    """A file's name inside a model folder ("unet/config.json"): relative, no empty, '.'
    or '..' parts, no backslashes, NUL or control characters. Any other character is
    allowed (Hub repositories have spaces in file names)."""
    if not isinstance(text, str) or not text or len(text) > 1024:
        raise InvalidName(f"{what} {str(text)[:60]!r} is not a valid file name")
    path = PurePosixPath(text)
    bad = (text.startswith("/") or "\\" in text or any(ord(c) < 32 for c in text)
           or any(part in ("", ".", "..") for part in text.split("/")))
    if bad:
        raise InvalidName(f"{what} '{text[:60]}' points outside its folder",
                          hint="file names inside a model are relative, without '..'")
    return path


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
    def verified(self) -> Path:
        return self.root / "verified"

    @property
    def bench_history(self) -> Path:
        """The SQLite database of `llmctl bench` runs."""
        return self.root / "bench" / "history.db"

    @property
    def caches(self) -> Path:
        """Saved prompt caches, one folder per model (store.caches)."""
        return self.root / "caches"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def blob_path(self, digest: str) -> Path:
        """`digest` is "sha256:<hex>"; the file name avoids ':' for Windows' sake."""
        algorithm, _, hexdigest = checked_digest(digest).partition(":")
        return self.blobs / f"{algorithm}-{hexdigest}"

    def manifest_path(self, name: str, tag: str) -> Path:
        parts = name.split("/") if isinstance(name, str) else [name]
        if len(parts) > 2:
            raise InvalidName(f"model name '{name[:60]}' has more than one '/'")
        folders = [path_part(part, "model name") for part in parts]
        return self.manifests.joinpath(*folders, f"{path_part(tag, 'tag')}.json")

    def ensure(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"the store {self.root} is a file, not a folder",
                             hint=f"point {ENV_HOME} at a folder (or remove the file)")
        try:
            for folder in (self.blobs, self.manifests, self.tmp):
                folder.mkdir(parents=True, exist_ok=True)
        except (FileNotFoundError, NotADirectoryError, FileExistsError) as exc:
            # A parent that is a file, or a file system that makes no folders (/proc).
            raise UsageError(f"cannot make the store's folders in {self.root} "
                             f"({exc.strerror})",
                             hint=f"point {ENV_HOME} at a folder llmctl may write") from None

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
        return named_lock(self.tmp / "locks" / f"{path_part(key, 'lock')}.lock", on_wait,
                          blocking)


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
