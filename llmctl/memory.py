"""Will a model fit in memory? The estimate made, and checked, before any model loads.

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
counted). The estimate errs on the high side on purpose: running out of memory costs a
swap storm or an OOM kill, a refusal costs `--force`.

A model is refused when `need` is above SHARE of the memory this process may use
(`llmctl.host.usable_memory_bytes`: RAM capped by cgroup limits, or
LLMCTL_MEMORY_LIMIT), leaving the rest to the system and other programs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.engines.base import default_context
from llmctl.errors import InsufficientResources
from llmctl.formats import hf
from llmctl.host import MEMORY_LIMIT_ENV, usable_memory_bytes

SHARE = 0.9
OVERHEAD = 64 * 1024**2
KV_BYTES = 2  # f16, llama.cpp's default cache type and MLX's for fp16/bf16 models
LOGITS_BYTES = 4
MICRO_BATCH = 512  # llama.cpp's default n_ubatch
LLAMA_CELLS = 256  # llama.cpp rounds the context up to a multiple of this


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    logits: int
    overhead: int
    context_length: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.logits + self.overhead


@dataclass(frozen=True)
class MemoryCheck:
    estimate: MemoryEstimate
    usable: int | None  # None: unknown, nothing is refused
    allowed: int | None  # SHARE of usable

    @property
    def fits(self) -> bool:
        return self.allowed is None or self.estimate.total <= self.allowed


@dataclass(frozen=True)
class Shape:
    """What the KV cache and logits depend on."""

    kv_per_token: int = 0  # values cached per token: Σ over layers of KV heads × (k + v)
    vocabulary: int = 0
    trained_context: int = 0


def check_fits(runnable: Any, context_length: int | None, force: bool = False
               ) -> MemoryCheck:
    """Estimate what loading `runnable` (a `llmctl.store.pull.Runnable`) with this context
    needs and compare it with what this process may use. Raises InsufficientResources
    (exit 5) when it does not fit, unless `force`; the caller warns when forced."""
    estimate = estimate_memory(runnable, context_length)
    usable = usable_memory_bytes()
    check = MemoryCheck(estimate, usable,
                        int(usable * SHARE) if usable is not None else None)
    if not check.fits and not force:
        assert check.allowed is not None and usable is not None
        raise InsufficientResources(
            "memory", estimate.total, check.allowed,
            hint=_refusal_hint(context_length or estimate.context_length))
    return check


def _refusal_hint(context_length: int) -> str:
    source = (f"set by {MEMORY_LIMIT_ENV}" if os.environ.get(MEMORY_LIMIT_ENV)
              else "RAM, or the container's limit")
    return (f"llmctl plans for at most {SHARE:.0%} of the memory it may use ({source}); "
            f"try a smaller --ctx (now {context_length}) or load anyway with --force")


def estimate_memory(runnable: Any, context_length: int | None) -> MemoryEstimate:
    """What loading `runnable` with `context_length` tokens (None: the engine's default)
    takes: a GGUF file from its header, a folder model (MLX, safetensors) from config.json."""
    path = Path(runnable.path)
    shape = model_shape(runnable)
    if _is_gguf(runnable):
        weights, step = runnable.header.file_size, LLAMA_CELLS
    else:
        weights, step = folder_weights(path), 1
    cells = default_context(context_length, shape.trained_context)
    cells = -(-cells // step) * step
    return MemoryEstimate(
        weights=weights,
        kv_cache=cells * shape.kv_per_token * KV_BYTES,
        logits=min(cells, MICRO_BATCH) * shape.vocabulary * LOGITS_BYTES,
        overhead=OVERHEAD,
        context_length=cells,
    )


def model_shape(runnable: Any) -> Shape:
    """A model's shape before loading it: from a GGUF header, or a folder's config.json.
    Its `trained_context` also bounds --ctx (`LoadOptions.validate`)."""
    if _is_gguf(runnable):
        return gguf_shape(runnable.header.metadata)
    path = Path(runnable.path)
    folder = path if path.is_dir() else path.parent
    return config_shape(folder)


def _is_gguf(runnable: Any) -> bool:
    return (getattr(runnable, "format", "gguf") == "gguf"
            and getattr(runnable, "header", None) is not None)


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


def folder_weights(path: Path) -> int:
    """The weights of a folder model: its *.safetensors files (links followed), else
    every file in it."""
    if path.is_file():
        return path.stat().st_size
    files = [p for p in path.rglob("*") if p.is_file()]
    tensors = [p for p in files if p.suffix == ".safetensors"]
    return sum(p.stat().st_size for p in (tensors or files))
