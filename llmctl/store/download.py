"""llmctl's HTTP downloader: parallel range requests, resume after any interruption,
retries, sha256 while downloading, a free-space check first, an optional speed cap.

A download in progress is two files under `$LLMCTL_HOME/tmp/downloads/`:

    <key>.part   the data, at its final size from the start (holes where parts are missing)
    <key>.json   its state: URL, size, validators (ETag, Last-Modified) and per part how
                 many bytes from its start are on disk

The state is written (atomically) a few times a second, always after the data it
describes, so after a kill -9 or a power cut it never claims bytes that were not written:
the next run refetches at most what arrived since the last state write. Data written but
lost in a power cut before the kernel flushed it is caught by the sha256 check.

The key is derived from the expected sha256 when there is one (so alternative URLs of the
same file continue one download), else from the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl import __version__
from llmctl.errors import DownloadFailed, InsufficientResources, VerificationFailed
from llmctl.store.layout import StoreLayout, write_atomically

if TYPE_CHECKING:
    import httpx

# Parts smaller than this are not worth a connection of their own.
MIN_PART_SIZE = 8 * 1024 * 1024
# Attempts per part without progress before the URL is given up (then the next URL).
MAX_ATTEMPTS = 6
STATE_INTERVAL = 0.25  # seconds between state writes
HASH_STEP = 32 * 1024 * 1024  # bytes hashed between progress checks
READ_SIZE = 1024 * 1024
# Keep this much free beyond the download itself: a full disk breaks more than llmctl.
DISK_MARGIN = 64 * 1024 * 1024
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}

# (bytes done, bytes total; 0 when the server did not say)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DownloadRequest:
    urls: list[str]  # tried in order: the first, then the alternatives
    sha256: str | None = None  # hex digest the file must have
    # (host, token): sent as a bearer token to that host only, never on a redirect to
    # another host.
    auth: tuple[str, str] | None = None
    model: str = ""  # the model this is for, shown by `ls --partial`

    @property
    def key(self) -> str:
        basis = f"sha256:{self.sha256}" if self.sha256 else self.urls[0]
        return hashlib.sha256(basis.encode()).hexdigest()[:24]


@dataclass
class Part:
    start: int
    end: int  # exclusive
    done: int = 0  # bytes on disk from `start`

    @property
    def complete(self) -> bool:
        return self.start + self.done >= self.end


@dataclass
class DownloadState:
    url: str
    size: int | None
    ranges: bool
    etag: str | None = None
    last_modified: str | None = None
    parts: list[Part] = field(default_factory=list)
    model: str = ""
    sha256: str | None = None  # the expected digest, if any
    digest: str | None = None  # set once the file is complete and verified
    updated: float = 0.0

    @property
    def done(self) -> int:
        return sum(p.done for p in self.parts)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DownloadState:
        parts = [Part(**p) for p in data.pop("parts", [])]
        return cls(parts=parts, **data)


@dataclass(frozen=True)
class Downloaded:
    path: Path  # the complete file: a .part file in the downloads folder, or a stored blob
    digest: str  # "sha256:<hex>"
    size: int
    url: str
    key: str


@dataclass(frozen=True)
class Partial:
    """An interrupted download, as `ls --partial` lists it."""

    key: str
    url: str
    model: str
    done: int
    size: int | None
    updated: float
    path: Path


class _Retry(Exception):
    """A failure worth another attempt at the same URL (5xx, timeout, dropped stream)."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _GiveUp(Exception):
    """A failure of this URL that retrying will not fix (404, 403, bad range answer)."""


