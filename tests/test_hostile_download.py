"""Hostile servers and hostile URLs (issue 10, items 4, 5, 8, 9 and the Hub part of 12):
tokens that follow redirects, credentials inside URLs, servers that lie about ranges and
sizes, fill the disk, drip or never answer, and a Hub endpoint that answers HTML.

Every server is a real one on loopback started by the test (tests/fileserver.py). The
end-to-end tests run the installed `llmctl` in the `sandbox` (tests/hostile.py): each
checks the exit code, the one-line error, that nothing was written outside LLMCTL_HOME
and that nothing is half-listed. Timeouts are set small through the environment; no
test asserts on how long anything took, only on what happened (exit codes, messages,
the requests the servers recorded).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import Runner
from fileserver import Behaviour, FileServer, random_file
from hostile import Sandbox, one_line_error

from llmctl.errors import DownloadFailed, InsufficientResources
from llmctl.store import download
from llmctl.store.credentials import Credentials, public_url
from llmctl.store.download import DownloadRequest, Timeouts
from llmctl.store.layout import StoreLayout

pytestmark = pytest.mark.timeout(600)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SECRET = "s3cr3t-Pa55word-0123456789"
# Small limits so that the stall and timeout tests take seconds.
FAST = {"LLMCTL_STALL_TIMEOUT": "1.5", "LLMCTL_READ_TIMEOUT": "5",
        "LLMCTL_CONNECT_TIMEOUT": "5"}


def nothing_contains(home: Path, secret: str) -> None:
    """No file under LLMCTL_HOME holds `secret`: no manifest, state file or record (nor
    a file name)."""
    for path in home.rglob("*"):
        assert secret not in path.name, path
        if path.is_file() and not path.is_symlink():
            assert secret.encode() not in path.read_bytes(), path


def partial_files(home: Path) -> list[str]:
    folder = home / "tmp" / "downloads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def stored_blobs(home: Path) -> list[Path]:
    folder = home / "blobs"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if (
        folder.exists()) else []


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A folder for the servers' files, outside the sandbox."""
    folder = tmp_path / "served"
    folder.mkdir()
    return folder


# --- credentials: unit level ---------------------------------------------------------------


@pytest.mark.parametrize(("url", "public"), [
    ("http://user:PW@host/f.gguf", "http://host/f.gguf"),
    ("https://tok@host:8443/a/f.gguf", "https://host:8443/a/f.gguf"),
    ("https://host/f.gguf?token=abc&rev=2", "https://host/f.gguf?rev=2"),
    ("https://b.s3.amazonaws.com/f.gguf?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     "&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ff&X-Amz-Security-Token=tt",
     "https://b.s3.amazonaws.com/f.gguf?X-Amz-Algorithm=AWS4-HMAC-SHA256"),
    ("https://host/f.gguf?api_key=1&apikey=2&key=3&sig=4&Signature=5&password=6"
     "&access_token=7&hf_token=8&x=9", "https://host/f.gguf?x=9"),
    ("https://host/f.gguf#sha256=00", "https://host/f.gguf"),
])
def test_public_url_keeps_no_credential(url: str, public: str) -> None:
    assert public_url(url) == public


def _authorization(request: DownloadRequest, url: str) -> str | None:
    prepared = httpx.Request("GET", url)
    Credentials(request.urls, request.auth).apply(prepared)
    return prepared.headers.get("Authorization")


def test_a_token_goes_to_its_own_origin_only() -> None:
    request = DownloadRequest(["https://models.example/f.gguf"],
                              auth=("https://models.example/f.gguf", "tok"))
    assert _authorization(request, "https://models.example/other") == "Bearer tok"
    assert _authorization(request, "https://models.example:443/x") == "Bearer tok"
    # Another port, another host, and a downgrade to http: none of them is its origin.
    assert _authorization(request, "https://models.example:8443/f.gguf") is None
    assert _authorization(request, "https://cdn.example/f.gguf") is None
    assert _authorization(request, "http://models.example/f.gguf") is None
    # Plain http only on loopback (the tests' servers), and then on the same port only.
    local = DownloadRequest(["http://127.0.0.1:5000/f"], auth=("http://127.0.0.1:5000/f", "t"))
    assert _authorization(local, "http://127.0.0.1:5000/g") == "Bearer t"
    assert _authorization(local, "http://127.0.0.1:5001/f") is None
    remote = DownloadRequest(["http://example.org/f"], auth=("http://example.org/f", "t"))
    assert _authorization(remote, "http://example.org/f") is None


