"""Start-up stays light: --help, ls and completion import no engine or heavy library."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

HEAVY = {"torch", "mlx", "llama_cpp", "coremltools", "diffusers", "transformers",
         "huggingface_hub", "numpy", "gguf", "jinja2"}


def imported_modules(*args: str, env: dict[str, str] | None = None) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmctl", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60,
    )
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", result.stderr, re.M)
    assert names, result.stderr[-2000:]
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("args", [("--help",), ("ls",), ("ls", "--json"), ("run", "--help"),
                                  ("pull", "--help"), ("--version",)])
def test_command_imports_nothing_heavy(args: tuple[str, ...]) -> None:
    modules = imported_modules(*args)
    assert "typer" in modules  # the measurement works
    assert not modules & HEAVY, f"llmctl {' '.join(args)} imported {modules & HEAVY}"


def test_model_name_completion_imports_nothing_heavy() -> None:
    # What the shell asks when the user presses TAB after `llmctl run sm`.
    env = {"_LLMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "llmctl run sm", "COMP_CWORD": "2"}
    modules = imported_modules(env=env)
    assert not modules & HEAVY, f"completion imported {modules & HEAVY}"


def test_model_name_completion_offers_catalog_models() -> None:
    env = {**os.environ, "_LLMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "llmctl run sm",
           "COMP_CWORD": "2"}
    result = subprocess.run([sys.executable, "-m", "llmctl"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert "smollm2:135m" in result.stdout