class RateLimiter:
    """A token bucket shared by every connection of a download: bytes per second."""

    def __init__(self, rate: int):
        self.rate = rate
        self.lock = threading.Lock()
        self.allowance = 0.0
        self.last = time.monotonic()

    def take(self, amount: int) -> None:
        with self.lock:
            now = time.monotonic()
            # Allow a burst of a quarter second at most, so the average holds over
            # short windows too.
            self.allowance = min(self.allowance + (now - self.last) * self.rate,
                                 self.rate / 4)
            self.last = now
            self.allowance -= amount
            wait = -self.allowance / self.rate if self.allowance < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class _HostAuth:
    """Adds the token to requests for its own host only. httpx also drops the
    Authorization header when a redirect leaves the origin; this makes sure a token is
    never attached to a request for any other host in the first place."""

    def __init__(self, host: str, token: str):
        self.host = host.lower()
        self.token = token

    def apply(self, request: httpx.Request) -> None:
        host = request.url.host.lower()
        # Over plain http a token would travel in clear text: loopback only (tests).
        secure = request.url.scheme == "https" or host in ("127.0.0.1", "localhost", "::1")
        if host == self.host and secure:
            request.headers["Authorization"] = f"Bearer {self.token}"
        else:
            request.headers.pop("Authorization", None)


def _client(auth: tuple[str, str] | None) -> httpx.Client:
    import httpcore
    import httpx

    # httpcore reads HTTP/1.1 bodies 64 KiB at a time and runs its parser per read; at
    # loopback or LAN speeds that Python overhead is the bottleneck. 1 MiB reads halve
    # the time per GiB (benchmarks/download.py). A class attribute, so it also applies
    # to any other httpx client in this process, where bigger reads do no harm.
    http11 = getattr(getattr(httpcore, "_sync", None), "http11", None)
    if http11 is not None and hasattr(http11.HTTP11Connection, "READ_NUM_BYTES"):
        http11.HTTP11Connection.READ_NUM_BYTES = max(
            http11.HTTP11Connection.READ_NUM_BYTES, READ_SIZE)

    host_auth = _HostAuth(*auth) if auth else None

    def on_request(request: httpx.Request) -> None:
        if host_auth is not None:
            host_auth.apply(request)
        else:
            request.headers.pop("Authorization", None)

    return httpx.Client(
        follow_redirects=True,
        timeout=httpx.Timeout(30.0, connect=15.0),
        # A model file is already compressed as much as it will be; asking for identity
        # keeps byte ranges meaning bytes of the file.
        headers={"User-Agent": f"llmctl/{__version__}", "Accept-Encoding": "identity"},
        event_hooks={"request": [on_request]},
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
    )


def _paths(layout: StoreLayout, key: str) -> tuple[Path, Path]:
    return layout.downloads / f"{key}.part", layout.downloads / f"{key}.json"


def _load_state(path: Path) -> DownloadState | None:
    try:
        return DownloadState.from_dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None


def _save_state(path: Path, state: DownloadState) -> None:
    state.updated = time.time()
    write_atomically(path, json.dumps(asdict(state)).encode(), sync=False)


def forget(layout: StoreLayout, key: str) -> None:
    """Delete a download's files (after the store has taken the data, or on request)."""
    for path in _paths(layout, key):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_partial(layout: StoreLayout, key: str) -> bool:
    """Delete an interrupted download; False (and nothing deleted) while a pull is still
    working on it."""
    try:
        with layout.work_lock(f"download-{key}", blocking=False):
            forget(layout, key)
            return True
    except BlockingIOError:
        return False


def partials(layout: StoreLayout) -> list[Partial]:
    """Interrupted downloads that a new pull of the same thing would continue."""
    found = []
    if not layout.downloads.is_dir():
        return found
    for state_path in sorted(layout.downloads.glob("*.json")):
        key = state_path.stem
        state = _load_state(state_path)
        data = state_path.with_suffix(".part")
        if state is None or not data.exists():
            continue
        done = state.size if state.digest and state.size else state.done
        found.append(Partial(key, state.url, state.model, done, state.size, state.updated,
                             data))
    return found


def _parse_total(content_range: str | None) -> int | None:
    # "bytes 0-0/12345"; "bytes */12345" on a 416
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _check_status(response: httpx.Response) -> None:
    if response.status_code in RETRYABLE_STATUS:
        wait = None
        retry_after = response.headers.get("Retry-After", "")
        if retry_after.isdigit():
            wait = min(float(retry_after), 60.0)
        raise _Retry(f"HTTP {response.status_code}", wait)
    if response.status_code >= 400:
        hint = {401: " (the server wants a token)", 403: " (access denied)",
                404: " (no such file)"}.get(response.status_code, "")
        raise _GiveUp(f"HTTP {response.status_code}{hint}")


