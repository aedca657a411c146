"""Will a model fit in memory? The estimates made, and the one check, before any model loads.

Text models (GGUF files, MLX and safetensors folders):

    need = weights + KV cache + logits buffer + fixed overhead

    weights       the model's files as stored (llama.cpp maps them whole; MLX loads them)
    KV cache      layers × context × KV heads × (key length + value length) × 2 bytes
                  (f16 keys and values; head length = embedding length / heads unless the
                  model gives key_length/value_length or head_dim)
    logits        min(context, 512) × vocabulary × 4 bytes: the f32 output rows of one
                  512-token micro-batch, the largest of llama.cpp's compute buffers on CPU
    overhead      64 MiB: Python, the engine's code, the tokenizer

For SmolLM2-135M at 4096 tokens that is 98.4 + 94.4 + 100.7 + 67.1 = 361 MB; llama.cpp
reports 92.1 MiB of weights, a 90 MiB KV cache and a 98.3 MiB compute buffer, and the
process peaks at about 270 MB resident (pages of the buffers it never touches are not
counted).

Image models (diffusers pipelines, Core ML resources):

    need = weights as loaded + working memory + fixed overhead

    weights       one copy of each component's weights, as `llmctl.formats` picks them
                  (float16 files count twice when loaded as float32 on a CPU); every file
                  of each Core ML model, which loads whole
    work          1 GiB per 512×512 pixels of output (activations, attention, the VAE
                  decoder's full-size feature maps): an allowance that leans high, not a
                  measurement (no real Stable Diffusion weights could be downloaded where
                  it was written)
    overhead      256 MiB: Python, torch and its allocator, the tokenizer

Speech models (Whisper, in any of its layouts):

    need = weights + audio + fixed overhead

    weights       the model's files as stored (CTranslate2 loads model.bin whole, converting
                  float16 weights to int8 on a CPU as it goes; mlx-whisper and whisper.cpp
                  load their files as they are)
    audio         1 MB per second of audio: the 16 kHz float32 samples (decoded, joined,
                  padded) and the log-mel features, which faster-whisper computes for the
                  whole file at once through a complex short-time Fourier transform
    overhead      320 MiB: Python, NumPy, PyAV's FFmpeg, the engine's library and one
                  30-second window's activations

Measured here (Whisper tiny on faster-whisper, int8, 2 cores): the process peaked at 377,
480 and 993 MB for 1, 5 and 15 minutes of audio (0.86 MB more per second), and at 299 MB
for 4 seconds; the estimate for those is 473, 713, 1313 and 417 MB.

The estimates err on the high side on purpose: running out of memory costs a swap storm
or an OOM kill, a refusal costs `--force`. `check_fits` compares either with the one rule,
`llmctl.host.allowed_memory` (a share of the memory this process may use, which
`ls --available --fits` applies too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmctl.engines.text import default_context
from llmctl.errors import InsufficientResources
from llmctl.formats import coreml, diffusers, exported_context, hf, onnx
from llmctl.host import MEMORY_LIMIT_ENV, MEMORY_SHARE, allowed_memory

OVERHEAD = 64 * 1024**2
KV_BYTES = 2  # f16, llama.cpp's default cache type and MLX's for fp16/bf16 models
# onnxruntime-genai keeps the KV cache in the model's input type, float32 in CPU builds
# (int4 ones included), and allocates it for the whole context at once.
ONNX_KV_BYTES = 4
# ExecuTorch programs llmctl exports hold a float32 static cache of the program's context,
# allocated whatever --ctx says (llmctl.formats.pte's record gives its length).
PTE_KV_BYTES = 4
LOGITS_BYTES = 4
MICRO_BATCH = 512  # llama.cpp's default n_ubatch
LLAMA_CELLS = 256  # llama.cpp rounds the context up to a multiple of this
IMAGE_OVERHEAD = 256 * 1024**2
WORK_PER_512 = 1024**3
SPEECH_OVERHEAD = 320 * 1024**2
SPEECH_BYTES_PER_SECOND = 1_000_000


@dataclass(frozen=True)
class MemoryEstimate:
    """What loading a model is expected to take, in bytes, by part. A text model has a KV
    cache and logits for `context_length` tokens; an image model working memory for the
    pixels asked for. Parts that do not apply are 0."""

    weights: int
    overhead: int
    kv_cache: int = 0
    logits: int = 0
    work: int = 0
    context_length: int | None = None  # text models: the context estimated for
    # What would lower it, for the refusal's hint ("a smaller --ctx (now 4096)").
    remedies: tuple[str, ...] = ()

    @property
    def parts(self) -> dict[str, int]:
        """The parts that apply, by name."""
        names = (("weights", "kv_cache", "logits", "overhead") if self.context_length is not None
                 else ("weights", "work", "overhead"))
        return {name: getattr(self, name) for name in names}

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.logits + self.work + self.overhead


@dataclass(frozen=True)
class MemoryCheck:
    estimate: MemoryEstimate
    allowed: int | None  # what llmctl plans for (llmctl.host.allowed_memory); None: unknown

    @property
    def fits(self) -> bool:
        return self.allowed is None or self.estimate.total <= self.allowed


def check_fits(estimate: MemoryEstimate, force: bool = False) -> MemoryCheck:
    """Compare `estimate` with the memory llmctl plans for. Raises InsufficientResources
    (exit 5) when it does not fit, unless `force`; the caller warns when forced. When the
    memory is unknown, nothing is refused."""
    check = MemoryCheck(estimate, allowed_memory())
    if not check.fits and not force:
        assert check.allowed is not None
        raise InsufficientResources("memory", estimate.total, check.allowed,
                                    hint=_refusal_hint(estimate.remedies))
    return check


def _refusal_hint(remedies: tuple[str, ...]) -> str:
    source = (f"set by {MEMORY_LIMIT_ENV}" if os.environ.get(MEMORY_LIMIT_ENV)
              else "RAM, or the container's limit")
    choices = [*remedies, "load anyway with --force"]
    tried = (" or ".join(choices) if len(choices) < 3
             else f"{', '.join(choices[:-1])}, or {choices[-1]}")
    return (f"llmctl plans for at most {MEMORY_SHARE:.0%} of the memory it may use "
            f"({source}); try {tried}")


# -- text models ---------------------------------------------------------------------------

class TextModelFiles(Protocol):
    """What the text estimate reads of a model (a `llmctl.store.resolve.Runnable`)."""

    @property
    def path(self) -> Path: ...

    @property
    def format(self) -> str: ...

    @property
    def header(self) -> Any:
        """A llmctl.formats.gguf.GGUFHeader for a GGUF model, else None."""
        ...


@dataclass(frozen=True)
class Shape:
    """What the KV cache and logits depend on."""

    kv_per_token: int = 0  # values cached per token: Σ over layers of KV heads × (k + v)
    vocabulary: int = 0
    trained_context: int = 0


def estimate_text_memory(model: TextModelFiles, context_length: int | None, *,
                         upcast: bool = False, sequences: int = 1) -> MemoryEstimate:
    """What loading `model` with `context_length` tokens (None: the engine's default)
    takes: a GGUF file from its header, a folder model (MLX, safetensors) from config.json.
    With `upcast`, a folder's float16 or bfloat16 weights count twice: the engine computes
    them in float32. With several `sequences` (batch --parallel), each has a KV cache of
    `context_length` cells."""
    path = Path(model.path)
    shape = model_shape(model)
    if _is_gguf(model):
        weights, step = model.header.file_size, LLAMA_CELLS
    else:
        weights, step = folder_weights(path), 1
        if upcast and path.is_dir() and _half_precision(path):
            weights *= 2
    cells = default_context(context_length, shape.trained_context)
    cells = -(-cells // step) * step
    kv_bytes = {"onnx": ONNX_KV_BYTES, "pte": PTE_KV_BYTES}.get(model.format, KV_BYTES)
    # A converted program's cache is as long as it was exported, whatever --ctx says.
    cells = exported_context(model.format, path) or cells
    return MemoryEstimate(
        weights=weights,
        kv_cache=sequences * cells * shape.kv_per_token * kv_bytes,
        logits=min(cells, MICRO_BATCH) * shape.vocabulary * LOGITS_BYTES,
        overhead=OVERHEAD,
        context_length=cells,
        remedies=(f"a smaller --ctx (now {context_length or cells})",
                  *((f"fewer --parallel sequences (now {sequences})",) if sequences > 1
                    else ())),
    )


def model_shape(model: TextModelFiles) -> Shape:
    """A model's shape before loading it: from a GGUF header, or a folder's config.json.
    Its `trained_context` also bounds --ctx (`LoadOptions.validate`)."""
    if _is_gguf(model):
        return gguf_shape(model.header.metadata)
    path = Path(model.path)
    folder = path if path.is_dir() else path.parent
    if model.format == "onnx":
        return Shape(*onnx.shape(onnx.read_genai_config(folder)))
    return config_shape(folder)


def _is_gguf(model: TextModelFiles) -> bool:
    return model.format == "gguf" and model.header is not None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _per_layer(value: Any, layers: int) -> list[int]:
    """A count given once for every layer, or (some GGUFs) as a list with one per layer."""
    if isinstance(value, list):
        return [_int(v) for v in value][:layers]
    return [_int(value)] * layers


def gguf_shape(metadata: dict[str, Any]) -> Shape:
    """From a GGUF header's `<arch>.*` keys; missing keys count as 0 (no KV cache)."""
    arch = metadata.get("general.architecture")

    def get(key: str) -> Any:
        return metadata.get(f"{arch}.{key}")

    layers = _int(get("block_count"))
    heads = _per_layer(get("attention.head_count"), layers)
    kv_heads = _per_layer(get("attention.head_count_kv") or get("attention.head_count"),
                          layers)
    embedding = _int(get("embedding_length"))
    per_token = 0
    for n_heads, n_kv in zip(heads, kv_heads, strict=False):
        head = embedding // n_heads if n_heads else 0
        key = _int(get("attention.key_length")) or head
        value = _int(get("attention.value_length")) or head
        per_token += n_kv * (key + value)
    vocabulary = _int(get("vocab_size"))
    if not vocabulary:  # the token list, kept as a list or summarised with its length
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocabulary = len(tokens) if isinstance(tokens, list) else _int(
            getattr(tokens, "length", 0))
    return Shape(per_token, vocabulary, _int(get("context_length")))


def config_shape(folder: Path) -> Shape:
    """From a Hugging Face config.json (MLX and safetensors folders); text models nested
    under "text_config" (vision-language models) are read too. Missing: no KV cache."""
    config = hf.text_settings(hf.read_config(folder))
    layers = _int(config.get("num_hidden_layers"))
    heads = _int(config.get("num_attention_heads"))
    kv_heads = _int(config.get("num_key_value_heads")) or heads
    head = _int(config.get("head_dim")) or (
        _int(config.get("hidden_size")) // heads if heads else 0)
    return Shape(layers * kv_heads * 2 * head, hf.vocabulary(config), hf.trained_context(config))


def _half_precision(folder: Path) -> bool:
    """Whether a folder's config.json says its weights are float16 or bfloat16 (and not
    quantized: MLX's quantized weights stay as they are)."""
    config = hf.read_config(folder)
    if config.get("quantization") or config.get("quantization_config"):
        return False
    dtype = config.get("dtype") or config.get("torch_dtype") or hf.text_settings(
        config).get("torch_dtype")
    return dtype in ("float16", "bfloat16")


def folder_weights(path: Path) -> int:
    """The weights of a folder model: its *.safetensors files (links followed), else
    every file in it."""
    if path.is_file():
        return path.stat().st_size
    files = [p for p in path.rglob("*") if p.is_file()]
    tensors = [p for p in files if p.suffix == ".safetensors"]
    return sum(p.stat().st_size for p in (tensors or files))


# -- image models --------------------------------------------------------------------------

def estimate_image_memory(folder: Path, width: int, height: int, upcast: bool
                          ) -> MemoryEstimate:
    """What generating one width x height image with the model in `folder` takes: its
    weights (float16 files doubled when `upcast`: loaded as float32), working memory in
    proportion to the pixels, and a fixed overhead."""
    weights = 0
    for path in image_weight_files(folder):
        size = path.stat().st_size
        weights += size * 2 if upcast and hf.variant(path.name) == "fp16" else size
    return MemoryEstimate(
        weights=weights,
        work=int(WORK_PER_512 * width * height / (512 * 512)),
        overhead=IMAGE_OVERHEAD,
        remedies=("a smaller --width/--height", "--low-memory"),
    )


def image_weight_files(folder: Path) -> list[Path]:
    """The files an image model loads its weights from: per component of a diffusers
    pipeline, the one copy `llmctl.formats.hf` picks (as from_pretrained does); every file
    of each Core ML model (a folder that loads whole: program, weights, metadata); for
    a folder that is neither, the weights at its top."""
    files: list[Path] = []
    for component in sorted(diffusers.read_components(folder / diffusers.INDEX)):
        files += hf.weight_files(folder / component)
    for model in _coreml_models(folder):
        files += sorted(p for p in model.rglob("*") if p.is_file())
    return files or hf.weight_files(folder)


def _coreml_models(folder: Path) -> list[Path]:
    """The outermost .mlmodelc / .mlpackage folders under `folder`."""
    found: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if (path.suffix in coreml.SUFFIXES and path.is_dir()
                and not any(model in path.parents for model in found)):
            found.append(path)
    return found


# -- speech models -------------------------------------------------------------------------

def estimate_speech_memory(path: Path, audio_seconds: float) -> MemoryEstimate:
    """What transcribing `audio_seconds` of audio with the Whisper model at `path` (a
    folder, or whisper.cpp's one file) takes."""
    return MemoryEstimate(
        weights=folder_weights(path),
        work=int(audio_seconds * SPEECH_BYTES_PER_SECOND),
        overhead=SPEECH_OVERHEAD,
        remedies=("a shorter audio file (split it)", "a smaller model (whisper:tiny)"),
    )