def test_a_password_in_a_url_goes_to_its_origin_only() -> None:
    request = DownloadRequest(["https://me:pw@models.example/f.gguf"])
    assert _authorization(request, "https://models.example/f.gguf") == "Basic bWU6cHc="
    assert _authorization(request, "https://models.example:444/f.gguf") is None
    assert _authorization(request, "http://models.example/f.gguf") is None


# --- servers that lie: unit level ----------------------------------------------------------


@pytest.fixture
def layout(llmctl_home: Path) -> StoreLayout:
    return StoreLayout(llmctl_home)


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Three parts of 8 MiB and a bit, so that ranges other than the first are asked for.
    return random_file(tmp_path_factory.mktemp("payload") / "blob.bin",
                       24 * 1024 * 1024 + 4321, seed=7)


@pytest.mark.parametrize("behaviour", [
    Behaviour(shift=1000),  # another range than asked, truly labelled
    Behaviour(content_range="bytes 0-0/999"),  # one fixed header: wrong total, then length
    Behaviour(content_range="bytes 5-5/25169953"),  # another start
    Behaviour(content_range="bytes 0-0"),  # no total at all
], ids=["other-range", "fixed-header", "other-start", "malformed"])
def test_a_range_answer_must_carry_the_range_asked_for(
        layout: StoreLayout, payload: Path, behaviour: Behaviour) -> None:
    with FileServer() as server:
        url = server.add("blob.bin", payload, behaviour)
        with pytest.raises(DownloadFailed) as failed:
            download.download(layout, DownloadRequest([url]), parts=3)
    message = str(failed.value)
    assert "the server answered" in message or "Content-Range" in message, message
    # Nothing it sent beyond the probe was kept as data: the download is not complete.
    assert all(p.done < (p.size or 1) for p in download.partials(layout))


@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "one-stream"])
def test_more_bytes_than_announced_are_refused(layout: StoreLayout, tmp_path: Path,
                                               ranges: bool) -> None:
    small = random_file(tmp_path / "small.bin", 300_000, seed=3)
    with FileServer() as server:
        url = server.add("small.bin", small, Behaviour(ranges=ranges, extra=5000))
        with pytest.raises(DownloadFailed, match="more than"):
            download.download(layout, DownloadRequest([url]))
        asked = [r for r in server.requests if r.path == "/small.bin"]
    assert len(asked) <= 2  # the probe and one range at most: not retried


