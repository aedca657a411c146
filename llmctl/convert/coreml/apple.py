"""`convert --to coreml --via apple`: Apple's own torch2coreml converts the components, in
the Python that has it installed; llmctl takes its packages from there and does the rest
(chunking, palettization, the tokenizer files, compiling, the resource folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from llmctl.convert.coreml.options import CoremlOptions
from llmctl.errors import EngineFailure

APPLE_MODULE = "python_coreml_stable_diffusion"
APPLE_INSTALL = "pip install git+https://github.com/apple/ml-stable-diffusion"
APPLE_PYTHON_ENV = "LLMCTL_APPLE_PYTHON"


def apple_python() -> str:
    """The Python that runs Apple's torch2coreml: LLMCTL_APPLE_PYTHON, else this one.
    Apple's package pins old torch, diffusers, transformers, huggingface_hub and numpy,
    which llmctl's own dependencies exclude, so it usually lives in a venv of its own."""
    return os.environ.get(APPLE_PYTHON_ENV) or sys.executable


def apple_command(source: Path, out: Path, options: CoremlOptions) -> list[str]:
    """torch2coreml's command line for the same conversion of each component. Chunking,
    palettization (chunks included), the tokenizer files, compiling and the resource
    folder are llmctl's, afterwards: Apple's bundling step downloads CLIP's tokenizer, and
    its --chunk-unet with --quantize-nbits leaves the chunks unpalettized."""
    command = [apple_python(), "-m", f"{APPLE_MODULE}.torch2coreml",
               "--model-version", str(source), "-o", str(out),
               "--convert-text-encoder", "--convert-unet", "--convert-vae-decoder",
               "--attention-implementation", options.attention.value,
               "--min-deployment-target", options.min_deployment_target,
               "--compute-unit", options.compute_unit]
    if options.vae_encoder:
        command.append("--convert-vae-encoder")
    if options.safety_checker:
        command.append("--convert-safety-checker")
    if options.latent_h:
        command += ["--latent-h", str(options.latent_h)]
    if options.latent_w:
        command += ["--latent-w", str(options.latent_w)]
    return command


def require_apple() -> None:
    python = apple_python()
    probe = ("import importlib.util, sys; "
             f"sys.exit(importlib.util.find_spec('{APPLE_MODULE}') is None)")
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
    except OSError:
        found = False
    if not found:
        where = f"{APPLE_PYTHON_ENV}={python}" if os.environ.get(APPLE_PYTHON_ENV) else python
        raise EngineFailure(
            f"--via apple needs Apple's {APPLE_MODULE}, which {where} cannot import (it is "
            f"not on PyPI); install it from its repository into a venv of its own "
            f"({APPLE_INSTALL}) and set {APPLE_PYTHON_ENV} to that venv's python")


def run_torch2coreml(source: Path, out: Path, options: CoremlOptions, log: Path,
              step: Callable[[str], None]) -> None:
    """Apple's torch2coreml, once: `out`/done marks a finished run for the next one."""
    done = out / "done"
    if done.exists():
        step("Apple's torch2coreml: ran in an earlier run, kept")
        return
    out.mkdir(exist_ok=True)
    command = apple_command(source, out, options)
    step("running Apple's torch2coreml (its own progress goes to the log)")
    with open(log, "a") as output:
        code = subprocess.run(command, stdout=output, stderr=output).returncode
    if code != 0:
        raise EngineFailure(f"Apple's torch2coreml failed (exit {code}); its output: {log}")
    done.touch()


def written_package(out: Path, component: str, log: Path) -> Path:
    """The package Apple's script wrote for a component: Stable_Diffusion_version_
    <model>_<component>.mlpackage, with Apple's component names."""
    found = sorted(out.glob(f"*_{component}.mlpackage"))
    if not found:
        raise EngineFailure(f"Apple's torch2coreml wrote no {component} model; its "
                            f"output: {log}")
    return found[0]
