"""A real Hugging Face Hub-compatible server on loopback: olah, serving git repositories
the test suite builds (these machines cannot reach the Hub).

olah serves each git repository under `mirrors/models/<org>/<repo>` as a Hub model repo:
`/api/models/<repo>/revision/<rev>` lists its files, `/<repo>/resolve/<rev>/<file>` serves
them. The branch must be called `main` (with `master` olah answers "Repository not
found"). Its access log, one line per request, tells the tests what was downloaded.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

OLAH = Path(sys.executable).parent / "olah-cli"
_GIT_OPTIONS = ("-c", "user.name=llmctl tests", "-c", "user.email=tests@llmctl.invalid",
                 "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false",
                 # The GGUF is incompressible: zlib would only cost seconds.
                 "-c", "core.compression=0", "-c", "core.looseCompression=0")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *_GIT_OPTIONS, *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class HubServer:
    root: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "olah.log"

    def repo_path(self, repo: str) -> Path:
        return self.root / "mirrors" / "models" / repo

    def commit(self, repo: str, files: dict[str, Path | bytes | str], message: str) -> str:
        """Add or replace files in `repo` (created on first use, branch main) and commit
        them; returns the commit's sha. A Path is hard-linked into the work tree when the
        filesystem allows (git reads it once; nothing is copied twice)."""
        path = self.repo_path(repo)
        if not (path / ".git").exists():
            path.mkdir(parents=True)
            _git(path, "init", "-q", "-b", "main")
        for name, content in files.items():
            target = path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            if isinstance(content, Path):
                try:
                    os.link(content, target)
                except OSError:
                    shutil.copyfile(content, target)
            else:
                target.write_bytes(content.encode() if isinstance(content, str) else content)
        _git(path, "add", "-A")
        _git(path, "commit", "-q", "-m", message)
        return _git(path, "rev-parse", "HEAD")

    def tag(self, repo: str, name: str, commit: str) -> None:
        _git(self.repo_path(repo), "tag", name, commit)

    def downloads(self, repo: str, file: str | None = None) -> int:
        """GET requests for `file` (any file: None) of `repo` at any revision: each is a
        download. HEAD requests, which only ask for a file's commit and etag, are not."""
        with open(self.log, encoding="utf-8", errors="replace") as log:
            return sum(f'"GET /{repo}/resolve/' in line
                       and (file is None or f"/{file} HTTP/" in line) for line in log)

    def start(self, timeout: float = 60) -> None:
        (self.root / "mirrors" / "models").mkdir(parents=True, exist_ok=True)
        (self.root / "configs.toml").write_text(f"""\
[basic]
host = "127.0.0.1"
port = {self.port}
repos-path = "./repos"
mirrors-path = ["./mirrors"]
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{self.port}"
mirror-lfs-netloc = "127.0.0.1:{self.port}"

[accessibility]
offline = true
""")
        with open(self.log, "ab") as log:
            # Unbuffered: a test reads the access log as soon as a request is answered.
            self.process = subprocess.Popen(
                [str(OLAH), "-c", "configs.toml"], cwd=self.root, stdout=log,
                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with {self.process.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            try:
                # Any HTTP answer means it is serving (an unknown repo gets a 4xx).
                urllib.request.urlopen(f"{self.url}/api/models/none/none/revision/main",
                                       timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("olah did not start:\n"
                                       + self.log.read_text(errors="replace")[-3000:]) from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """An olah server on a free loopback port, with no repositories yet."""
    if not OLAH.exists():
        pytest.skip("olah is not installed (pip install olah)")
    server = HubServer(tmp_path_factory.mktemp("hub"), _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
