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

Once the store has taken the file, the state moves to `tmp/downloaded/<key>.json`: a
record of what the URL served (digest, size, validators). A later pull of the same URL
under another name reuses the stored blob when the server's validators still match,
rather than download it again.

The key is derived from the expected sha256 when there is one (so alternative URLs of the
same file continue one download), else from the URL without its credentials.

The server is not trusted: a 206 answer must carry the range asked for (Content-Range),
no answer may carry more bytes than it announced, a server that goes silent or drips
(less than STALL_BYTES in LLMCTL_STALL_TIMEOUT seconds) is given up after one retry, and a
file of unknown size stops before it fills the disk. Credentials in URLs (user:password@,
pre-signed query strings) are used for the request only: everything stored or printed
shows `public_url(url)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl import __version__
from llmctl.errors import (
    DownloadFailed,
    InsufficientResources,
    InvalidName,
    UsageError,
    VerificationFailed,
)
from llmctl.store.credentials import (
    Credentials,
    public_url,
    redact,
    secrets_in,
    without_userinfo,
)
from llmctl.store.layout import StoreLayout, write_atomically

if TYPE_CHECKING:
    import httpx

# Parts smaller than this are not worth a connection of their own.
MIN_PART_SIZE = 8 * 1024 * 1024
# Attempts per part without progress before the URL is given up (then the next URL).
MAX_ATTEMPTS = 6
# Timeouts and stalls are retried once only: a server that did not answer within the
# timeout twice will not answer on the sixth try either, and six tries of 30 s made a
# pull from a silent server take 197 s to fail (issue 10).
MAX_STALLS = 2
STATE_INTERVAL = 0.25  # seconds between state writes
HASH_STEP = 32 * 1024 * 1024  # bytes hashed between progress checks
READ_SIZE = 1024 * 1024
# Keep this much free beyond the download itself: a full disk breaks more than llmctl.
DISK_MARGIN = 64 * 1024 * 1024
# A stream of unknown size checks the free space this often (bytes).
DISK_CHECK_STEP = 8 * 1024 * 1024
# A connection that gains less than this in LLMCTL_STALL_TIMEOUT seconds is stalled: a
# server sending a byte every few seconds never trips a read timeout.
STALL_BYTES = 16 * 1024
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}

# A download's key, and so its file names: what DownloadRequest.key gives.
_KEY = re.compile(r"^[0-9a-f]{24}$")

# (bytes done, bytes total; 0 when the server did not say)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DownloadRequest:
    urls: list[str]  # tried in order: the first, then the alternatives (may hold credentials)
    sha256: str | None = None  # hex digest the file must have
    # (URL, token): sent as a bearer token to that URL's origin (scheme, host and port)
    # only, never to another origin a redirect leads to.
    auth: tuple[str, str] | None = None
    model: str = ""  # the model this is for, shown by `ls --partial`

    @property
    def key(self) -> str:
        # From the URL without credentials: a re-signed URL of the same file continues
        # the same download, and no file name is derived from a secret.
        basis = f"sha256:{self.sha256}" if self.sha256 else public_url(self.urls[0])
        return hashlib.sha256(basis.encode()).hexdigest()[:24]

    @property
    def secrets(self) -> set[str]:
        found = set().union(*(secrets_in(url) for url in self.urls))
        if self.auth:
            found.add(self.auth[1])
        return found


@dataclass(frozen=True)
class Timeouts:
    """Seconds: to connect; for a server to answer, or to go on after a silence; and the
    window in which a connection must gain STALL_BYTES (else it is stalled)."""

    connect: float = 10.0
    read: float = 10.0
    stall: float = 30.0

    @classmethod
    def from_environment(cls) -> Timeouts:
        return cls(_seconds("LLMCTL_CONNECT_TIMEOUT", cls.connect),
                   _seconds("LLMCTL_READ_TIMEOUT", cls.read),
                   _seconds("LLMCTL_STALL_TIMEOUT", cls.stall))


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{variable}={text!r} is not a number of seconds",
                         hint=f"set it to a positive number, e.g. {variable}={default:g}")
    return value


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
    url: str  # as public_url gives it: never a credential
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
    # The complete file: a .part file in the downloads folder, or (`stored`) the blob an
    # earlier download of the same URL put in the store.
    path: Path
    digest: str  # "sha256:<hex>"
    size: int
    url: str  # public_url of the URL it came from
    key: str
    stored: bool = False


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
    """A failure worth another attempt at the same URL (5xx, timeout, dropped stream).
    `stalled`: a timeout or a stall, retried only MAX_STALLS times; `variable` is the
    environment variable that sets the limit that was hit."""

    def __init__(self, reason: str, wait: float | None = None, stalled: bool = False,
                 variable: str = ""):
        super().__init__(reason)
        self.wait = wait
        self.stalled = stalled
        self.variable = variable


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


def _client(credentials: Credentials, timeouts: Timeouts) -> httpx.Client:
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

    return httpx.Client(
        follow_redirects=True,
        # `read` bounds the wait for an answer and any silence within one; a slow drip
        # is the stall check's (_StallWatch).
        timeout=httpx.Timeout(timeouts.read, connect=timeouts.connect),
        # A model file is already compressed as much as it will be; asking for identity
        # keeps byte ranges meaning bytes of the file.
        headers={"User-Agent": f"llmctl/{__version__}", "Accept-Encoding": "identity"},
        # Called for every request, redirects included.
        event_hooks={"request": [credentials.apply]},
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
    )


def _paths(layout: StoreLayout, key: str) -> tuple[Path, Path]:
    return layout.downloads / f"{key}.part", layout.downloads / f"{key}.json"


def _record_path(layout: StoreLayout, key: str) -> Path:
    """Where a download the store has taken is remembered (not a partial download)."""
    return layout.tmp / "downloaded" / f"{key}.json"


def _load_state(path: Path) -> DownloadState | None:
    try:
        return DownloadState.from_dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _save_state(path: Path, state: DownloadState) -> None:
    state.updated = time.time()
    write_atomically(path, json.dumps(asdict(state)).encode(), sync=False)


def forget(layout: StoreLayout, key: str) -> None:
    """Delete a download's files and its record (a file that failed a check, a partial
    download on request, an archive whose files the store has taken)."""
    for path in (*_paths(layout, key), _record_path(layout, key)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_partial(layout: StoreLayout, key: str) -> bool:
    """Delete an interrupted download; False (and nothing deleted) while a pull is still
    working on it (downloading it, or putting it in the store)."""
    if not _KEY.match(key):
        raise InvalidName(f"'{key[:40]}' is not the ID of a download",
                          hint="see: llmctl ls --partial")
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
        if not _KEY.match(key):  # not a file of ours: its name could be anything
            continue
        state = _load_state(state_path)
        data = state_path.with_suffix(".part")
        if state is None or not data.exists():
            continue
        done = state.size if state.digest and state.size else state.done
        # public_url again: a state written by an older llmctl may hold credentials.
        found.append(Partial(key, public_url(state.url), state.model, done, state.size,
                             state.updated, data))
    return found


def _parse_range(content_range: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total) from "bytes 0-99/12345" (total None for "/*"); None when the
    header is missing or not of that form."""
    if not content_range:
        return None
    unit, _, rest = content_range.strip().partition(" ")
    span, _, total = rest.partition("/")
    first, _, last = span.partition("-")
    if unit.lower() != "bytes" or not (first.isdigit() and last.isdigit()):
        return None
    if not (total.isdigit() or total == "*"):
        return None
    return int(first), int(last), int(total) if total.isdigit() else None


def _parse_total(content_range: str | None) -> int | None:
    # "bytes 0-0/12345"; "bytes */12345" on a 416
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _served_range(response: httpx.Response, start: int, stop: int | None,
                  size: int | None) -> int:
    """The end (exclusive) of the bytes a 206 answer carries, checked against the bytes
    asked for, start to `stop` (exclusive; None: to the end): a server that answers with
    another range, another total, or a Content-Length that disagrees is not believed
    (issue 10: a server lying about ranges got a corrupt model registered)."""
    served = _parse_range(response.headers.get("Content-Range"))
    asked = f"bytes {start}-{'' if stop is None else stop - 1}"
    if served is None:
        raise _GiveUp(f"asked for {asked}, the server answered 206 without a valid "
                      f"Content-Range ({response.headers.get('Content-Range')!r})")
    first, last, total = served
    if (first != start or last < first or (stop is not None and last >= stop)
            or (size is not None and total != size)):
        raise _GiveUp(f"asked for {asked} of {size if size is not None else '?'}, the server "
                      f"answered with bytes {first}-{last}/{'*' if total is None else total}; "
                      "its data was not used")
    length = response.headers.get("Content-Length")
    if length is not None and length.strip() != str(last - first + 1):
        raise _GiveUp(f"the server's Content-Length ({length}) disagrees with its "
                      f"Content-Range (bytes {first}-{last})")
    return last + 1


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


def _transport_failure(exc: Exception, timeouts: Timeouts) -> Exception:
    """An httpx failure as a _Retry (timeouts and resets) or a _GiveUp (a redirect to a
    scheme llmctl does not speak, a redirect loop)."""
    import httpx

    if isinstance(exc, httpx.ConnectTimeout):
        return _Retry(f"no connection within {timeouts.connect:g} s", stalled=True,
                      variable="LLMCTL_CONNECT_TIMEOUT")
    if isinstance(exc, httpx.ReadTimeout):
        return _Retry(f"the server sent nothing for {timeouts.read:g} s", stalled=True,
                      variable="LLMCTL_READ_TIMEOUT")
    if isinstance(exc, httpx.TimeoutException):
        return _Retry(f"timed out ({type(exc).__name__})", stalled=True,
                      variable="LLMCTL_READ_TIMEOUT")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.TooManyRedirects | httpx.InvalidURL):
        return _GiveUp(f"{type(exc).__name__}: {exc}")
    return _Retry(f"{type(exc).__name__}: {exc}")


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


class _StallWatch:
    """Fails a connection that gains fewer than `least` bytes in `seconds`. A read
    timeout catches a silent server, not one that sends a byte every few seconds (issue
    10: such a server kept `pull` going forever)."""

    def __init__(self, seconds: float, least: int):
        self.seconds = seconds
        self.least = least
        self.since = time.monotonic()
        self.gained = 0

    def advance(self, amount: int) -> None:
        self.gained += amount
        now = time.monotonic()
        if now - self.since < self.seconds:
            return
        if self.gained < self.least:
            raise _Retry(f"stalled ({self.gained} bytes in {now - self.since:.1f} s)",
                         stalled=True, variable="LLMCTL_STALL_TIMEOUT")
        self.since, self.gained = now, 0


class _Transfer:
    """One download attempt from one URL, into the .part file, with its state."""

    def __init__(self, client: httpx.Client, url: str, label: str, fd: int,
                 state: DownloadState, state_path: Path, limiter: RateLimiter | None,
                 timeouts: Timeouts, parts: int):
        self.client = client
        self.url = url  # as requested: may hold credentials
        self.label = label  # as printed
        self.fd = fd
        self.state = state
        self.state_path = state_path
        self.limiter = limiter
        self.timeouts = timeouts
        # With a speed cap, a connection's honest share may be below STALL_BYTES.
        share = limiter.rate * timeouts.stall / (4 * parts) if limiter else STALL_BYTES
        self.stall_bytes = max(1, int(min(STALL_BYTES, share)))
        # A range request with If-Range gets the whole file (200) instead of a range if
        # the file changed on the server: parts of two versions are never mixed.
        etag = state.etag if state.etag and not state.etag.startswith("W/") else None
        self.if_range = etag or state.last_modified
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.lingering = False

    # -- workers ---------------------------------------------------------------------------

    def _fetch_part(self, part: Part) -> None:
        attempts = stalls = 0
        while not part.complete and not self.stop.is_set():
            before = part.done
            try:
                self._stream_range(part)
            except _Retry as exc:
                if part.done - before >= self.stall_bytes:
                    attempts = stalls = 0
                else:
                    attempts += 1
                    stalls += exc.stalled
                if attempts >= MAX_ATTEMPTS or stalls >= MAX_STALLS:
                    raise DownloadFailed(_gave_up(self.label, exc, attempts)) from None
                _backoff(attempts, exc.wait, self.stop)

    def _stream_range(self, part: Part) -> None:
        import httpx

        start = part.start + part.done
        headers = {"Range": f"bytes={start}-{part.end - 1}"}
        if self.if_range:
            headers["If-Range"] = self.if_range
        offset = end = start
        try:
            with self.client.stream("GET", self.url, headers=headers) as response:
                _check_status(response)
                if response.status_code == 200 and self.if_range:
                    raise _GiveUp("the file changed on the server during the download; run "
                                  "the same command to start again")
                if response.status_code != 206:
                    raise _GiveUp(f"asked for a byte range, got HTTP {response.status_code}")
                end = _served_range(response, start, part.end, self.state.size)
                watch = _StallWatch(self.timeouts.stall, self.stall_bytes)
                for chunk in response.iter_raw():
                    if self.stop.is_set():
                        return
                    if offset + len(chunk) > end:
                        raise _GiveUp(f"the server sent more than the bytes {start}-"
                                      f"{end - 1} it announced; its data was not used")
                    if self.limiter:
                        self.limiter.take(len(chunk))
                    os.pwrite(self.fd, chunk, offset)
                    offset += len(chunk)
                    part.done += len(chunk)  # after the write: the state never runs ahead
                    watch.advance(len(chunk))
        except httpx.HTTPError as exc:  # timeouts, resets, streams cut short
            raise _transport_failure(exc, self.timeouts) from None
        if offset < end:
            raise _Retry("the connection closed before the part was complete")
        # A server may answer with less than the range asked for: the loop asks for the rest.

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
                   hasher: _PrefixHasher, folder: Path) -> None:
        """A server without ranges: one stream from the start, hashed as it arrives. Of
        a stream of unknown size, the free space in `folder` is checked as it grows."""
        import httpx

        part = self.state.parts[0]
        size = self.state.size
        offset = 0
        last = 0.0
        checked = 0
        watch = _StallWatch(self.timeouts.stall, self.stall_bytes)
        try:
            for chunk in response.iter_raw():
                if size is not None and offset + len(chunk) > size:
                    raise _GiveUp(f"the server sent more than the {size} bytes it "
                                  "announced (Content-Length); its data was not used")
                if size is None and offset + len(chunk) - checked >= DISK_CHECK_STEP:
                    _check_room(folder, offset)
                    checked = offset
                if self.limiter:
                    self.limiter.take(len(chunk))
                os.pwrite(self.fd, chunk, offset)
                hasher.feed(offset, chunk)
                offset += len(chunk)
                part.done = offset
                watch.advance(len(chunk))
                now = time.monotonic()
                if now - last > 0.05:
                    on_progress(offset, size or 0)
                    last = now
        except httpx.HTTPError as exc:
            raise _transport_failure(exc, self.timeouts) from None
        if size is not None and offset != size:
            raise _Retry(f"the stream ended at {offset} of {size} bytes")
        self.state.size = offset
        part.end = offset
        on_progress(offset, offset)


def _check_room(folder: Path, written: int) -> None:
    """Stop a download of unknown size before it fills the disk (issue 10)."""
    free = shutil.disk_usage(folder).free
    if free < DISK_MARGIN + DISK_CHECK_STEP:
        raise InsufficientResources(
            "disk space", DISK_MARGIN + DISK_CHECK_STEP, free, where=str(folder),
            hint=f"the server did not say how big the file is, and after "
                 f"{written / 1e6:.0f} MB the disk was almost full (the download was "
                 "deleted); free some space, or point LLMCTL_HOME at a bigger disk")


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


def _gave_up(label: str, exc: _Retry, attempts: int) -> str:
    more = f", or raise {exc.variable}" if exc.variable else ""
    return (f"{label}: {exc} (gave up after {attempts} attempts; run the same command to "
            f"continue{more})")


# --- the download -------------------------------------------------------------------------


@contextlib.contextmanager
def downloading(
    layout: StoreLayout,
    request: DownloadRequest,
    *,
    parts: int = 4,
    rate_limit: int | None = None,
    on_progress: Progress = lambda done, total: None,
    on_wait: Callable[[], None] | None = None,
    timeouts: Timeouts | None = None,
) -> Iterator[Downloaded]:
    """Download `request` into the downloads folder (or continue an earlier attempt, or
    reuse what an earlier download of the same URL stored) and verify it; the body puts
    the file into the store.

    The download's lock is held until the body is done, so that `rm --partial` cannot
    delete the file while the store takes it, and a second pull of the same URL (under
    another name) waits, then reuses the stored blob. If the body raises
    VerificationFailed (the file is not a model, an archive was refused), the download is
    deleted: it must not be taken as complete next time. Any other failure keeps it for
    the next pull. When the body has stored the file, the download is replaced by its
    record."""
    timeouts = timeouts or Timeouts.from_environment()
    layout.ensure()
    layout.downloads.mkdir(parents=True, exist_ok=True)
    with layout.work_lock(f"download-{request.key}", on_wait):
        done = _download_locked(layout, request, parts, rate_limit, on_progress, timeouts)
        try:
            yield done
        except VerificationFailed as exc:
            forget(layout, request.key)
            if exc.path == str(done.path) and not done.stored:
                # Named by the URL: the temporary file the check read is gone now.
                raise VerificationFailed(done.url, f"{exc.reason}; the download was "
                                         "deleted") from None
            raise
        _settle(layout, done)


def download(
    layout: StoreLayout,
    request: DownloadRequest,
    *,
    parts: int = 4,
    rate_limit: int | None = None,
    on_progress: Progress = lambda done, total: None,
    on_wait: Callable[[], None] | None = None,
    timeouts: Timeouts | None = None,
) -> Downloaded:
    """`downloading` without a body: the file stays in the downloads folder, complete and
    verified, for a later pull to take (call `forget(layout, key)` once it is not needed)."""
    with downloading(layout, request, parts=parts, rate_limit=rate_limit,
                     on_progress=on_progress, on_wait=on_wait, timeouts=timeouts) as done:
        return done


def _settle(layout: StoreLayout, done: Downloaded) -> None:
    """After the body: if the store holds the file now, keep a record of the download in
    place of its files. Otherwise (the body stored something else, or nothing) the
    download stays as it is."""
    if done.stored:
        return
    try:
        stored = layout.blob_path(done.digest).stat().st_size == done.size
    except FileNotFoundError:
        stored = False
    if not stored:
        return
    data_path, state_path = _paths(layout, done.key)
    state = _load_state(state_path)
    if state is not None and state.digest == done.digest:
        state.parts = []
        _save_state(_record_path(layout, done.key), state)
    for path in (data_path, state_path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _reusable_record(layout: StoreLayout, key: str) -> DownloadState | None:
    """The record of an earlier download with this key whose blob is still in the store."""
    record = _load_state(_record_path(layout, key))
    if record is None or not record.digest or record.size is None:
        return None
    try:
        if layout.blob_path(record.digest).stat().st_size != record.size:
            return None
    except (FileNotFoundError, UsageError):  # UsageError: the record's digest is no digest
        return None
    return record


def _download_locked(layout: StoreLayout, request: DownloadRequest, parts: int,
                     rate_limit: int | None, on_progress: Progress, timeouts: Timeouts
                     ) -> Downloaded:
    """The download itself; the caller holds its lock."""
    import httpx

    record = _reusable_record(layout, request.key)
    if record is not None and request.sha256 and (
            record.digest == "sha256:" + request.sha256.lower()):
        # The file asked for by its content is in the store already: no server needed.
        on_progress(record.size or 0, record.size or 0)
        return _reused(layout, request, record)
    limiter = RateLimiter(rate_limit) if rate_limit else None
    secrets = request.secrets
    with _client(Credentials(request.urls, request.auth), timeouts) as client:
        reasons = []
        for url in request.urls:
            label = public_url(url)
            target = without_userinfo(url)
            try:
                httpx.URL(target)
            except (httpx.InvalidURL, ValueError) as exc:
                raise UsageError(f"'{label}' is not a valid URL ({redact(str(exc), secrets)})",
                                 hint="check the address") from None
            attempt = stalls = 0
            while True:
                try:
                    return _download_from(layout, client, request, target, label, parts,
                                          limiter, on_progress, timeouts, record)
                except _Retry as exc:  # the probe, or a stream without ranges
                    attempt += 1
                    stalls += exc.stalled
                    if attempt < MAX_ATTEMPTS and stalls < MAX_STALLS:
                        _backoff(attempt, exc.wait, threading.Event())
                        continue
                    reasons.append(_gave_up(label, exc, attempt))
                except DownloadFailed as exc:
                    reasons.append(str(exc))
                except _GiveUp as exc:
                    reasons.append(f"{label}: {exc}")
                break
        raise DownloadFailed(redact("; ".join(reasons), secrets))


def _reused(layout: StoreLayout, request: DownloadRequest, record: DownloadState
            ) -> Downloaded:
    assert record.digest is not None and record.size is not None
    return Downloaded(layout.blob_path(record.digest), record.digest, record.size,
                      record.url, request.key, stored=True)


def _same_file(record: DownloadState, url: str, size: int | None, etag: str | None,
               modified: str | None) -> bool:
    """Whether the server still serves what the record says this URL served: the same
    size and every validator the record has (at least one) unchanged."""
    if record.url != url or record.size != size or not (record.etag or record.last_modified):
        return False
    return ((not record.etag or record.etag == etag)
            and (not record.last_modified or record.last_modified == modified))


@contextlib.contextmanager
def _probe(client: httpx.Client, url: str, timeouts: Timeouts) -> Iterator[httpx.Response]:
    """A request for the first byte: tells whether the server serves ranges, the size and
    the validators. A server without ranges answers with the whole file: that response is
    then the download itself."""
    import httpx

    try:
        with client.stream("GET", url, headers={"Range": "bytes=0-0"}) as response:
            _check_status(response)
            yield response
    except httpx.HTTPError as exc:
        raise _transport_failure(exc, timeouts) from None


def _download_from(layout: StoreLayout, client: httpx.Client, request: DownloadRequest,
                   url: str, label: str, parts: int, limiter: RateLimiter | None,
                   on_progress: Progress, timeouts: Timeouts, record: DownloadState | None
                   ) -> Downloaded:
    data_path, state_path = _paths(layout, request.key)
    previous = _load_state(state_path) if data_path.exists() else None
    if previous and previous.digest and previous.size == data_path.stat().st_size:
        # Complete and verified by an earlier run that stopped before the store took it.
        on_progress(previous.size, previous.size)
        return Downloaded(data_path, previous.digest, previous.size, previous.url, request.key)

    with _probe(client, url, timeouts) as response:
        ranges = response.status_code == 206
        if ranges:
            _served_range(response, 0, None, None)
            size = _parse_total(response.headers.get("Content-Range"))
        else:
            length = response.headers.get("Content-Length", "").strip()
            size = int(length) if length.isdigit() else None
        if ranges and size is None:
            raise _GiveUp("the server's Content-Range gives no size")
        etag = response.headers.get("ETag")
        modified = response.headers.get("Last-Modified")
        if record is not None and _same_file(record, label, size, etag, modified):
            # The same URL, still serving the same file, which the store has: nothing to
            # download (a second name for one file; issue 10).
            on_progress(record.size or 0, record.size or 0)
            return _reused(layout, request, record)
        state = DownloadState(label, size, ranges, etag, modified, model=request.model,
                              sha256=request.sha256)
        resumable = (
            previous is not None and previous.ranges and ranges and previous.size == size
            and previous.parts and (
                # Same file on the same server, or any mirror of a file known by its hash.
                (previous.url == label and previous.etag == etag
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
            transfer = _Transfer(client, url, label, fd, state, state_path, limiter,
                                 timeouts, parts)
            hasher = _PrefixHasher(fd)
            if ranges:
                response.close()  # the parts open their own connections
                transfer.run_parts(on_progress, hasher)
            else:
                # No ranges: this response is the download. Nothing to resume from.
                os.ftruncate(fd, 0)
                try:
                    transfer.run_stream(response, on_progress, hasher, layout.downloads)
                except InsufficientResources:
                    forget(layout, request.key)  # cannot be resumed without ranges anyway
                    raise
                except OSError as exc:
                    if exc.errno in (28, 122) and size is None:  # ENOSPC, EDQUOT
                        forget(layout, request.key)
                    raise
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
        raise VerificationFailed(label, f"sha256 is {digest}, expected {request.sha256}; "
                                 "the download was deleted (the file on the server is "
                                 "not the one expected)")
    state.digest = "sha256:" + digest
    _save_state(state_path, state)
    return Downloaded(data_path, state.digest, state.size or 0, label, request.key)
