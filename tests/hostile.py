"""A sandbox for hostile-input tests: the store lies deep inside the test's own temporary
folder, with a canary folder beside it. Whatever a hostile archive, manifest or name
makes llmctl do, the test checks that nothing appeared outside LLMCTL_HOME: not in the
canary, not anywhere else in the sandbox.

Escapes are built to climb fewer levels than the store's depth (`Sandbox.depth`) and
absolute links point only into the sandbox, so even code that still had the hole could
never write above the test's own folder.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DEPTH = 6  # folders between the sandbox's root and the store


@dataclass(frozen=True)
class Sandbox:
    root: Path  # the sandbox; nothing may appear in it outside home and canary
    home: Path  # LLMCTL_HOME
    canary: Path  # beside home; must stay empty
    depth: int = DEPTH

    def outside_home(self) -> list[Path]:
        """Everything in the sandbox that is neither the store's nor one of the folders
        leading to it (nor the empty canary). Links are reported, never followed."""
        allowed = {self.root, self.canary, *self.home.parents}
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            here = Path(dirpath)
            if here == self.home or self.home in here.parents:
                dirnames[:] = []
                continue
            for name in dirnames + filenames:
                path = here / name
                if path == self.home:
                    continue
                if path not in allowed or path.is_symlink():
                    found.append(path)
        return sorted(found)

    def assert_contained(self) -> None:
        beside = list(self.canary.iterdir())
        assert not beside, f"written beside the store: {beside}"
        assert not self.outside_home(), f"written outside the store: {self.outside_home()}"

    def stored(self, llmctl) -> list[str]:
        """The models `ls --json` lists (it must itself succeed)."""
        result = llmctl("ls", "--json")
        assert result.returncode == 0, result.stderr
        return [f"{m['name']}:{m['tag']}" for m in json.loads(result.stdout or "[]")]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """LLMCTL_HOME at tmp_path/sandbox/d1/.../d6/llmctl-home, a canary beside it. The
    test fails afterwards if anything was written outside the store."""
    root = tmp_path / "sandbox"
    deep = root.joinpath(*(f"d{i}" for i in range(1, DEPTH + 1)))
    home = deep / "llmctl-home"
    canary = deep / "canary"
    canary.mkdir(parents=True)
    monkeypatch.setenv("LLMCTL_HOME", str(home))
    box = Sandbox(root, home, canary)
    yield box
    box.assert_contained()


def one_line_error(result: subprocess.CompletedProcess, code: int) -> str:
    """The failed command's exit code and its one-line error (no traceback, no bug
    report): the line is returned for the test to check what it says."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "this is a bug" not in result.stderr, result.stderr
    return lines[-1]
