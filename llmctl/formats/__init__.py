"""What a model file or folder is: the ground floor every other layer asks.

    __init__.py     the formats llmctl knows, the one table of format -> kind and engines,
                    and what a set of file names is (`detect_format`)
    gguf.py         GGUF headers: metadata, tensors, the checks before llama.cpp opens one
    safetensors.py  safetensors headers: tensor names, types and sizes, without weights
    hf.py           Hugging Face folders: config.json, which weight files a folder loads,
                    tokenizer files and chat templates
    diffusers.py    diffusers pipelines: model_index.json and its component folders
    coreml.py       Core ML models and resource folders, compute units
    whisper.py      Whisper speech models: CTranslate2, mlx-whisper and whisper.cpp layouts

Import-light (the standard library and `gguf` only): `ls`, completion and the store use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

KINDS = ("text", "image", "speech")


@dataclass(frozen=True)
class FormatInfo:
    kind: str  # "text" | "image" | "speech"
    engines: tuple[str, ...]  # the engines that run it, the default first
    # Machines ("<sys.platform>-<machine>", as llmctl.host.platform_tag says) where another
    # of `engines` is the default.
    preferred: tuple[tuple[str, str], ...] = ()
    # Kinds of model the format also holds, beside `kind` (Core ML: image resources and
    # language models); the files tell which one a model is (`detect_format`).
    other_kinds: tuple[str, ...] = ()

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind, *self.other_kinds)

    @property
    def default_engine(self) -> str:
        """The engine that runs the format on this machine unless --engine says otherwise."""
        from llmctl.host import platform_tag

        return dict(self.preferred).get(platform_tag(), self.engines[0])


def exported_context(format: str, folder: Path) -> int:
    """The context a converted program's KV cache was exported with: an ExecuTorch (pte)
    or Core ML language model holds a cache of that length, whatever its config.json says
    it was trained for; 0 for other formats, or where the folder's record does not say."""
    if format == "pte":
        from llmctl.formats import pte

        return pte.cache_context(folder)
    if format == "coreml":
        from llmctl.formats import coreml

        return coreml.context_of(coreml.read_report(folder))
    return 0


# The one table of formats: what kind of model each is and which engines run it. Engines
# (llmctl.engines.registry), the catalog and the store read it from here.
FORMATS: dict[str, FormatInfo] = {
    "gguf": FormatInfo("text", ("llama",)),
    # Hugging Face safetensors checkpoints: transformers (PyTorch: CUDA, MPS, CPU) by
    # default, MLX on Apple Silicon, where it is the faster of the two; mlx-lm reads them as
    # they are. MLX's own conversions (quantized in MLX's layout) run on MLX only.
    "safetensors": FormatInfo("text", ("transformers", "mlx"),
                              preferred=(("darwin-arm64", "mlx"),)),
    "mlx": FormatInfo("text", ("mlx",)),
    # Hugging Face checkpoints whose weights are only pickles (pytorch_model.bin): the
    # transformers engine loads them when told to trust them (--trust-pickle).
    "pytorch": FormatInfo("text", ("transformers",)),
    # ONNX Runtime GenAI folders: genai_config.json beside model.onnx (and its data file).
    "onnx": FormatInfo("text", ("onnx",)),
    # ExecuTorch programs (llmctl.formats.pte): model.pte beside the tokenizer files, made
    # by `convert --to executorch`.
    "pte": FormatInfo("text", ("executorch",)),
    "diffusers": FormatInfo("image", ("diffusers",)),
    # Core ML: Stable Diffusion resource folders (Apple's layout) and language models
    # (one stateful Model.mlpackage beside the tokenizer files, `convert --to coreml`).
    "coreml": FormatInfo("image", ("coreml",), other_kinds=("text",)),
    # Whisper (llmctl.formats.whisper): CTranslate2's conversion runs on faster-whisper (CPU,
    # CUDA), mlx-whisper's on MLX, whisper.cpp's ggml files on whisper.cpp.
    "ctranslate2": FormatInfo("speech", ("faster-whisper",)),
    "mlx-whisper": FormatInfo("speech", ("mlx-whisper",)),
    "ggml": FormatInfo("speech", ("whisper.cpp",)),
}
ENGINES = tuple(dict.fromkeys(engine for info in FORMATS.values() for engine in info.engines))


def formats_of(engine: str) -> tuple[str, ...]:
    """The formats `engine` runs."""
    return tuple(name for name, info in FORMATS.items() if engine in info.engines)


@dataclass(frozen=True)
class ModelFormat:
    kind: str  # "text" | "image" | "speech"
    engine: str  # the engine that runs it by default
    format: str  # "gguf" | "safetensors" | "mlx" | "diffusers" | "coreml"

    @classmethod
    def of(cls, format: str, kind: str | None = None) -> ModelFormat:
        """A format by name, with its kind (`kind` where the format holds several) and
        default engine from FORMATS."""
        info = FORMATS[format]
        return cls(kind or info.kind, info.default_engine, format)


GGUF = ModelFormat.of("gguf")


def detect_format(names: list[str], config: Path | None = None) -> ModelFormat | None:
    """What a set of files is, from their names: None when llmctl cannot tell. With
    `config` (the files' config.json), a safetensors checkpoint whose config says MLX
    quantized it (mlx-community's repositories) is format mlx: only MLX runs those
    weights."""
    found = _format_of(names)
    if found is not None and found.format == "safetensors" and config is not None:
        from llmctl.formats import hf

        if hf.mlx_quantized(hf.read_config(config.parent, config.name)):
            return ModelFormat.of("mlx")
    return found


def _format_of(names: list[str]) -> ModelFormat | None:
    paths = [PurePosixPath(n) for n in names]
    top = {p.parts[0] for p in paths}
    # Every folder level counts: a Core ML model is a folder ("Unet.mlmodelc/model.mil").
    suffixes = {s.lower() for p in paths for part in p.parts
                for s in PurePosixPath(part).suffixes}
    if len(paths) == 1 and paths[0].suffix.lower() == ".gguf":
        return GGUF
    from llmctl.formats.whisper import layout_of

    if (layout := layout_of(names)) is not None:
        return ModelFormat.of(layout)
    if "genai_config.json" in {p.name for p in paths} and ".onnx" in suffixes:
        return ModelFormat.of("onnx")
    if "model_index.json" in top:
        return ModelFormat.of("diffusers")
    if ".pte" in suffixes and "tokenizer.json" in top:
        return ModelFormat.of("pte")
    if suffixes & {".mlmodelc", ".mlpackage"}:
        # A language model keeps its tokenizer beside it; Apple's image resources keep
        # vocab.json and merges.txt (CLIP's tokenizer) instead.
        return ModelFormat.of("coreml", "text" if "tokenizer.json" in top else None)
    if "config.json" in top and ".safetensors" in suffixes:
        return ModelFormat.of("safetensors")
    # transformers' own name for pickled weights (CTranslate2's model.bin is not one).
    if "config.json" in top and any(p.name.startswith("pytorch_model") and p.suffix == ".bin"
                                    for p in paths):
        return ModelFormat.of("pytorch")
    return None
