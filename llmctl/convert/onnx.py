"""Text models to ONNX Runtime GenAI: `llmctl convert MODEL --to onnx [-q PRECISION]
[--execution-provider cpu|cuda|dml]`.

onnxruntime-genai's own model builder does the work: it reads a Hugging Face checkpoint,
writes the ONNX graph for the architecture (quantized to int4 or int8, or in fp16/fp32),
genai_config.json and the tokenizer files. A GGUF model is first dequantized into such a
checkpoint, as `--to mlx` does (`llmctl.convert.mlx.dequantize_gguf`).

The builder runs as a child process (`python -m onnxruntime_genai.models.builder`) in the
conversion's work folder, its cache there too: what it prints never reaches llmctl's
stdout, a Ctrl-C at the terminal reaches it as well, and an interrupted llmctl stops it
before the work folder goes. Its progress bars become progress events; when it fails, its
last error line is the message. The frame (llmctl.convert) stores the result, as format
"onnx", only once it is complete.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from llmctl.convert import Product, Request, Target, work_folder
from llmctl.convert.process import killed_for_memory, read_pieces, stop
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError
from llmctl.formats import ModelFormat, hf
from llmctl.host import peak_memory_bytes
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout, reference_part
from llmctl.store.lookup import find_stored
from llmctl.store.names import NameRef, Reference
from llmctl.store.resolve import Runnable


class Provider(StrEnum):
    """Where a result will run (`--execution-provider`), in the builder's words."""

    cpu = "cpu"
    cuda = "cuda"
    dml = "dml"  # DirectML


PRECISIONS = ("int4", "int8", "fp16", "fp32")
PROVIDERS = tuple(Provider)
DEFAULT_PRECISION = "int4"
# What the builder says it builds ("Valid precision + execution provider combinations"),
# among the precisions and providers llmctl offers.
BUILDS = {"cpu": ("int4", "int8", "fp32"), "cuda": ("int4", "int8", "fp16", "fp32"),
          "dml": ("int4", "fp16")}
ONNX = ModelFormat("text", "onnx", "onnx")
BUILDER = "onnxruntime_genai.models.builder"
# What the builder needs beside onnxruntime-genai (its imports), and how to get them.
BUILDER_NEEDS = ("onnxruntime_genai", "onnx", "torch", "transformers")
INSTALL = "pip install 'llmctl[onnx]'"


@dataclass(frozen=True)
class OnnxOptions:
    precision: str = DEFAULT_PRECISION
    provider: str = "cpu"

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"-q {self.precision} is not an ONNX precision",
                             hint=f"use -q {', '.join(PRECISIONS)} (bare -q: "
                             f"{DEFAULT_PRECISION})")
        if self.provider not in PROVIDERS:
            raise UsageError(f"--execution-provider {self.provider} is not supported",
                             hint=f"use {', '.join(PROVIDERS)}")
        if self.precision not in BUILDS[self.provider]:
            *others, last = BUILDS[self.provider]
            raise UsageError(f"onnxruntime-genai builds no {self.precision} model for "
                             f"{self.provider}", hint=f"for {self.provider} use -q "
                             f"{', '.join(others)} or {last}")

    @property
    def suffix(self) -> str:
        """The tag suffix of the result: `onnx-int4`, `onnx-fp16-cuda`."""
        where = "" if self.provider == "cpu" else f"-{self.provider}"
        return f"onnx-{self.precision}{where}"


