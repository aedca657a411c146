"""A real HTTP file server on loopback with faults on demand, for the downloader's tests
and benchmarks (benchmarks/download.py imports it too).

Serves the files it is given, with single byte ranges (RFC 9110), ETag and
Last-Modified, through sendfile() when no fault asks for slower paths. Per file, a
`Behaviour` says what goes wrong: answer 500 a few times, cut the connection after some
bytes, ignore ranges, send slowly, redirect elsewhere; or lie as a hostile server does
(other ranges than asked, more bytes than announced, no size, a byte now and then, no
answer at all). Every request is recorded, with the bytes of body it sent, so tests can
check what a client asked for and got.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Behaviour:
    ranges: bool = True
    fail_first: int = 0  # answer 500 to this many requests first
    drop_after: int | None = None  # cut the connection after this many body bytes ...
    drops: int = 1  # ... this many times
    rate: int | None = None  # bytes per second, per connection
    redirect: str | None = None  # answer 302 to this URL
    status: int | None = None  # always answer this status
    # Hostile servers:
    shift: int = 0  # a range from byte N > 0 is served from N - shift (and says so)
    content_range: str | None = None  # sent instead of the true Content-Range
    extra: int = 0  # bytes sent beyond what the headers announce (chunked encoding)
    length: bool = True  # False: no Content-Length; the body ends when the connection does
    drip: float | None = None  # seconds between single bytes of the body
    silent: bool = False  # read the request, never answer
    require_auth: str | None = None  # answer 401 unless Authorization is this
    require_query: str | None = None  # answer 403 unless the query string holds this


@dataclass
class Request:
    path: str
    range: str | None
    authorization: str | None
    status: int
    sent: int = 0  # body bytes written
    query: str = ""


@dataclass
class FileServer:
    files: dict[str, Path] = field(default_factory=dict)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = threading.Event()  # releases handlers that hold a connection open
        server = self

        class Handler(_Handler):
            owner = server

        self.httpd = _QuietServer((self.host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def add(self, path: str, file: Path, behaviour: Behaviour | None = None) -> str:
        path = "/" + path.lstrip("/")
        self.files[path] = file
        self.behaviours[path] = behaviour or Behaviour()
        return self.url(path)

    def sent(self, path: str) -> int:
        path = "/" + path.lstrip("/")
        with self.lock:
            return sum(r.sent for r in self.requests if r.path == path)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hang up mid-request on purpose here (a probe, a killed pull).
        pass


class _Handler(BaseHTTPRequestHandler):
    owner: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _record(self, status: int) -> Request:
        path, _, query = self.path.partition("?")
        request = Request(path, self.headers.get("Range"), self.headers.get("Authorization"),
                          status, query=query)
        with self.owner.lock:
            self.owner.requests.append(request)
        return request

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_GET(self, head: bool = False) -> None:
        owner = self.owner
        path = self.path.split("?")[0]
        file = owner.files.get(path)
        behaviour = owner.behaviours.get(path, Behaviour())
        if file is None:
            return self._plain(404, b"not found\n")
        if behaviour.redirect:
            self._record(302)
            self.send_response(302)
            self.send_header("Location", behaviour.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if behaviour.status:
            return self._plain(behaviour.status, b"no\n")
        if behaviour.silent:
            self._record(0)
            owner.closed.wait()
            self.close_connection = True
            return
        if behaviour.require_auth and self.headers.get("Authorization") != behaviour.require_auth:
            return self._plain(401, b"who are you?\n")
        if behaviour.require_query and behaviour.require_query not in self.path.partition("?")[2]:
            return self._plain(403, b"signature missing\n")
        with owner.lock:
            failing = behaviour.fail_first > 0
            if failing:
                behaviour.fail_first -= 1
        if failing:
            return self._plain(500, b"try again\n")

        size = file.stat().st_size
        start, end = 0, size  # end exclusive
        status = 200
        wanted = self.headers.get("Range")
        if wanted and behaviour.ranges:
            match = _RANGE.match(wanted.strip())
            if match and (match.group(1) or match.group(2)):
                first, last = match.groups()
                if first:
                    start = int(first)
                    end = min(size, int(last) + 1) if last else size
                else:  # suffix: the last N bytes
                    start, end = max(0, size - int(last)), size
                if start >= size:
                    self._record(416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
                if start > 0 and behaviour.shift:
                    # Another range than asked for, of the same length, labelled truly.
                    moved = max(0, start - behaviour.shift)
                    start, end = moved, moved + (end - start)
        record = self._record(status)
        stat = file.stat()
        self.send_response(status)
        if behaviour.length:
            self.send_header("Content-Length", str(end - start))
        else:
            self.close_connection = True
        if behaviour.extra:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("ETag", f'"{stat.st_ino:x}-{stat.st_size:x}-{int(stat.st_mtime)}"')
        self.send_header("Last-Modified", formatdate(stat.st_mtime, usegmt=True))
        if behaviour.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range",
                             behaviour.content_range or f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if head:
            return
        try:
            if behaviour.extra:
                return self._send_chunked(file, start, end - start, behaviour.extra, record)
            if behaviour.drip is not None:
                return self._send_drip(file, start, end - start, behaviour.drip, record)
        except (BrokenPipeError, ConnectionResetError):
            return
        limit = end - start
        with owner.lock:
            drop = behaviour.drop_after is not None and behaviour.drops > 0 and (
                start < behaviour.drop_after < end)
            if drop:
                behaviour.drops -= 1
                limit = behaviour.drop_after - start
        try:
            self._send_body(file, start, limit, behaviour.rate, record)
        except (BrokenPipeError, ConnectionResetError):
            return
        if drop or not behaviour.length:
            # A dropped connection: close the socket with the body incomplete. Without a
            # Content-Length, closing is what ends the body.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_chunked(self, file: Path, start: int, length: int, extra: int,
                      record: Request) -> None:
        """The range asked for, then `extra` bytes more, in chunked encoding."""
        with open(file, "rb") as handle:
            handle.seek(start)
            data = handle.read(length) + os.urandom(extra)
        step = 256 * 1024
        for offset in range(0, len(data), step):
            chunk = data[offset:offset + step]
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            record.sent += len(chunk)
        self.wfile.write(b"0\r\n\r\n")

    def _send_drip(self, file: Path, start: int, length: int, every: float,
                   record: Request) -> None:
        """One byte every `every` seconds, until done or the server closes."""
        with open(file, "rb") as handle:
            handle.seek(start)
            for _ in range(length):
                if self.owner.closed.wait(every):
                    break
                self.wfile.write(handle.read(1))
                self.wfile.flush()
                record.sent += 1
        self.close_connection = True

    def _send_body(self, file: Path, start: int, length: int, rate: int | None,
                   record: Request) -> None:
        with open(file, "rb") as handle:
            if rate is None:
                sent = self.connection.sendfile(handle, start, length)
                record.sent += sent
                return
            handle.seek(start)
            chunk = max(1024, rate // 20)
            began = time.monotonic()
            sent = 0
            while sent < length:
                data = handle.read(min(chunk, length - sent))
                if not data:
                    break
                self.wfile.write(data)
                sent += len(data)
                record.sent += len(data)
                ahead = sent / rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)

    def _plain(self, status: int, body: bytes) -> None:
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    """A file of `size` pseudo-random bytes (incompressible, reproducible)."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as handle:
        left = size
        while left:
            block = min(left, 4 * 1024 * 1024)
            handle.write(rng.randbytes(block))
            left -= block
    os.sync()
    return path


def main() -> None:
    """`python tests/fileserver.py FILE... [--rate BYTES_PER_S]`: serve files at /<name>
    until killed; prints the port (benchmarks run the server in a process of its own)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--rate", type=int, default=None, help="per connection")
    args = parser.parse_args()
    with FileServer() as server:
        for file in args.files:
            server.add(file.name, file, Behaviour(rate=args.rate))
        print(server.port, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
