"""Start-up stays light: --help, ls and completion import no engine or heavy library."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = {"torch", "mlx", "llama_cpp", "coremltools", "diffusers", "transformers",
         "huggingface_hub", "numpy", "gguf", "jinja2", "onnxruntime", "onnxruntime_genai",
         "onnx", "accelerate", "safetensors", "faster_whisper", "ctranslate2", "av",
         "mlx_whisper", "pywhispercpp", "_pywhispercpp", "tokenizers"}


def imported_modules(*args: str, env: dict[str, str] | None = None) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmctl", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60,
    )
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", result.stderr, re.M)
    assert names, result.stderr[-2000:]
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("args", [("--help",), ("ls",), ("ls", "--json"), ("run", "--help"),
                                  ("pull", "--help"), ("--version",), ("ls", "--available"),
                                  ("ls", "--available", "--fits", "--json"),
                                  ("catalog", "ls"), ("import", "--help"),
                                  ("convert", "--help"), ("imagine", "--help"),
                                  ("ls", "--images"), ("ls", "--images", "--json"),
                                  ("transcribe", "--help"), ("bench", "--help")])
def test_command_imports_nothing_heavy(args: tuple[str, ...]) -> None:
    modules = imported_modules(*args)
    assert "typer" in modules  # the measurement works
    assert not modules & HEAVY, f"llmctl {' '.join(args)} imported {modules & HEAVY}"


COMPLETE = ("__complete", "bash", "2", "--", "llmctl", "run", "sm")


def test_model_name_completion_imports_nothing_heavy() -> None:
    # What the shell asks when the user presses TAB after `llmctl run sm`: the fast path
    # does not even import typer, nor httpx (which pull's downloads use).
    modules = imported_modules(*COMPLETE)
    assert "llmctl" in modules  # the measurement works
    assert not modules & (HEAVY | {"typer", "httpx", "rich"}), \
        f"completion imported {modules & (HEAVY | {'typer', 'httpx', 'rich'})}"


def test_model_name_completion_offers_catalog_models() -> None:
    result = subprocess.run([sys.executable, "-m", "llmctl", *COMPLETE], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "words"
    assert "smollm2:135m" in [line.split("\t")[0] for line in result.stdout.splitlines()]


def test_scanning_the_hf_cache_imports_nothing_heavy(tmp_path: Path) -> None:
    # `import --from hf-cache` reads the cache's folders itself: no huggingface_hub.
    repo = tmp_path / "hub" / "models--org--repo"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / ("a" * 64)).write_bytes(b"GGUF")
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    (repo / "snapshots" / "c0ffee" / "m-Q4_0.gguf").symlink_to("../../blobs/" + "a" * 64)
    modules = imported_modules("import", "--from", "hf-cache", "--dry-run",
                               env={"HF_HUB_CACHE": str(tmp_path / "hub"),
                                    "LLMCTL_HOME": str(tmp_path / "home")})
    assert not modules & HEAVY, f"import --dry-run imported {modules & HEAVY}"