def check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need + DISK_MARGIN > free:
        raise InsufficientResources(
            "disk space", need, free, where=str(folder),
            hint="free some space, or point LLMCTL_HOME at a bigger disk")


def _allocate(fd: int, size: int) -> None:
    """Reserve the whole file now, so a full disk shows up before the download, not in
    the middle of it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (28, 122):  # ENOSPC, EDQUOT
            raise
        os.ftruncate(fd, size)  # the filesystem cannot reserve space; a sparse file then
    except AttributeError:  # no posix_fallocate (macOS)
        os.ftruncate(fd, size)


def _plan_parts(size: int, parts: int) -> list[Part]:
    if size == 0:
        return [Part(0, 0)]
    count = max(1, min(parts, size // MIN_PART_SIZE))
    step = -(-size // count)
    return [Part(start, min(start + step, size)) for start in range(0, size, step)]


class _Transfer:
    """One download attempt from one URL, into the .part file, with its state."""

    def __init__(self, client: httpx.Client, url: str, fd: int, state: DownloadState,
                 state_path: Path, limiter: RateLimiter | None):
        self.client = client
        self.url = url
        self.fd = fd
        self.state = state
        self.state_path = state_path
        self.limiter = limiter
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.lingering = False

    # -- workers ---------------------------------------------------------------------------

    def _fetch_part(self, part: Part) -> None:
        attempts = 0
        while not part.complete and not self.stop.is_set():
            before = part.done
            try:
                self._stream_range(part)
            except _Retry as exc:
                attempts = 0 if part.done > before else attempts + 1
                if attempts >= MAX_ATTEMPTS:
                    raise DownloadFailed(f"{self.url}: {exc} (gave up after {attempts} "
                                         "attempts; run the same command to continue)") from None
                _backoff(attempts, exc.wait, self.stop)

    def _stream_range(self, part: Part) -> None:
        import httpx

        headers = {"Range": f"bytes={part.start + part.done}-{part.end - 1}"}
        try:
            with self.client.stream("GET", self.url, headers=headers) as response:
                _check_status(response)
                if response.status_code != 206:
                    raise _GiveUp(f"asked for a byte range, got HTTP {response.status_code}")
                offset = part.start + part.done
                for chunk in response.iter_raw():
                    if self.stop.is_set():
                        return
                    if self.limiter:
                        self.limiter.take(len(chunk))
                    room = part.end - offset
                    chunk = chunk[:room] if len(chunk) > room else chunk
                    os.pwrite(self.fd, chunk, offset)
                    offset += len(chunk)
                    part.done += len(chunk)  # after the write: the state never runs ahead
                    if part.complete:
                        return
        except httpx.HTTPError as exc:  # timeouts, resets, streams cut short
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        if not part.complete:
            raise _Retry("the connection closed before the part was complete")

    def _worker(self, part: Part) -> None:
        try:
            self._fetch_part(part)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self.error = exc
            self.stop.set()

    # -- main thread -----------------------------------------------------------------------

    def run_parts(self, on_progress: Progress, hasher: _PrefixHasher) -> None:
        workers = [threading.Thread(target=self._worker, args=(p,), daemon=True)
                   for p in self.state.parts if not p.complete]
        for worker in workers:
            worker.start()
        last_state = 0.0
        try:
            last_progress = 0.0
            while any(w.is_alive() for w in workers):
                # Hash whatever is ready; wait a little only when nothing is.
                if not hasher.advance(self.state.parts, HASH_STEP):
                    self.stop.wait(0.02)  # set early when a worker fails
                now = time.monotonic()
                if now - last_progress >= 0.1:
                    on_progress(self.state.done, self.state.size or 0)
                    last_progress = now
                if now - last_state >= STATE_INTERVAL:
                    _save_state(self.state_path, self.state)
                    last_state = now
        finally:
            self.stop.set()
            _save_state(self.state_path, self.state)
            # Workers stop at their next chunk. One stuck on a silent connection is left
            # behind (daemon threads end with the process) and the file stays open for
            # it: closing would let its late write land in whatever file reuses the
            # descriptor number.
            deadline = time.monotonic() + 2.0
            for worker in workers:
                worker.join(max(0.0, deadline - time.monotonic()))
            self.lingering = any(w.is_alive() for w in workers)
        if self.error is not None:
            raise self.error
        on_progress(self.state.done, self.state.size or 0)

    def run_stream(self, response: httpx.Response, on_progress: Progress,
                   hasher: _PrefixHasher) -> None:
        """A server without ranges: one stream from the start, hashed as it arrives."""
        import httpx

        part = self.state.parts[0]
        offset = 0
        last = 0.0
        try:
            for chunk in response.iter_raw():
                if self.limiter:
                    self.limiter.take(len(chunk))
                os.pwrite(self.fd, chunk, offset)
                hasher.feed(offset, chunk)
                offset += len(chunk)
                part.done = offset
                now = time.monotonic()
                if now - last > 0.05:
                    on_progress(offset, self.state.size or 0)
                    last = now
        except httpx.HTTPError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        if self.state.size is not None and offset != self.state.size:
            raise _Retry(f"the stream ended at {offset} of {self.state.size} bytes")
        self.state.size = offset
        part.end = offset
        on_progress(offset, offset)


class _PrefixHasher:
    """sha256 of the file while it downloads: the main thread follows the contiguous
    prefix that is on disk (parts arrive in parallel) and reads it back from the page
    cache (`advance`), so hashing runs on another core while the workers receive.
    Hashing in the receiving thread instead measured 40% slower per GiB here. A single
    stream without ranges hashes what it receives (`feed`)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.sha = hashlib.sha256()
        self.offset = 0
        self.lock = threading.Lock()

    def feed(self, offset: int, data: bytes) -> None:
        """Data just written at `offset`: hashed now if it is the next byte expected."""
        with self.lock:
            if offset == self.offset:
                self.sha.update(data)
                self.offset += len(data)

    def advance(self, parts: list[Part], limit: int | None = None) -> int:
        """Hash up to `limit` bytes of the complete prefix; returns how many it hashed."""
        ready = _contiguous(parts)
        start = self.offset
        budget = limit if limit is not None else ready
        while self.offset < ready and budget > 0:
            with self.lock:
                step = min(READ_SIZE * 8, ready - self.offset, budget)
                if step <= 0:
                    break
                data = os.pread(self.fd, step, self.offset)
                if not data:
                    break
                self.sha.update(data)
                self.offset += len(data)
            budget -= len(data)
        return self.offset - start

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def _contiguous(parts: list[Part]) -> int:
    """Bytes from the start of the file that are all on disk."""
    end = 0
    for part in parts:
        end = part.start + part.done
        if not part.complete:
            break
    return end