def test_a_stream_of_unknown_size_stops_before_the_disk_is_full(
        layout: StoreLayout, payload: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk with 100 MiB free, as the downloader sees it: the download's own file
    uses it up. (test_a_stream_of_unknown_size_on_a_small_disk does this for real.)"""
    real = download.shutil.disk_usage
    budget = download.DISK_MARGIN + download.DISK_CHECK_STEP + 12 * 1024 * 1024

    def usage(path: object) -> object:
        used = sum(p.stat().st_size for p in layout.downloads.glob("*.part"))
        return real(path)._replace(free=max(0, budget - used))

    monkeypatch.setattr(download.shutil, "disk_usage", usage)
    with FileServer() as server:
        url = server.add("blob.bin", payload, Behaviour(ranges=False, length=False))
        with pytest.raises(InsufficientResources) as failed:
            download.download(layout, DownloadRequest([url]))
    assert "did not say how big" in failed.value.hint
    assert list(layout.downloads.iterdir()) == []  # the partial download was deleted


def test_timeouts_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCTL_STALL_TIMEOUT", "7")
    monkeypatch.setenv("LLMCTL_CONNECT_TIMEOUT", "0.5")
    monkeypatch.delenv("LLMCTL_READ_TIMEOUT", raising=False)
    assert Timeouts.from_environment() == Timeouts(connect=0.5, read=10.0, stall=7.0)


# --- the lock is held until the store has the file -----------------------------------------


def test_rm_partial_waits_until_the_store_has_taken_the_download(
        layout: StoreLayout, llmctl: Runner, smollm2_gguf: Path) -> None:
    """`rm --partial` run while a pull is between "downloaded" and "stored" (here: the
    body of url.fetching, where pull registers the file) keeps the download."""
    from llmctl.store.names import UrlRef
    from llmctl.store.register import register
    from llmctl.store.sources import PullOptions
    from llmctl.store.sources import url as url_source

    with FileServer() as server:
        address = server.add(GGUF, smollm2_gguf)
        ref = UrlRef(address, None)
        with url_source.fetching(layout, ref, PullOptions(),
                                 on_progress=lambda *_: None) as files:
            [path] = files.paths
            assert path.exists()
            removed = llmctl("rm", "--partial", "-y")
            assert removed.returncode == 0, removed.stderr
            assert "being downloaded right now; kept" in removed.stderr
            assert path.exists()
            result = register(layout, files, name="smol", tag="latest", expected_sha256=None,
                              on_event=lambda _: None)
    assert result.manifest.files[0].digest == f"sha256:{SHA}"
    assert download.partials(layout) == []
    assert json.loads(llmctl("ls", "--partial", "--json").stdout) == []


# --- end to end: tokens and credentials ----------------------------------------------------


def test_a_token_does_not_follow_a_redirect_to_another_port(
        sandbox: Sandbox, llmctl: Runner, smollm2_gguf: Path) -> None:
    token = "llmctl-token-" + SECRET
    with FileServer() as elsewhere, FileServer() as own:
        assert elsewhere.host == own.host and elsewhere.port != own.port
        target = elsewhere.add(GGUF, smollm2_gguf)
        start = own.add(GGUF, smollm2_gguf, Behaviour(redirect=target))
        catalog = sandbox.home / "catalog"
        catalog.mkdir(parents=True)
        (catalog / "mine.toml").write_text(f"""
[[model]]
name = "redirected"
tag = "v1"
kind = "text"
engine = "llama"
format = "gguf"

  [[model.sources]]
  type = "url"
  url = "{start}"
  sha256 = "{SHA}"
  auth = true
""")
        result = llmctl("pull", "redirected:v1", env={"LLMCTL_TOKEN": token})
        assert result.returncode == 0, result.stderr
        assert {r.authorization for r in own.requests} == {f"Bearer {token}"}
        assert elsewhere.requests and {r.authorization for r in elsewhere.requests} == {None}
    assert token not in result.stdout + result.stderr
    nothing_contains(sandbox.home, token)
    assert sandbox.stored(llmctl) == ["redirected:v1"]


def test_a_password_in_the_url_is_used_and_never_kept(
        sandbox: Sandbox, llmctl: Runner, smollm2_gguf: Path) -> None:
    basic = "Basic " + base64.b64encode(f"me:{SECRET}".encode()).decode()
    with FileServer() as elsewhere, FileServer() as server:
        server.add(GGUF, smollm2_gguf, Behaviour(require_auth=basic))
        url = f"http://me:{SECRET}@127.0.0.1:{server.port}/{GGUF}"
        result = llmctl("pull", url, "--name", "private")
        assert result.returncode == 0, result.stderr
        assert {r.authorization for r in server.requests} == {basic}
        # The same password is not sent to another port a redirect leads to.
        moved = elsewhere.add("moved.gguf", smollm2_gguf)
        server.add("moved.gguf", smollm2_gguf, Behaviour(redirect=moved))
        again = llmctl("pull", f"http://me:{SECRET}@127.0.0.1:{server.port}/moved.gguf",
                       "--name", "moved")
        assert again.returncode == 0, again.stderr
        assert {r.authorization for r in elsewhere.requests} == {None}
    shown = json.loads(llmctl("show", "--json", "private").stdout)
    assert shown["source"]["url"] == server.url(GGUF)
    listed = llmctl("ls", "--json")
    for output in (result.stdout, result.stderr, again.stdout, again.stderr, listed.stdout,
                   json.dumps(shown)):
        assert SECRET not in output
    nothing_contains(sandbox.home, SECRET)
    assert sorted(sandbox.stored(llmctl)) == ["moved:latest", "private:latest"]


def test_a_presigned_url_downloads_and_its_signature_is_never_kept(
        sandbox: Sandbox, llmctl: Runner, smollm2_gguf: Path) -> None:
    query = f"X-Amz-Credential=AKIA1234&X-Amz-Signature={SECRET}&token=tok{SECRET}"
    with FileServer() as server:
        server.add(GGUF, smollm2_gguf, Behaviour(require_query=f"X-Amz-Signature={SECRET}"))
        result = llmctl("pull", f"{server.url(GGUF)}?{query}", "--name", "signed")
        assert result.returncode == 0, result.stderr
        assert all(r.query == query for r in server.requests)  # sent as given
    shown = json.loads(llmctl("show", "--json", "signed").stdout)
    assert shown["source"]["url"] == server.url(GGUF)
    for output in (result.stdout, result.stderr, llmctl("ls", "--json").stdout,
                   llmctl("show", "signed").stdout):
        assert SECRET not in output and "AKIA1234" not in output
    nothing_contains(sandbox.home, SECRET)
    assert sandbox.stored(llmctl) == ["signed:latest"]


def test_pulling_a_credentialed_url_again_prints_no_secret(
        sandbox: Sandbox, llmctl: Runner, smollm2_gguf: Path) -> None:
    with FileServer() as server:
        server.add(GGUF, smollm2_gguf)
        url = f"{server.url(GGUF)}?access_token={SECRET}"
        first = llmctl("pull", url)
        assert first.returncode == 0, first.stderr
        again = llmctl("pull", url)
    assert again.returncode == 0, again.stderr
    assert "already in the store" in again.stderr
    assert SECRET not in again.stdout + again.stderr
    nothing_contains(sandbox.home, SECRET)


def test_errors_and_partial_downloads_show_no_credential(
        sandbox: Sandbox, llmctl: Runner, files: Path) -> None:
    bogus = random_file(files / "drip.gguf", 200_000, seed=5)
    with FileServer() as server:
        missing = llmctl("pull", f"http://me:{SECRET}@127.0.0.1:{server.port}/gone.gguf"
                                 f"?sig={SECRET}2")
        line = one_line_error(missing, 1)
        assert "HTTP 404" in line and f"127.0.0.1:{server.port}/gone.gguf" in line
        # A download that stalls stays as a partial download, for resume.
        server.add("drip.gguf", bogus, Behaviour(drip=0.2))
        stalled = llmctl("pull", f"{server.url('drip.gguf')}?token={SECRET}", env=FAST)
        one_line_error(stalled, 1)
        partial = llmctl("ls", "--partial", "--json")
        table = llmctl("ls", "--partial")
    [listed] = json.loads(partial.stdout)
    assert listed["url"] == server.url("drip.gguf")
    for output in (missing.stderr, stalled.stderr, partial.stdout, table.stdout, table.stderr):
        assert SECRET not in output
    nothing_contains(sandbox.home, SECRET)
    assert sandbox.stored(llmctl) == []


# --- end to end: servers that lie ----------------------------------------------------------


def test_a_server_lying_about_ranges_gets_no_model_registered(
        sandbox: Sandbox, llmctl: Runner, smollm2_gguf: Path) -> None:
    """No sha256 given: before, the parts from the wrong offsets made a corrupt file
    whose GGUF header (in the first part) was fine, registered as verified."""
    with FileServer() as server:
        url = server.add(GGUF, smollm2_gguf, Behaviour(shift=4096))
        result = llmctl("pull", url, "--parts", "4")
    line = one_line_error(result, 1)
    assert "the server answered with bytes" in line and "not used" in line
    assert sandbox.stored(llmctl) == []
    assert stored_blobs(sandbox.home) == []


def test_a_file_that_fails_the_gguf_check_is_not_kept(
        sandbox: Sandbox, llmctl: Runner, files: Path) -> None:
    bogus = random_file(files / "bogus.gguf", 300_000, seed=9)
    with FileServer() as server:
        url = server.add("bogus.gguf", bogus)
        first = llmctl("pull", url)
        line = one_line_error(first, 4)
        assert line == f"error: {url}: not a GGUF file (no GGUF magic at the start); the " \
            "download was deleted"
        assert partial_files(sandbox.home) == []  # not kept as a complete download
        asked = len(server.requests)
        again = llmctl("pull", url)
        one_line_error(again, 4)
        assert len(server.requests) > asked  # the server was asked again
    assert partial_files(sandbox.home) == []
    assert sandbox.stored(llmctl) == []
    assert json.loads(llmctl("ls", "--partial", "--json").stdout) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 120 MB filesystem (tmpfs), where the suite may mount one (root on Linux)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_stream_of_unknown_size_on_a_small_disk(
        llmctl: Runner, small_disk: Path, smollm2_gguf: Path) -> None:
    """98 MB without a Content-Length onto a 120 MB disk: stopped with room to spare."""
    home = small_disk / "home"
    with FileServer() as server:
        url = server.add(GGUF, smollm2_gguf, Behaviour(ranges=False, length=False))
        result = llmctl("pull", url, env={"LLMCTL_HOME": str(home)})
    line = one_line_error(result, 5)
    assert "not enough disk space" in line and "did not say how big" in line
    assert partial_files(home) == []
    assert stored_blobs(home) == []
    free = os.statvfs(small_disk)
    assert free.f_bavail * free.f_frsize >= download.DISK_MARGIN


# --- end to end: one download for one URL --------------------------------------------------


def test_the_same_url_under_two_names_at_once_is_downloaded_once(
        sandbox: Sandbox, llmctl: Runner, smollm2_gguf: Path) -> None:
    from conftest import llmctl_executable

    size = smollm2_gguf.stat().st_size
    with FileServer() as server:
        url = server.add(GGUF, smollm2_gguf, Behaviour(rate=32 * 1024 * 1024))
        pulls = [subprocess.Popen([llmctl_executable(), "pull", url, "--name", name],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in ("first", "second")]
        outputs = [p.communicate(timeout=300) for p in pulls]
        sent = server.sent(GGUF)
    assert [p.returncode for p in pulls] == [0, 0], outputs
    # One download, plus the first byte each pull asks for (the second, to check that the
    # server still serves the file the store holds).
    assert sent <= size + 2
    assert any("reused a stored file" in err for _, err in outputs), outputs
    assert sorted(sandbox.stored(llmctl)) == ["first:latest", "second:latest"]
    assert [b.name for b in stored_blobs(sandbox.home)] == [f"sha256-{SHA}"]
    assert json.loads(llmctl("ls", "--partial", "--json").stdout) == []
    assert partial_files(sandbox.home) == []


def test_a_stored_download_is_reused_only_while_the_server_serves_the_same_file(
        sandbox: Sandbox, llmctl: Runner, smollm2_gguf: Path, files: Path) -> None:
    served = files / GGUF
    served.write_bytes(smollm2_gguf.read_bytes())
    size = served.stat().st_size
    with FileServer() as server:
        url = server.add(GGUF, served)
        assert llmctl("pull", url, "--name", "a").returncode == 0
        assert server.sent(GGUF) <= size + 1
        again = llmctl("pull", url, "--name", "b")
        assert again.returncode == 0, again.stderr
        assert "reused a stored file" in again.stderr
        assert server.sent(GGUF) <= size + 2  # the probe's byte only
        # The file on the server changes (its ETag and date with it): downloaded again.
        replacement = files / "new.gguf"
        replacement.write_bytes(smollm2_gguf.read_bytes())
        os.utime(replacement, (1_000_000_000, 1_000_000_000))
        os.replace(replacement, served)
        changed = llmctl("pull", url, "--name", "c")
        assert changed.returncode == 0, changed.stderr
        assert "downloaded and verified" in changed.stderr
        assert server.sent(GGUF) > 2 * size
    assert sorted(sandbox.stored(llmctl)) == ["a:latest", "b:latest", "c:latest"]
    assert json.loads(llmctl("ls", "--partial", "--json").stdout) == []


# --- end to end: hangs ---------------------------------------------------------------------


@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "one-stream"])
def test_a_dripping_server_is_given_up_after_one_retry(
        sandbox: Sandbox, llmctl: Runner, files: Path, ranges: bool) -> None:
    file = random_file(files / "drip.gguf", 100_000, seed=4)
    with FileServer() as server:
        url = server.add("drip.gguf", file, Behaviour(drip=0.2, ranges=ranges))
        result = llmctl("pull", url, env=FAST)
        downloads = [r for r in server.requests if r.range != "bytes=0-0" or not ranges]
    line = one_line_error(result, 1)
    assert "stalled" in line and "LLMCTL_STALL_TIMEOUT" in line
    assert "gave up after 2 attempts" in line
    assert len(downloads) == 2  # tried, retried once, then given up
    assert sandbox.stored(llmctl) == []


def test_a_server_that_never_answers_is_given_up(
        sandbox: Sandbox, llmctl: Runner, files: Path) -> None:
    file = random_file(files / "mute.gguf", 1000, seed=6)
    with FileServer() as server:
        url = server.add("mute.gguf", file, Behaviour(silent=True))
        result = llmctl("pull", url, env={"LLMCTL_READ_TIMEOUT": "1"})
        asked = len(server.requests)
    line = one_line_error(result, 1)
    assert "the server sent nothing for 1 s" in line and "LLMCTL_READ_TIMEOUT" in line
    assert asked == 2
    assert sandbox.stored(llmctl) == []


def test_a_connection_that_never_opens_is_given_up(sandbox: Sandbox, llmctl: Runner) -> None:
    """A listening socket whose queue is full: the kernel drops further connection
    attempts, as a firewall that swallows packets does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        result = llmctl("pull", f"http://127.0.0.1:{port}/x.gguf",
                        env={"LLMCTL_CONNECT_TIMEOUT": "1"})
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    line = one_line_error(result, 1)
    assert "no connection within 1 s" in line and "LLMCTL_CONNECT_TIMEOUT" in line
    assert sandbox.stored(llmctl) == []


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan", "inf"])
def test_a_timeout_that_is_not_a_number_of_seconds_is_refused(
        sandbox: Sandbox, llmctl: Runner, value: str) -> None:
    result = llmctl("pull", "http://127.0.0.1:9/x.gguf", env={"LLMCTL_STALL_TIMEOUT": value})
    line = one_line_error(result, 2)
    assert "LLMCTL_STALL_TIMEOUT" in line and "number of seconds" in line


# --- end to end: a Hub endpoint that is no Hub ---------------------------------------------


class _HtmlHandler(BaseHTTPRequestHandler):
    """A web server's welcome page, whatever is asked."""

    def do_GET(self) -> None:
        body = b"<!doctype html><html><body>Welcome to nginx!</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_hub_endpoint_answering_html_is_one_line(
        sandbox: Sandbox, llmctl: Runner, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HtmlHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        result = llmctl("pull", "hf://someone/model:Q4_K_M",
                        env={"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
                             "HF_HUB_DISABLE_TELEMETRY": "1"})
    finally:
        server.shutdown()
        server.server_close()
    line = one_line_error(result, 3)
    assert endpoint in line and "HF_ENDPOINT" in line and "not JSON" in line
    assert sandbox.stored(llmctl) == []


def test_sha256_of_served_file_is_the_models(smollm2_gguf: Path) -> None:
    """The constant the tests above rely on."""
    assert hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest() == SHA
