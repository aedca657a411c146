"""Apple MLX through mlx-lm: MLX conversions and Hugging Face safetensors checkpoints.

The token stream is mlx-lm's own generator (`generate_step`, which `stream_generate` runs
too: the prompt in chunks, then each step's compute queued before the previous token is
handed out), with its sampler and streaming detokenizer. The shared loop
(`llmctl.engines.text`) turns it into the contract: one `Token` per generated token, then
`Done` with the same statistics as the llama engine.

On a CPU (Linux's `mlx[cpu]`), MLX computes float16 and bfloat16 far slower than float32
(measured here: a 4-bit 1536x576 matrix-vector product takes 27 ms with float16 scales,
0.84 ms with float32 ones; SmolLM2 4-bit generated 0.2 tokens/s as stored, 8 tokens/s
upcast), so half-precision parameters are upcast to float32 at load. On Apple Silicon the
GPU runs them natively and nothing is changed.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from llmctl.engines import chat_template
from llmctl.engines.text import (
    GenerationOptions,
    LoadOptions,
    Message,
    TokenEngine,
    default_context,
)
from llmctl.errors import EngineFailure, EngineUnavailable
from llmctl.formats import hf
from llmctl.host import peak_memory_bytes

if TYPE_CHECKING:
    from llmctl.engines.constraint import Matcher


@lru_cache(maxsize=1)
def _library() -> Any:
    """mlx and mlx-lm, imported on first use. mlx-lm installs without the MLX build for
    this machine on Linux (`mlx` alone has no CPU backend there: `mlx[cpu]` adds it)."""
    try:
        import mlx.core as mx
        import mlx_lm  # noqa: F401  (the package first: its submodules import each other)
        from mlx_lm.generate import generate_step
        from mlx_lm.models import cache
        from mlx_lm.sample_utils import make_sampler
        from mlx_lm.utils import get_total_parameters, load
    except ImportError as exc:
        raise EngineUnavailable(
            "mlx", f"mlx or mlx-lm cannot be imported ({exc})",
            "pip install 'llmctl[mlx]' (on Linux it brings mlx[cpu])") from None

    return SimpleNamespace(mx=mx, load=load, generate_step=generate_step,
                           make_sampler=make_sampler, cache=cache,
                           total_parameters=get_total_parameters)


class MlxEngine(TokenEngine):
    name = "mlx"
    saves_cache = True
    threads = None  # MLX sizes its own CPU work

    def __init__(self, path: Path, options: LoadOptions, config: dict[str, Any]):
        lib = _library()
        self.lib = lib
        mx = lib.mx
        started = time.perf_counter()
        try:
            self.model, self.tokenizer = lib.load(str(path))
        except (ValueError, FileNotFoundError, KeyError) as exc:
            # mlx-lm's words for an architecture it lacks or a folder that is not a model.
            raise EngineFailure(f"mlx-lm could not load {path}: {exc}") from None
        self.on_cpu = mx.default_device().type == mx.DeviceType.cpu
        self.backend = "CPU" if self.on_cpu else "Metal"
        self.gpu_layers = 0  # MLX runs the whole model on its device
        self.parameters = lib.total_parameters(self.model)
        if self.on_cpu:
            self._upcast_half_precision()
        self._wired_limit = self._wire_weights()
        trained = hf.trained_context(config)
        # The same bounds as the llama engine (the command has checked already). Threads
        # do not apply: MLX sizes its own CPU work.
        options, _ = options.validate(trained or None)
        self.n_ctx = default_context(options.context_length, trained)
        self.vocabulary = hf.vocabulary(config)
        self.eos_ids = set(self.tokenizer.eos_token_ids)
        self._prompt_cache: list[Any] | None = None  # made by the first reply
        self._warm_up()
        self.load_seconds = time.perf_counter() - started

    def _upcast_half_precision(self) -> None:
        from mlx.utils import tree_map

        mx = self.lib.mx
        half = (mx.float16, mx.bfloat16)
        self.model.update(tree_map(
            lambda p: p.astype(mx.float32) if isinstance(p, mx.array) and p.dtype in half else p,
            self.model.parameters()))
        mx.eval(self.model.parameters())

    def _wire_weights(self) -> int | None:
        """On Apple Silicon, let Metal keep the weights wired in memory up to the GPU's
        recommended working set, as mlx-lm's generate does around each generation (here
        once, for the process's lifetime; close() restores the old limit)."""
        mx = self.lib.mx
        if not mx.metal.is_available():
            return None
        size = mx.device_info().get("max_recommended_working_set_size")
        return mx.set_wired_limit(size) if size else None

    def _warm_up(self) -> None:
        """Run one token through the model and forget it, as the llama engine does: the
        first call pays for setting up kernels, which belongs to loading, not to the first
        reply's tokens/s."""
        mx = self.lib.mx
        token = next(iter(self.eos_ids), 0)
        mx.eval(self.model(mx.array([[token]])))

    # -- text <-> tokens -------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.n_ctx

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        return chat_template.hf_prompt_tokens(self.tokenizer, messages,
                                              self.tokenizer.has_chat_template)

    def text_tokens(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    # -- generation ------------------------------------------------------------------------

    def _trim_cache(self, keep: int) -> int:
        cache = self.lib.cache
        held = self._prompt_cache
        if keep and held is not None and cache.can_trim_prompt_cache(held):
            cache.trim_prompt_cache(held, self._cache_length() - keep)
            return keep
        self._prompt_cache = cache.make_prompt_cache(self.model)
        return 0

    def _cache_length(self) -> int:
        return self._prompt_cache[0].offset if self._prompt_cache else 0

    def _write_state(self, path: Path, header: dict[str, Any]) -> None:
        import json

        from llmctl.engines.prompt_cache import HEADER_KEY

        cache = self._prompt_cache or self.lib.cache.make_prompt_cache(self.model)
        self.lib.cache.save_prompt_cache(str(path), cache, {HEADER_KEY: json.dumps(header)})

    def _read_state(self, path: Path, header: dict[str, Any]) -> int:
        import tempfile

        self._prompt_cache = None
        self._trim_cache(0)
        # MLX reads a file's format from its name: the cache, under a name it knows.
        with tempfile.TemporaryDirectory(prefix="llmctl-kv-") as folder:
            named = Path(folder) / "cache.safetensors"
            named.symlink_to(path.resolve())
            loaded = self.lib.cache.load_prompt_cache(str(named))
        if len(loaded) != len(self._prompt_cache):
            from llmctl.engines.prompt_cache import CacheRefused

            raise CacheRefused(f"prompt cache {path} not used: it has {len(loaded)} layers, "
                               f"the model {len(self._prompt_cache)}")
        self._prompt_cache = loaded
        return self._cache_length()

    def _output_tokenizer(self) -> Any:
        from llmctl.engines.constraint import hf_tokenizer

        return hf_tokenizer(self.tokenizer._tokenizer)

    def _vocabulary_size(self) -> int:
        return self.vocabulary or len(self.tokenizer._tokenizer)

    def _processor(self, matcher: Matcher, prompt: int) -> Any:
        """mlx-lm's logits processor: feed the matcher the tokens sampled since its last
        call (mlx-lm hands over the prompt and every token so far), then mask."""
        mx = self.lib.mx
        fed = prompt

        def process(tokens: Any, logits: Any) -> Any:
            nonlocal fed
            for token in tokens[fed:].tolist():
                matcher.consume(token)
            fed = len(tokens)
            allowed = mx.array(matcher.allowed())
            size = logits.shape[-1]
            if size > matcher.size:  # the model's padded vocabulary: padding never allowed
                allowed = mx.concatenate([allowed, mx.zeros(size - matcher.size, mx.bool_)])
            return mx.where(allowed[:size], logits, -mx.inf)

        return process

    def _steps(self, tokens: list[int], options: GenerationOptions, budget: int,
               matcher: Matcher | None = None) -> Generator[int, None, None]:
        lib = self.lib
        mx = lib.mx
        if options.temperature > 0:
            mx.random.seed(options.seed)
        # mlx-lm raises for a top-k of the vocabulary or more; keeping that many tokens is
        # keeping them all, which top_k=0 says.
        top_k = 0 if self.vocabulary and options.top_k >= self.vocabulary else options.top_k
        sampler = lib.make_sampler(temp=options.temperature, top_p=options.top_p,
                                   min_p=options.min_p, top_k=top_k)
        # max_tokens=budget: the generator then queues no step past the last token wanted.
        processors = [self._processor(matcher, len(tokens))] if matcher is not None else None
        return _token_ids(lib.generate_step(mx.array(tokens), self.model, max_tokens=budget,
                                            sampler=sampler, prompt_cache=self._prompt_cache,
                                            logits_processors=processors))

    def _detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self.tokenizer.detokenizer)

    def _is_end(self, token: int) -> bool:
        return token in self.eos_ids

    def _peak_memory(self) -> int:
        # MLX's allocator peak counts Metal buffers, which need not show in the RSS.
        return max(peak_memory_bytes(), int(self.lib.mx.get_peak_memory()))

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        mx = self.lib.mx
        mx.synchronize()
        if self._wired_limit is not None:
            mx.set_wired_limit(self._wired_limit)
        self.model = None
        self._prompt_cache = None
        mx.clear_cache()