def _backoff(attempt: int, wait: float | None, stop: threading.Event) -> None:
    delay = wait if wait is not None else min(8.0, 0.5 * 2 ** (attempt - 1))
    stop.wait(delay * random.uniform(0.8, 1.2))


def download(
    layout: StoreLayout,
    request: DownloadRequest,
    *,
    parts: int = 4,
    rate_limit: int | None = None,
    on_progress: Progress = lambda done, total: None,
    on_wait: Callable[[], None] | None = None,
) -> Downloaded:
    """Download `request` into the downloads folder (or continue an earlier attempt) and
    verify it. The result is llmctl's own file, to be moved into the blob store; call
    `forget(layout, key)` once it has been."""
    layout.ensure()
    layout.downloads.mkdir(parents=True, exist_ok=True)
    limiter = RateLimiter(rate_limit) if rate_limit else None
    with layout.work_lock(f"download-{request.key}", on_wait), _client(request.auth) as client:
        reasons = []
        for url in request.urls:
            attempt = 0
            while True:
                try:
                    return _download_from(layout, client, request, url, parts, limiter,
                                          on_progress)
                except _Retry as exc:  # the probe, or a stream without ranges
                    attempt += 1
                    if attempt < MAX_ATTEMPTS:
                        _backoff(attempt, exc.wait, threading.Event())
                        continue
                    reasons.append(f"{url}: {exc} (gave up after {attempt} attempts)")
                except DownloadFailed as exc:
                    reasons.append(str(exc))
                except _GiveUp as exc:
                    reasons.append(f"{url}: {exc}")
                break
        raise DownloadFailed("; ".join(reasons))