class OnnxTarget(Target):
    to = "onnx"
    model_format = ONNX
    options = OnnxOptions
    use = "run it with: llmctl run {reference}"
    flags = ("-q", "--execution-provider")

    def options_from_cli(self, given: dict[str, Any]) -> OnnxOptions:
        """-q PRECISION (bare -q: int4, the default too), --execution-provider (cpu)."""
        precision = (given.get("-q") or DEFAULT_PRECISION).strip().lower()
        return OnnxOptions(precision=precision,
                           provider=str(given.get("--execution-provider", "cpu")).lower())

    def refuse_before_pulling(self, ref: Reference, layout: StoreLayout,
                              catalog: Catalog) -> None:
        """A catalog image model would be pulled before check_source refuses it."""
        if not isinstance(ref, NameRef) or find_stored(layout, catalog, ref) is not None:
            return
        match = catalog.find(ref.name, ref.tag)
        if match is not None and match.entry.kind == "image":
            raise UsageError(f"{match.reference} is an image model",
                             hint="--to onnx converts text models: GGUF, or Hugging Face "
                             "safetensors checkpoints")

    def check_source(self, source: Runnable, options: OnnxOptions) -> None:
        if source.kind != "text" or source.format not in ("gguf", "safetensors"):
            hint = ("--to onnx converts text models: GGUF, or Hugging Face safetensors "
                    "checkpoints")
            if source.format == "onnx":
                hint = f"it is an ONNX model already: llmctl run {source.name}"
            raise UsageError(f"{source.name} is {'an image' if source.kind == 'image' else 'a'}"
                             f" {'' if source.kind == 'image' else 'text '}model "
                             f"({source.format})", hint=hint)
        if source.format == "safetensors" and hf.mlx_quantized(hf.read_config(source.path)):
            raise UsageError(f"{source.name} is quantized for MLX",
                             hint="convert the unquantized checkpoint")
        missing = [name for name in BUILDER_NEEDS if importlib.util.find_spec(name) is None]
        if missing:
            raise EngineUnavailable("onnx", f"the model builder needs {', '.join(missing)}, "
                                    "which is not installed", INSTALL)

    @contextlib.contextmanager
    def work(self, request: Request) -> Iterator[Product]:
        source, options, layout, step = (request.source, request.options, request.layout,
                                          request.step)
        with layout.work_lock(f"convert-{reference_part(request.reference)}"), \
                work_folder(layout) as work:
            from llmctl.convert.mlx import hf_checkpoint

            hf_folder, _dtype = hf_checkpoint(source, work, step)
            out = work / "onnx"
            layers = hf.text_settings(hf.read_config(hf_folder)).get("num_hidden_layers")
            build(hf_folder, out, work / "cache", options,
                  BuilderProgress(step, options, layers if isinstance(layers, int) else 0))
            origin = {"precision": options.precision,
                      "execution_provider": options.provider,
                      "builder": _builder_version()}
            yield Product(out, origin, {"peak_memory": peak_memory_bytes(children=True)})


TARGET = OnnxTarget()


class BuilderProgress:
    """Reads the builder's output, a piece at a time (tqdm redraws its bar after a
    carriage return), into progress steps; keeps its last lines for an error message."""

    def __init__(self, step: Callable[..., None], options: OnnxOptions, layers: int):
        self.step = step
        self.options = options
        self.layers = layers
        self.last: collections.deque[str] = collections.deque(maxlen=50)
        self._quantizing = False

    def read(self, piece: str) -> None:
        piece = piece.strip()
        if not piece:
            return
        self.last.append(piece)
        if found := re.match(r"Reading layer (\d+)", piece):
            self.step("building the ONNX graph (model builder)", int(found[1]) + 1,
                      self.layers)
        elif piece.startswith("Reading embedding"):
            self.step("building the ONNX graph (model builder)", 0, self.layers)
        elif "matmul_nbits_quantizer" in piece:  # onnxruntime's quantizer, node by node
            if not self._quantizing:
                self._quantizing = True
                self.step(f"quantizing to {self.options.precision}")
        elif bar := re.search(r":\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[", piece):
            what = ("loading the weights" if piece.startswith("Loading")
                    else "saving the ONNX model")
            self.step(f"{what} (model builder)", int(bar[1]), int(bar[2]))

    def error_line(self) -> str:
        """The builder's last words on what went wrong: a Python exception's line, else
        its last line that is not a progress bar."""
        lines = [line for line in self.last if not re.search(r"\d+/\d+\s*\[", line)]
        for line in reversed(lines):
            if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", line):
                return line
        return lines[-1] if lines else "no output"


def build(hf_folder: Path, out: Path, cache: Path, options: OnnxOptions,
          progress: BuilderProgress) -> None:
    """Run the model builder on `hf_folder`, writing `out`; EngineFailure with its last
    error line when it fails."""
    command = [sys.executable, "-m", BUILDER, "-i", str(hf_folder), "-o", str(out),
               "-p", options.precision, "-e", options.provider, "-c", str(cache)]
    # The source is a local folder: nothing to fetch from the Hub (and no waiting on a
    # network that is not there).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    progress.step(f"converting to ONNX, {options.precision} for {options.provider} "
                  "(onnxruntime-genai's model builder)")
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, cwd=cache.parent, env=env)
    try:
        read_pieces(child, progress.read)
        code = child.wait()
    except BaseException:  # Ctrl-C here (or anything else): the builder stops too
        stop(child)
        raise
    if code != 0 or not (out / "genai_config.json").is_file():
        why = ("killed, probably for lack of memory" if killed_for_memory(code)
               else progress.error_line())
        raise EngineFailure(f"onnxruntime-genai's model builder failed: {why}")


def _builder_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"onnxruntime-genai {version('onnxruntime-genai')}"
    except PackageNotFoundError:
        return None