def _token_ids(steps: Generator[tuple[int, Any], None, None]) -> Generator[int, None, None]:
    """mlx-lm's (token, logprobs) pairs as token ids; closing this closes mlx-lm's
    generator, which then queues no further step."""
    try:
        for token, _logprobs in steps:
            yield token
    finally:
        steps.close()


class StreamingDetokenizer:
    """mlx-lm's streaming detokenizer (the tokenizer's own, so that spaces and byte tokens
    come out as the tokenizer means them) as the loop's Detokenizer."""

    def __init__(self, detokenizer: Any):
        self._detokenizer = detokenizer

    def add(self, token: int) -> str:
        self._detokenizer.add_token(token)
        return self._detokenizer.last_segment

    def flush(self) -> str:
        self._detokenizer.finalize()
        return self._detokenizer.last_segment


def build_backend() -> str:
    """Where MLX computes here (`show`): Metal on Apple Silicon, else the CPU."""
    mx = _library().mx
    return "Metal" if mx.metal.is_available() else "CPU"


def load(path: Path, options: LoadOptions) -> MlxEngine:
    if not (path / "config.json").is_file():
        raise EngineFailure(f"{path} has no config.json; the mlx engine opens MLX and "
                            "Hugging Face safetensors folders")
    return MlxEngine(path, options, hf.read_config(path))