@contextlib.contextmanager
def _probe(client: httpx.Client, url: str) -> Iterator[httpx.Response]:
    """A request for the first byte: tells whether the server serves ranges, the size and
    the validators. A server without ranges answers with the whole file: that response is
    then the download itself."""
    import httpx

    try:
        with client.stream("GET", url, headers={"Range": "bytes=0-0"}) as response:
            _check_status(response)
            yield response
    except httpx.HTTPError as exc:
        raise _Retry(f"{type(exc).__name__}: {exc}") from None


def _download_from(layout: StoreLayout, client: httpx.Client, request: DownloadRequest,
                   url: str, parts: int, limiter: RateLimiter | None, on_progress: Progress
                   ) -> Downloaded:
    data_path, state_path = _paths(layout, request.key)
    previous = _load_state(state_path) if data_path.exists() else None
    if previous and previous.digest and previous.size == data_path.stat().st_size:
        # Complete and verified by an earlier run that stopped before the store took it.
        on_progress(previous.size, previous.size)
        return Downloaded(data_path, previous.digest, previous.size, previous.url, request.key)

    with _probe(client, url) as response:
        ranges = response.status_code == 206
        size = _parse_total(response.headers.get("Content-Range")) if ranges else (
            int(response.headers["Content-Length"])
            if response.headers.get("Content-Length", "").isdigit() else None)
        if ranges and size is None:
            raise _GiveUp("the server's Content-Range gives no size")
        etag = response.headers.get("ETag")
        modified = response.headers.get("Last-Modified")
        state = DownloadState(url, size, ranges, etag, modified, model=request.model,
                              sha256=request.sha256)
        resumable = (
            previous is not None and previous.ranges and ranges and previous.size == size
            and previous.parts and (
                # Same file on the same server, or any mirror of a file known by its hash.
                (previous.url == url and previous.etag == etag
                 and previous.last_modified == modified)
                or (request.sha256 is not None and previous.sha256 == request.sha256)))
        if resumable:
            assert previous is not None
            state.parts = previous.parts
        else:
            state.parts = _plan_parts(size, parts) if ranges else [Part(0, size or 0)]
            with contextlib.suppress(FileNotFoundError):
                data_path.unlink()
        if size is not None:
            check_disk(layout.downloads, size - state.done)
        fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o644)
        transfer = None
        try:
            if not resumable and size:
                _allocate(fd, size)
            _save_state(state_path, state)
            transfer = _Transfer(client, url, fd, state, state_path, limiter)
            hasher = _PrefixHasher(fd)
            if ranges:
                response.close()  # the parts open their own connections
                transfer.run_parts(on_progress, hasher)
            else:
                # No ranges: this response is the download. Nothing to resume from.
                os.ftruncate(fd, 0)
                transfer.run_stream(response, on_progress, hasher)
                os.ftruncate(fd, state.size or 0)
            hasher.advance(state.parts)
            # No fsync: it doubled the time per GiB here, and curl, Ollama and
            # huggingface_hub do not sync downloads either. The cost: a power cut within
            # the kernel's writeback delay after a pull can leave a damaged blob, which
            # only a size check or a re-pull would notice.
        finally:
            if transfer is None or not transfer.lingering:
                os.close(fd)
    digest = hasher.hexdigest()
    if request.sha256 and digest != request.sha256.lower():
        forget(layout, request.key)
        raise VerificationFailed(url, f"sha256 is {digest}, expected {request.sha256}; "
                                 "the download was deleted (the file on the server is "
                                 "not the one expected)")
    state.digest = "sha256:" + digest
    _save_state(state_path, state)
    return Downloaded(data_path, state.digest, state.size or 0, url, request.key)
