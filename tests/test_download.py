"""The URL downloader against a real HTTP server on loopback that misbehaves on demand.

These call llmctl.store.download in-process on random files (quick); test_pull_url.py
runs the installed `llmctl pull` on the real model.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
from fileserver import Behaviour, FileServer, random_file

from llmctl.errors import DownloadFailed, VerificationFailed
from llmctl.store import download
from llmctl.store.download import DownloadRequest
from llmctl.store.layout import StoreLayout

SIZE = 24 * 1024 * 1024 + 12345  # three parts of 8 MiB and a bit


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = random_file(tmp_path_factory.mktemp("payload") / "blob.bin", SIZE, seed=1)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def layout(llmctl_home: Path) -> StoreLayout:
    return StoreLayout(llmctl_home)


def fetch(layout: StoreLayout, url: str, sha: str | None, **kwargs: object
          ) -> download.Downloaded:
    return download.download(layout, DownloadRequest([url], sha), **kwargs)  # type: ignore[arg-type]


def test_parallel_parts_give_the_same_bytes(layout: StoreLayout, payload: tuple[Path, str]
                                           ) -> None:
    path, sha = payload
    with FileServer() as server:
        url = server.add("blob.bin", path)
        done = fetch(layout, url, sha, parts=4)
        ranges = [r.range for r in server.requests if r.status == 206]
    assert done.digest == "sha256:" + sha
    assert done.path.read_bytes() == path.read_bytes()
    # The probe (bytes=0-0) and one request per part: 3 parts of >= 8 MiB.
    assert len(ranges) == 1 + 3 and ranges[0] == "bytes=0-0"
    assert server.sent("blob.bin") == SIZE + 1


def test_a_dropped_connection_is_resumed_from_where_it_stopped(
        layout: StoreLayout, payload: tuple[Path, str]) -> None:
    path, sha = payload
    with FileServer() as server:
        url = server.add("blob.bin", path, Behaviour(drop_after=5_000_000))
        done = fetch(layout, url, sha, parts=1)
        later = [r.range for r in server.requests if r.status == 206][2:]
    assert done.digest == "sha256:" + sha
    # The retry asked for the rest only, from about where the cut happened.
    [retry] = later
    assert retry.startswith("bytes=") and int(retry[6:].split("-")[0]) > 4_000_000
    assert server.sent("blob.bin") <= SIZE + 1 + 1_000_000


def test_server_errors_are_retried(layout: StoreLayout, payload: tuple[Path, str]) -> None:
    path, sha = payload
    with FileServer() as server:
        url = server.add("blob.bin", path, Behaviour(fail_first=2))
        done = fetch(layout, url, sha)
        statuses = [r.status for r in server.requests]
    assert done.digest == "sha256:" + sha
    assert statuses[:2] == [500, 500]


def test_a_server_without_ranges_gets_one_stream(layout: StoreLayout,
                                                 payload: tuple[Path, str]) -> None:
    path, sha = payload
    with FileServer() as server:
        url = server.add("blob.bin", path, Behaviour(ranges=False))
        done = fetch(layout, url, sha, parts=4)
        statuses = [r.status for r in server.requests]
    assert done.digest == "sha256:" + sha
    assert statuses == [200]  # the probe's answer was the whole file, used as it came
    assert server.sent("blob.bin") == SIZE


def test_a_wrong_sha256_deletes_the_download(layout: StoreLayout,
                                             payload: tuple[Path, str]) -> None:
    path, _ = payload
    with FileServer() as server:
        url = server.add("blob.bin", path)
        with pytest.raises(VerificationFailed, match="expected 00"):
            fetch(layout, url, "00" * 32)
    assert list(layout.downloads.iterdir()) == []


def test_alternative_urls_are_tried_in_order(layout: StoreLayout,
                                             payload: tuple[Path, str]) -> None:
    path, sha = payload
    with FileServer() as server:
        missing = server.url("gone.bin")
        broken = server.add("broken.bin", path, Behaviour(status=403))
        good = server.add("blob.bin", path)
        done = download.download(layout, DownloadRequest([missing, broken, good], sha))
    assert done.url == good and done.digest == "sha256:" + sha


def test_every_url_failing_says_why_for_each(layout: StoreLayout,
                                             payload: tuple[Path, str]) -> None:
    path, sha = payload
    with FileServer() as server:
        missing = server.url("gone.bin")
        broken = server.add("broken.bin", path, Behaviour(status=403))
        with pytest.raises(DownloadFailed) as failed:
            download.download(layout, DownloadRequest([missing, broken], sha))
    assert "gone.bin: HTTP 404" in str(failed.value)
    assert "broken.bin: HTTP 403" in str(failed.value)


def test_an_interrupted_download_continues_and_fetches_no_part_twice(
        layout: StoreLayout, payload: tuple[Path, str]) -> None:
    """Stop a download part-way (as Ctrl-C does), then start again: the second run asks
    only for what the state file says is missing."""
    path, sha = payload
    stop_at = SIZE // 2
    with FileServer() as server:
        url = server.add("blob.bin", path, Behaviour(rate=16 * 1024 * 1024))

        def interrupt(done: int, total: int) -> None:
            if done >= stop_at:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            fetch(layout, url, sha, parts=3, on_progress=interrupt)
        [partial] = download.partials(layout)
        assert stop_at <= partial.done < SIZE and partial.size == SIZE
        first = server.sent("blob.bin")
        done = fetch(layout, url, sha, parts=3)
        total = server.sent("blob.bin")
    assert done.digest == "sha256:" + sha
    assert done.path.read_bytes() == path.read_bytes()
    # What the second run fetched again is at most what arrived after the last state
    # write before the interruption; far less than one part (8 MiB).
    assert total - SIZE - 2 < 8 * 1024 * 1024
    assert first < total


def test_the_rate_limit_holds_across_parts(layout: StoreLayout, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "MIN_PART_SIZE", 256 * 1024)
    small = random_file(tmp_path / "small.bin", 2 * 1024 * 1024, seed=2)
    sha = hashlib.sha256(small.read_bytes()).hexdigest()
    rate = 1024 * 1024
    import time

    with FileServer() as server:
        url = server.add("small.bin", small)
        began = time.monotonic()
        fetch(layout, url, sha, rate_limit=rate, parts=4)
        took = time.monotonic() - began
        parts = [r for r in server.requests if r.status == 206 and r.range != "bytes=0-0"]
    assert len(parts) == 4
    # A lower bound only (a slow machine makes it longer, never shorter): 2 MiB at
    # 1 MiB/s, less the quarter-second burst the limiter allows.
    assert took >= 1.5


def test_a_token_goes_to_its_own_host_only(layout: StoreLayout,
                                           payload: tuple[Path, str]) -> None:
    path, sha = payload
    with FileServer(host="127.0.0.2") as other, FileServer() as server:
        target = other.add("blob.bin", path)
        url = server.add("blob.bin", path, Behaviour(redirect=target))
        request = DownloadRequest([url], sha, auth=(url, "secret-token"))
        download.download(layout, request)
    assert {r.authorization for r in server.requests} == {"Bearer secret-token"}
    assert {r.authorization for r in other.requests} == {None}


def test_two_downloads_of_one_file_at_once_fetch_it_once(
        layout: StoreLayout, payload: tuple[Path, str]) -> None:
    path, sha = payload
    results: list[download.Downloaded] = []
    waited = threading.Event()
    with FileServer() as server:
        url = server.add("blob.bin", path, Behaviour(rate=32 * 1024 * 1024))

        def one() -> None:
            results.append(download.download(layout, DownloadRequest([url], sha),
                                              on_wait=waited.set))

        threads = [threading.Thread(target=one) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sent = server.sent("blob.bin")
    assert waited.is_set()
    assert [r.digest for r in results] == ["sha256:" + sha] * 2
    # The second found the first's verified file and fetched nothing.
    assert sent == SIZE + 1


def test_the_state_file_never_runs_ahead_of_the_data(layout: StoreLayout,
                                                     payload: tuple[Path, str]) -> None:
    path, sha = payload
    data = path.read_bytes()
    checked = []
    with FileServer() as server:
        url = server.add("blob.bin", path, Behaviour(rate=8 * 1024 * 1024))
        key = DownloadRequest([url], sha).key

        def check(done: int, total: int) -> None:
            state_file = layout.downloads / f"{key}.json"
            if not state_file.exists():
                return
            state = json.loads(state_file.read_text())
            part_file = layout.downloads / f"{key}.part"
            with open(part_file, "rb") as handle:
                for part in state["parts"]:
                    handle.seek(part["start"])
                    got = handle.read(part["done"])
                    assert got == data[part["start"]:part["start"] + part["done"]]
            checked.append(done)

        fetch(layout, url, sha, parts=3, on_progress=check)
    assert len(checked) > 3
