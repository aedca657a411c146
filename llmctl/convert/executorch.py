"""Text models to ExecuTorch: `llmctl convert MODEL --to executorch [-q 8da4w|fp32]
[--backend xnnpack|portable] [--ctx TOKENS]`.

ExecuTorch's own export path does the work, in a child process
(llmctl.convert.executorch_export): transformers' ExecuTorch integration exports the
checkpoint with a static KV cache of `--ctx` tokens, torchao quantizes it for 8da4w, and
ExecuTorch lowers it to XNNPACK and writes the .pte program. A GGUF model is first
dequantized into a Hugging Face checkpoint, as `--to mlx` does.

The result is a folder: model.pte, the tokenizer files and chat template, config.json and
executorch.json (what was exported, how, and with which library versions), registered as
format "pte" by the frame (llmctl.convert) only once it is complete. Its program holds
the constant methods ExecuTorch's LLM runner reads, so the runner runs it as it is.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.convert import Product, Request, Target, work_folder
from llmctl.convert.process import killed_for_memory, read_pieces, stop
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError
from llmctl.formats import ModelFormat, hf, pte
from llmctl.host import peak_memory_bytes
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout, reference_part
from llmctl.store.lookup import find_stored
from llmctl.store.names import NameRef, Reference
from llmctl.store.resolve import Runnable

QUANTIZE = ("fp32", "8da4w")
BACKENDS = ("xnnpack", "portable")
DEFAULT_CONTEXT = 512  # every step attends over the whole static cache: see README
MIN_CONTEXT = 64
PTE = ModelFormat("text", "executorch", "pte")
EXPORT = "llmctl.convert.executorch_export"
NEEDS = ("executorch", "torch", "transformers", "torchao")
INSTALL = "pip install 'llmctl[executorch]'"
# Architectures transformers' ExecuTorch export is known to take with a static cache
# (decoder-only models on its standard attention); others are refused before the work.
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "MistralForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM",
                 "SmolLM3ForCausalLM", "OlmoForCausalLM", "GraniteForCausalLM")
# The files beside the program the engine and ExecuTorch's runner read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "config.json")


@dataclass(frozen=True)
class ExecutorchOptions:
    quantize: str = "fp32"
    backend: str = "xnnpack"
    context_length: int = DEFAULT_CONTEXT

    def check(self) -> None:
        if self.quantize not in QUANTIZE:
            raise UsageError(f"-q {self.quantize} is not an ExecuTorch recipe",
                             hint="use -q 8da4w (int8 activations, int4 weights) or -q fp32")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend} is not supported",
                             hint=f"use --backend {' or '.join(BACKENDS)}")
        if self.context_length < MIN_CONTEXT:
            raise UsageError(f"--ctx {self.context_length} is below {MIN_CONTEXT} tokens",
                             hint=f"use --ctx {MIN_CONTEXT} or more")
        if self.quantize == "8da4w" and self.backend != "xnnpack":
            raise UsageError("-q 8da4w needs --backend xnnpack",
                             hint="its int4 kernels are XNNPACK's")

    @property
    def suffix(self) -> str:
        """The tag suffix of the result: `executorch-fp32`, `executorch-8da4w-ctx512`."""
        parts = ["executorch", self.quantize]
        if self.backend != "xnnpack":
            parts.append(self.backend)
        if self.context_length != DEFAULT_CONTEXT:
            parts.append(f"ctx{self.context_length}")
        return "-".join(parts)


class ExecutorchTarget(Target):
    to = "executorch"
    model_format = PTE
    options = ExecutorchOptions
    use = "run it with: llmctl run {reference}"
    flags = ("-q", "--backend", "--ctx")

    def options_from_cli(self, given: dict[str, Any]) -> ExecutorchOptions:
        """-q (bare: 8da4w; not given: fp32), --backend, --ctx."""
        quantize = given.get("-q")
        return ExecutorchOptions(
            quantize="8da4w" if quantize == "" else (quantize or "fp32").strip().lower(),
            backend=str(given.get("--backend", "xnnpack")).lower(),
            context_length=given.get("--ctx", DEFAULT_CONTEXT))

    def refuse_before_pulling(self, ref: Reference, layout: StoreLayout,
                              catalog: Catalog) -> None:
        if not isinstance(ref, NameRef) or find_stored(layout, catalog, ref) is not None:
            return
        match = catalog.find(ref.name, ref.tag)
        if match is not None and match.entry.kind in ("image", "speech"):
            raise UsageError(f"{match.reference} is an {match.entry.kind} model"
                             if match.entry.kind == "image" else
                             f"{match.reference} is a speech model",
                             hint="--to executorch converts text models: GGUF, or Hugging "
                             "Face safetensors checkpoints")

    def check_source(self, source: Runnable, options: ExecutorchOptions) -> None:
        if source.kind != "text" or source.format not in ("gguf", "safetensors"):
            hint = ("--to executorch converts text models: GGUF, or Hugging Face "
                    "safetensors checkpoints")
            if source.format == "pte":
                hint = f"it is an ExecuTorch program already: llmctl run {source.name}"
            article = "an" if source.kind == "image" else "a"
            raise UsageError(f"{source.name} is {article} {source.kind} model "
                             f"({source.format})", hint=hint)
        if source.format == "safetensors":
            config = hf.read_config(source.path)
            if hf.mlx_quantized(config):
                raise UsageError(f"{source.name} is quantized for MLX",
                                 hint="convert the unquantized checkpoint")
            check_architecture(source.name, config)
            trained = hf.trained_context(config)
            if trained and options.context_length > trained:
                raise UsageError(f"--ctx {options.context_length} is more than the {trained} "
                                 f"tokens {source.name} was trained for",
                                 hint=f"use --ctx {trained} or less")
        missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
        if missing:
            raise EngineUnavailable("executorch", f"the export needs {', '.join(missing)}, "
                                    "which is not installed", INSTALL)

    @contextlib.contextmanager
    def work(self, request: Request) -> Iterator[Product]:
        source, options, layout, step = (request.source, request.options, request.layout,
                                          request.step)
        with layout.work_lock(f"convert-{reference_part(request.reference)}"), \
                work_folder(layout) as work:
            from llmctl.convert.mlx import hf_checkpoint

            hf_folder, _dtype = hf_checkpoint(source, work, step)
            config = hf.read_config(hf_folder)
            check_architecture(source.name, config)
            out = work / "executorch"
            out.mkdir()
            facts = export(hf_folder, out / pte.PROGRAM, options, step)
            for name in TOKENIZER_FILES:
                if (hf_folder / name).is_file():
                    shutil.copy2(hf_folder / name, out / name)
            record = {"quantize": options.quantize, "backend": options.backend,
                      "context_length": options.context_length, "dynamic_shape": False,
                      "methods": facts["methods"], "export_seconds": facts["seconds"],
                      "versions": _versions()}
            (out / pte.RECORD).write_text(json.dumps(record, indent=2) + "\n")
            origin = {"quantize": options.quantize, "backend": options.backend,
                      "context_length": options.context_length}
            yield Product(out, origin, {"peak_memory": peak_memory_bytes(children=True)})


TARGET = ExecutorchTarget()


def check_architecture(name: str, config: dict[str, Any]) -> None:
    architectures = config.get("architectures") or []
    found = architectures[0] if architectures else config.get("model_type", "unknown")
    if found not in ARCHITECTURES:
        raise UsageError(f"{name} is a {found}, which llmctl does not export to ExecuTorch",
                         hint=f"--to executorch takes {', '.join(ARCHITECTURES[:4])} and "
                         "other decoder-only models of transformers")


def export(hf_folder: Path, out: Path, options: ExecutorchOptions,
           step: Callable[..., None]) -> dict[str, Any]:
    """Run the export child on `hf_folder`, writing the program `out`; its facts. An
    EngineFailure with its last error line when it fails."""
    command = [sys.executable, "-m", EXPORT, str(hf_folder), str(out), "--quantize",
               options.quantize, "--backend", options.backend, "--ctx",
               str(options.context_length)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    last: collections.deque[str] = collections.deque(maxlen=50)
    done: dict[str, Any] = {}

    def read(piece: str) -> None:
        piece = piece.strip()
        if piece.startswith("llmctl-step "):
            step(json.loads(piece.removeprefix("llmctl-step "))["status"])
        elif piece.startswith("llmctl-done "):
            done.update(json.loads(piece.removeprefix("llmctl-done ")))
        elif piece:
            last.append(piece)

    step(f"converting to ExecuTorch, {options.quantize} on {options.backend}, a "
         f"{options.context_length}-token KV cache")
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, cwd=out.parent, env=env)
    try:
        read_pieces(child, read)
        code = child.wait()
    except BaseException:  # Ctrl-C (or anything else): the export stops too
        stop(child)
        raise
    if code != 0 or not done or not out.is_file():
        why = ("killed, probably for lack of memory" if killed_for_memory(code)
               else _error_line(last))
        raise EngineFailure(f"the ExecuTorch export failed: {why}")
    return done


def _error_line(lines: collections.deque[str]) -> str:
    """The child's last words on what went wrong: a Python exception's line, else its
    last line."""
    import re

    for line in reversed(lines):
        if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", line):
            return line
    return lines[-1] if lines else "no output"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("executorch", "torch", "torchao", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found
