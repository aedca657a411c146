"""Engine names -> the module that implements them, and the checks before loading one.

Modules are imported only when their engine is used, so `llmctl --help` never pays for
llama.cpp, MLX, Core ML or torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.engines.image import ImageEngine, ImageLoadOptions
from llmctl.engines.speech import SpeechEngine, SpeechLoadOptions
from llmctl.engines.text import LoadOptions, TextEngine
from llmctl.errors import EngineUnavailable, UsageError
from llmctl.formats import FORMATS, formats_of
from llmctl.host import platform_tag


@dataclass(frozen=True)
class EngineSpec:
    name: str
    module: str  # implements load(path, LoadOptions)
    kind: str  # "text" | "image" | "speech"
    requires: str  # the import that must succeed
    install: str  # what to run when it does not
    # Where the engine's library exists, as "<sys.platform>-<machine>"; empty: anywhere.
    platforms: tuple[str, ...] = ()
    runs_on: str = ""  # the same, said for people
    # The `llmctl convert --to` target that makes models this engine runs, if any.
    convert_to: str | None = None
    # Other kinds of model it runs, each with its module: (kind, module).
    other_kinds: tuple[tuple[str, str], ...] = ()

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind, *(kind for kind, _ in self.other_kinds))

    def module_for(self, kind: str) -> str:
        """The module that loads `kind` models (ValueError for a kind it does not run)."""
        if kind == self.kind:
            return self.module
        return dict(self.other_kinds)[kind]

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats it runs, from the one table in llmctl.formats."""
        return formats_of(self.name)


ENGINES: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec("llama", "llmctl.engines.llama", "text", "llama_cpp",
                   "pip install 'llmctl[llama]'"),
        # mlx-lm reads MLX conversions and Hugging Face safetensors checkpoints alike.
        # MLX ships wheels for Apple Silicon macOS and (CPU only, "mlx[cpu]") Linux.
        EngineSpec("mlx", "llmctl.engines.mlx", "text", "mlx_lm",
                   "pip install 'llmctl[mlx]'",
                   platforms=("darwin-arm64", "linux-x86_64", "linux-aarch64"),
                   runs_on="Apple Silicon Macs and, on the CPU, Linux", convert_to="mlx"),
        # Hugging Face causal-LM folders on PyTorch: CUDA, then Apple's MPS, then the CPU.
        EngineSpec("transformers", "llmctl.engines.transformers", "text", "transformers",
                   "pip install 'llmctl[torch]'"),
        # ONNX Runtime GenAI: its folders (genai_config.json), made by `convert --to onnx`.
        EngineSpec("onnx", "llmctl.engines.onnx", "text", "onnxruntime_genai",
                   "pip install 'llmctl[onnx]'", convert_to="onnx"),
        # ExecuTorch: the programs `convert --to executorch` makes, on its Python runtime
        # (XNNPACK on the CPU).
        EngineSpec("executorch", "llmctl.engines.executorch", "text", "executorch",
                   "pip install 'llmctl[executorch]'", convert_to="executorch"),
        # Image engines (llmctl.engines.image's contract): PyTorch anywhere torch runs
        # (CUDA, Apple's MPS, CPU), Core ML where its predictions run: macOS only.
        EngineSpec("diffusers", "llmctl.engines.diffusers", "image", "diffusers",
                   "pip install 'llmctl[diffusers]'"),
        EngineSpec("coreml", "llmctl.engines.coreml", "image", "coremltools",
                   "pip install 'llmctl[coreml]'",
                   platforms=("darwin-arm64", "darwin-x86_64"),
                   runs_on="macOS only (Core ML predictions need Apple's frameworks)",
                   convert_to="coreml",
                   other_kinds=(("text", "llmctl.engines.coreml_text"),)),
        # Speech engines (llmctl.engines.speech's contract), one per Whisper layout:
        # faster-whisper (CTranslate2: CPU, CUDA), mlx-whisper, whisper.cpp (ggml files).
        EngineSpec("faster-whisper", "llmctl.engines.whisper", "speech", "faster_whisper",
                   "pip install 'llmctl[whisper]'"),
        EngineSpec("mlx-whisper", "llmctl.engines.mlx_whisper", "speech", "mlx_whisper",
                   "pip install 'llmctl[mlx]'",
                   platforms=("darwin-arm64", "linux-x86_64", "linux-aarch64"),
                   runs_on="Apple Silicon Macs and, on the CPU, Linux"),
        EngineSpec("whisper.cpp", "llmctl.engines.whisper_cpp", "speech", "pywhispercpp",
                   "pip install 'llmctl[whisper]'"),
    )
}


def get_spec(name: str) -> EngineSpec:
    try:
        return ENGINES[name]
    except KeyError:
        raise UsageError(f"unknown engine '{name}'",
                         hint=f"choose one of: {', '.join(sorted(ENGINES))}") from None


def choose(model_format: str, kind: str, override: str | None = None) -> EngineSpec:
    """The engine for a model: `override` when given (and able to read the format), else
    the first engine that reads it."""
    if override:
        spec = get_spec(override)
        if model_format not in spec.formats:
            hint = f"it runs: {', '.join(spec.formats)}"
            if spec.convert_to:
                hint += f"; make one with: llmctl convert MODEL --to {spec.convert_to}"
            raise UsageError(f"the {spec.name} engine cannot run {model_format} models",
                             hint=hint)
        return spec
    info = FORMATS.get(model_format)
    if info is not None and kind in info.kinds and info.default_engine in ENGINES:
        return ENGINES[info.default_engine]
    raise UsageError(f"no engine in this version runs {kind} models in {model_format} format")


def check_available(spec: EngineSpec) -> None:
    here = platform_tag()
    if spec.platforms and here not in spec.platforms:
        raise EngineUnavailable(spec.name, f"it runs on {spec.runs_on}, not on {here}")
    if importlib.util.find_spec(spec.requires) is None:
        raise EngineUnavailable(spec.name, f"{spec.requires} is not installed", spec.install)


def backend(spec: EngineSpec) -> str:
    """Where the engine computes on this machine (`show`), without loading a model: its
    module's `build_backend()`, or why it cannot run here."""
    try:
        check_available(spec)
    except EngineUnavailable as exc:
        return f"unavailable here ({exc.reason})"
    return importlib.import_module(spec.module).build_backend()


def load_text_engine(spec: EngineSpec, path: Path, options: LoadOptions) -> TextEngine:
    return _load(spec, "text", path, options)


def load_image_engine(spec: EngineSpec, path: Path, options: ImageLoadOptions) -> ImageEngine:
    return _load(spec, "image", path, options)


def load_speech_engine(spec: EngineSpec, path: Path, options: SpeechLoadOptions
                       ) -> SpeechEngine:
    return _load(spec, "speech", path, options)


def _load(spec: EngineSpec, kind: str, path: Path, options: object) -> Any:
    if kind not in spec.kinds:
        raise UsageError(f"the {spec.name} engine runs {spec.kind} models, not {kind} models")
    check_available(spec)
    module = importlib.import_module(spec.module_for(kind))
    return module.load(path, options)
