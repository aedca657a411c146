"""`llmctl pull https://...` end to end: the installed command, the real SmolLM2 GGUF,
and a real HTTP server on loopback (tests/fileserver.py) that misbehaves on demand."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PARIS, Runner, error_line, llmctl_executable
from fileserver import Behaviour, FileServer

SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def server(smollm2_gguf: Path) -> Iterator[FileServer]:
    with FileServer() as running:
        running.add(NAME, smollm2_gguf)
        yield running


def blobs(home: Path) -> list[Path]:
    folder = home / "blobs"
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def test_pull_by_url_verifies_stores_once_and_runs(
        llmctl: Runner, llmctl_home: Path, server: FileServer, smollm2_gguf: Path) -> None:
    url = server.url(NAME) + f"#sha256={SHA}"
    result = llmctl("pull", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "smollm2-135m-instruct.q4_1:latest\n"
    assert f"pulling {NAME}" in result.stderr
    [blob] = blobs(llmctl_home)
    assert blob.name == f"sha256-{SHA}" and not blob.is_symlink()
    assert blob.stat().st_size == smollm2_gguf.stat().st_size
    assert list((llmctl_home / "tmp" / "downloads").iterdir()) == []  # nothing left over
    sent = server.sent(NAME)

    again = llmctl("pull", url)
    assert again.returncode == 0 and "already in the store" in again.stderr
    assert server.sent(NAME) == sent  # nothing fetched again
    ran = llmctl("run", "smollm2-135m-instruct.q4_1", "--temperature", "0", PARIS)
    assert ran.stdout == "The capital of France is Paris.\n", ran.stderr
    manifest = json.loads(llmctl("show", "--json", "smollm2-135m-instruct.q4_1").stdout)
    assert manifest["source"]["url"] == server.url(NAME)


def test_json_and_quiet_output(llmctl: Runner, server: FileServer) -> None:
    quiet = llmctl("pull", "-q", server.url(NAME), "--name", "smol:q")
    assert quiet.returncode == 0 and quiet.stdout == "smol:q\n" and quiet.stderr == ""
    as_json = llmctl("pull", "--json", server.url(NAME), "--name", "smol:j", "--parts", "1")
    manifest = json.loads(as_json.stdout)
    assert manifest["name"] == "smol" and manifest["tag"] == "j"
    assert manifest["files"] == [{"name": NAME, "digest": f"sha256:{SHA}",
                                  "size": manifest["size"]}]


def test_a_wrong_sha256_is_refused_and_nothing_is_kept(
        llmctl: Runner, llmctl_home: Path, server: FileServer) -> None:
    result = llmctl("pull", server.url(NAME) + "#sha256=" + "0" * 64)
    assert result.returncode == 4
    line = error_line(result)
    assert f"sha256 is {SHA}, expected {'0' * 64}" in line
    assert llmctl("ls", "-q").stdout == ""
    assert blobs(llmctl_home) == []
    assert list((llmctl_home / "tmp" / "downloads").iterdir()) == []


def test_faults_on_the_way_are_survived(llmctl: Runner, server: FileServer,
                                        smollm2_gguf: Path) -> None:
    dropped = server.add("dropped.gguf", smollm2_gguf, Behaviour(drop_after=30_000_000))
    failing = server.add("failing.gguf", smollm2_gguf, Behaviour(fail_first=2))
    no_ranges = server.add("plain.gguf", smollm2_gguf, Behaviour(ranges=False))
    # Only the first with its sha256: a download known by its sha256 that the store holds
    # already is reused without asking any server, and each fault is to be met here.
    result = llmctl("pull", f"{dropped}#sha256={SHA}", failing, no_ranges)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dropped:latest", "failing:latest", "plain:latest"]
    size = smollm2_gguf.stat().st_size
    # The dropped stream was continued, not restarted: at most the bytes in flight when
    # the connection broke were fetched twice.
    assert server.sent("dropped.gguf") < size + 2_000_000
    assert [r.status for r in server.requests if r.path == "/plain.gguf"] == [200]


def test_kill_9_half_way_then_the_same_pull_completes(
        llmctl: Runner, llmctl_home: Path, server: FileServer, smollm2_gguf: Path) -> None:
    size = smollm2_gguf.stat().st_size
    url = f"{server.url(NAME)}#sha256={SHA}"
    process = subprocess.Popen([llmctl_executable(), "pull", url, "--rate-limit", "16M"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    downloads = llmctl_home / "tmp" / "downloads"
    deadline = time.monotonic() + 120
    done = 0
    while done < size // 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
        for state in downloads.glob("*.json") if downloads.exists() else []:
            with contextlib.suppress(ValueError, KeyError, FileNotFoundError):
                done = sum(p["done"] for p in json.loads(state.read_text())["parts"])
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert size // 2 <= done < size, "the pull was not stopped half way"
    partial = llmctl("ls", "--partial", "--json")
    [listed] = json.loads(partial.stdout)
    assert listed["url"] == server.url(NAME) and listed["done"] >= done

    before = server.sent(NAME)
    result = llmctl("pull", url)
    assert result.returncode == 0, result.stderr
    [blob] = blobs(llmctl_home)
    assert blob.name == f"sha256-{SHA}"
    # Fetched twice: at most what arrived after the last state write, far below one
    # part (a quarter of the file).
    assert server.sent(NAME) - 2 - size < size // 4
    assert server.sent(NAME) - before < size - done + size // 4
    assert json.loads(llmctl("ls", "--partial", "--json").stdout) == []


def test_two_pulls_of_one_model_at_once_download_it_once(
        llmctl_home: Path, server: FileServer, smollm2_gguf: Path) -> None:
    url = f"{server.url(NAME)}#sha256={SHA}"
    env = dict(os.environ)
    pulls = [subprocess.Popen([llmctl_executable(), "pull", url, "--rate-limit", "32M"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in pulls]
    assert [p.returncode for p in pulls] == [0, 0], outputs
    assert [out for out, _ in outputs] == ["smollm2-135m-instruct.q4_1:latest\n"] * 2
    assert server.sent(NAME) <= smollm2_gguf.stat().st_size + 2  # + the probe's byte
    assert any("waiting for another llmctl" in err for _, err in outputs)


def _zip(path: Path, entries: dict[str, bytes | Path]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, content in entries.items():
            if isinstance(content, Path):
                zf.write(content, name)
            else:
                zf.writestr(name, content)
    return path


def test_an_archive_is_unpacked_and_its_model_stored(
        llmctl: Runner, llmctl_home: Path, server: FileServer, smollm2_gguf: Path,
        tmp_path: Path) -> None:
    archive = _zip(tmp_path / "smol.zip", {f"smol/{NAME}": smollm2_gguf})
    url = server.add("smol.zip", archive)
    result = llmctl("pull", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "smol:latest\n"
    manifest = json.loads(llmctl("show", "--json", "smol").stdout)
    assert manifest["files"][0]["name"] == f"smol/{NAME}"
    assert manifest["files"][0]["digest"] == f"sha256:{SHA}"
    assert list((llmctl_home / "tmp" / "downloads").iterdir()) == []


@pytest.mark.parametrize("kind", ["zip-dotdot", "zip-absolute", "tar-link"])
def test_archive_entries_that_escape_are_refused(
        kind: str, llmctl: Runner, llmctl_home: Path, server: FileServer,
        tmp_path: Path) -> None:
    if kind == "zip-dotdot":
        archive = _zip(tmp_path / "bad.zip", {"model/../../escaped.txt": b"x"})
    elif kind == "zip-absolute":
        archive = _zip(tmp_path / "bad.zip", {"/tmp/escaped.txt": b"x"})
    else:
        archive = tmp_path / "bad.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            link = tarfile.TarInfo("model/config.json")
            link.type = tarfile.SYMTYPE
            link.linkname = "../../../../etc/passwd"
            tar.addfile(link)
            data = tarfile.TarInfo("model/weights.bin")
            data.size = 3
            tar.addfile(data, io.BytesIO(b"abc"))
    url = server.add(archive.name, archive)
    result = llmctl("pull", url)
    assert result.returncode == 4, result.stderr
    assert "refused" in error_line(result)
    assert llmctl("ls", "-q").stdout == ""
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/escaped.txt").exists()
    leftovers = [p.name for p in (llmctl_home / "tmp" / "downloads").iterdir()
                 if not p.name.endswith((".part", ".json"))]
    assert leftovers == []


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


def test_not_enough_disk_space_is_refused_before_downloading(
        llmctl: Runner, small_disk: Path, server: FileServer) -> None:
    result = llmctl("pull", server.url(NAME), env={"LLMCTL_HOME": str(small_disk / "home")})
    assert result.returncode == 5, result.stderr
    line = error_line(result)
    assert "not enough disk space" in line and "need 98.4 MB" in line and "have" in line
    assert server.sent(NAME) <= 1  # the probe's byte only


def test_a_catalog_entry_with_mirrors_and_a_token(
        llmctl: Runner, llmctl_home: Path, smollm2_gguf: Path, tmp_path: Path) -> None:
    """The token goes to the entry's own host, not to a mirror on another host."""
    with FileServer() as own, FileServer(host="127.0.0.2") as mirror:
        primary = own.url("missing.gguf")  # 404 on the entry's own host
        alternative = mirror.add(NAME, smollm2_gguf)
        catalog = llmctl_home / "catalog"
        catalog.mkdir(parents=True)
        (catalog / "mine.toml").write_text(f"""
[[model]]
name = "mirrored"
tag = "v1"
kind = "text"
engine = "llama"
format = "gguf"

  [[model.sources]]
  type = "url"
  url = "{primary}"
  sha256 = "{SHA}"
  alternative_urls = ["{alternative}"]
  auth = true
""")
        token = "hf_secret_value_123"
        result = llmctl("pull", "mirrored:v1", env={"LLMCTL_TOKEN": token})
        assert result.returncode == 0, result.stderr
        assert token not in result.stdout + result.stderr
        assert {r.authorization for r in own.requests} == {f"Bearer {token}"}
        assert {r.authorization for r in mirror.requests} == {None}
        assert llmctl("ls", "-q").stdout == "mirrored:v1\n"


def test_ctrl_c_keeps_the_partial_download_for_the_next_pull(
        llmctl: Runner, llmctl_home: Path, server: FileServer) -> None:
    process = subprocess.Popen([llmctl_executable(), "pull", server.url(NAME),
                                "--rate-limit", "8M"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    downloads = llmctl_home / "tmp" / "downloads"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(downloads.glob("*.json")
                                                   if downloads.exists() else []):
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert out == "" and "Traceback" not in err
    [listed] = json.loads(llmctl("ls", "--partial", "--json").stdout)
    assert 0 < listed["done"] < listed["size"]
    removed = llmctl("rm", "--partial", "-y")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(llmctl("ls", "--partial", "--json").stdout) == []
    assert [p for p in downloads.iterdir()] == []
