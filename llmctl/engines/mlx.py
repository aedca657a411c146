"""Apple MLX through mlx-lm: MLX conversions and Hugging Face safetensors checkpoints.

The token stream is mlx-lm's own generator (`generate_step`, which `stream_generate` runs
too: the prompt in chunks, then each step's compute queued before the previous token is
handed out), with its sampler and streaming detokenizer. The shared loop
(`llmctl.engines.text`) turns it into the contract: one `Token` per generated token, then
`Done` with the same statistics as the llama engine.

Several sequences at once (`batch --parallel`, `llmctl.engines.parallel`): `MlxSlots`, on
mlx-lm's batch KV cache (BatchKVCache: each sequence's prompt processed alone in a cache
of its own, as `run` processes it, then merged into the batch's left-padded cache; one
forward of every running sequence's last token per step).

On a CPU (Linux's `mlx[cpu]`), MLX computes float16 and bfloat16 far slower than float32
(measured here: a 4-bit 1536x576 matrix-vector product takes 27 ms with float16 scales,
0.84 ms with float32 ones; SmolLM2 4-bit generated 0.2 tokens/s as stored, 8 tokens/s
upcast), so half-precision parameters are upcast to float32 at load. On Apple Silicon the
GPU runs them natively and nothing is changed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from llmctl.engines import chat_template
from llmctl.engines.text import (
    GenerationOptions,
    LoadOptions,
    Message,
    Slots,
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
        from mlx_lm import sample_utils
        from mlx_lm.generate import generate_step, generation_stream
        from mlx_lm.models import cache
        from mlx_lm.sample_utils import make_sampler
        from mlx_lm.utils import get_total_parameters, load
    except ImportError as exc:
        raise EngineUnavailable(
            "mlx", f"mlx or mlx-lm cannot be imported ({exc})",
            "pip install 'llmctl[mlx]' (on Linux it brings mlx[cpu])") from None

    return SimpleNamespace(mx=mx, load=load, generate_step=generate_step,
                           generation_stream=generation_stream, make_sampler=make_sampler,
                           sample_utils=sample_utils, cache=cache,
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
            return _masked(mx, matcher, logits)

        return process

    def _top_k(self, options: GenerationOptions) -> int:
        # mlx-lm raises for a top-k of the vocabulary or more; keeping that many tokens is
        # keeping them all, which top_k=0 says.
        return 0 if self.vocabulary and options.top_k >= self.vocabulary else options.top_k

    def _steps(self, tokens: list[int], options: GenerationOptions, budget: int,
               matcher: Matcher | None = None) -> Generator[int, None, None]:
        lib = self.lib
        mx = lib.mx
        if options.temperature > 0:
            mx.random.seed(options.seed)
        sampler = lib.make_sampler(temp=options.temperature, top_p=options.top_p,
                                   min_p=options.min_p, top_k=self._top_k(options))
        # max_tokens=budget: the generator then queues no step past the last token wanted.
        processors = [self._processor(matcher, len(tokens))] if matcher is not None else None
        return _token_ids(lib.generate_step(mx.array(tokens), self.model, max_tokens=budget,
                                            sampler=sampler, prompt_cache=self._prompt_cache,
                                            logits_processors=processors))

    def _detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self.tokenizer.detokenizer)

    def _is_end(self, token: int) -> bool:
        return token in self.eos_ids

    def open_slots(self, count: int) -> MlxSlots | None:
        """`count` sequences decoded together. MLX sizes its caches as they fill, so
        nothing is set aside at load (LoadOptions.sequences only sizes the memory check);
        None for a model whose cache mlx-lm cannot batch."""
        caches = self.lib.cache.make_prompt_cache(self.model)
        if not all(hasattr(layer, "merge") for layer in caches):
            return None
        return MlxSlots(self, count)

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


def _masked(mx: Any, matcher: Matcher, logits: Any) -> Any:
    """`logits` (one row) with every token the matcher does not allow at -inf."""
    allowed = mx.array(matcher.allowed())
    size = logits.shape[-1]
    if size > matcher.size:  # the model's padded vocabulary: padding never allowed
        allowed = mx.concatenate([allowed, mx.zeros(size - matcher.size, mx.bool_)])
    return mx.where(allowed[:size], logits, -mx.inf)


# The prompt chunk of mlx-lm's generate_step (its prefill_step_size), which `run` uses.
PREFILL_STEP = 2048
# Decoding steps between returns of MLX's freed buffers to the system, as generate_step
# does (the batch's arrays change shape as sequences join and leave).
CLEAR_EVERY = 256


class MlxSlots(Slots):
    """Sequences of one MLX model decoded together (`llmctl.engines.parallel`).

    A prompt is processed alone, in a fresh cache of its own, in the chunks mlx-lm's
    generate_step uses (the whole prompt but its last token, then that token for the first
    logits): what `run` computes. Its cache is then merged (mlx-lm's `merge`, a
    BatchKVCache of one row) and `extend`ed into the running batch, whose rows are
    left-padded to a common length; a released sequence's row is `filter`ed out (which
    also drops the padding no row needs any more). Each step is one forward of every
    running row's last token. mlx-lm's BatchGenerator is not used: it owns the loop
    (sampling, token budgets, stop tests, when a prompt joins), processes a joining prompt
    in the same call that decodes the others, and hands out a token one step after it is
    sampled; here the shared loop decides all that, one call at a time.

    Each sequence samples its own row with its own sampler and, at a temperature, its own
    random key (seeded as `run` seeds MLX's global one, and split per token as MLX splits
    that), so a reply does not depend on what else is in the batch.

    Measured on Linux's mlx[cpu] (SmolLM2 4-bit, 12 prompts, 48 tokens, 3 and 4 at once):
    every row's logits at every step are bit for bit generate_step's. There MLX computes a
    matrix product one row at a time (4-bit kernel and reference BLAS alike: 1.05 ms for
    one row of a 1536x576 layer, 0.91 ms a row for 40) and reduces in order, so padding's
    zeros add exactly nothing. That is also why batching gains little on a CPU (3.4 tokens/s
    one at a time, 4.0 at 4). Metal's kernels differ for one row and several: there
    tests/test_parallel_mlx.py is what says whether the replies still equal `run`'s."""

    def __init__(self, engine: MlxEngine, count: int):
        self.engine, self.lib, self.model = engine, engine.lib, engine.model
        self.count = count
        self.context_length = engine.n_ctx
        self.rows: list[int] = []  # the slot of each row of the batch cache
        self.cache: list[Any] = []  # one batch cache per layer; empty with no rows
        self.samplers: dict[int, Callable[[Any], Any]] = {}
        self.matchers: dict[int, Matcher | None] = {}
        self.steps = 0

    def _sample(self, slot: int, logits: Any) -> Any:
        """The slot's next token (lazily) from its row of logits, as generate_step
        samples: mask, normalise to log-probabilities, sample."""
        mx = self.lib.mx
        matcher = self.matchers[slot]
        if matcher is not None:
            logits = _masked(mx, matcher, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return self.samplers[slot](logprobs)

    def start(self, slot: int, tokens: list[int], options: GenerationOptions,
              matcher: Matcher | None) -> int:
        lib = self.lib
        mx = lib.mx
        self.samplers[slot] = _sampler(lib, options, self.engine._top_k(options))
        self.matchers[slot] = matcher
        cache = lib.cache.make_prompt_cache(self.model)
        prompt = mx.array(tokens)
        with mx.stream(lib.generation_stream):
            while len(prompt) > 1:
                chunk = min(PREFILL_STEP, len(prompt) - 1)
                self.model(prompt[:chunk][None], cache=cache)
                mx.eval([layer.state for layer in cache])
                prompt = prompt[chunk:]
                mx.clear_cache()
            logits = self.model(prompt[None], cache=cache)[:, -1, :]
            token = self._sample(slot, logits)
            mx.eval(token)
            joining = [type(layer).merge([layer]) for layer in cache]
        if self.cache:
            for layer, new in zip(self.cache, joining, strict=True):
                layer.extend(new)
        else:
            self.cache = joining
        self.rows.append(slot)
        return int(token.item())

    def advance(self, last: dict[int, int]) -> dict[int, int]:
        """As Slots says, for every running slot at once (what generate_many asks): the
        batch cache has a row for each, and a forward computes them all."""
        mx = self.lib.mx
        if sorted(last) != sorted(self.rows):
            raise EngineFailure(f"MLX slots {sorted(self.rows)} are running; asked to "
                                f"decode {sorted(last)}")
        with mx.stream(self.lib.generation_stream):
            inputs = mx.array([last[slot] for slot in self.rows])
            logits = self.model(inputs[:, None], cache=self.cache)[:, -1, :]
            sampled = [self._sample(slot, logits[row:row + 1])
                       for row, slot in enumerate(self.rows)]
            mx.eval(sampled)
        self.steps += 1
        if self.steps % CLEAR_EVERY == 0:
            mx.clear_cache()
        return {slot: int(token.item()) for slot, token in zip(self.rows, sampled,
                                                              strict=True)}

    def release(self, slot: int) -> None:
        self.samplers.pop(slot, None)
        self.matchers.pop(slot, None)
        if slot not in self.rows:  # its prompt never joined (refused, or failed)
            return
        row = self.rows.index(slot)
        del self.rows[row]
        if not self.rows:
            self.cache = []
            return
        keep = [i for i in range(len(self.rows) + 1) if i != row]
        for layer in self.cache:
            layer.filter(keep)

    def close(self) -> None:
        self.rows, self.cache = [], []
        self.samplers.clear()
        self.matchers.clear()
        self.lib.mx.clear_cache()


def _sampler(lib: Any, options: GenerationOptions, top_k: int) -> Callable[[Any], Any]:
    """One sequence's sampler: mlx-lm's for greedy decoding; at a temperature, mlx-lm's
    filters in make_sampler's order, then a draw with the sequence's own key. MLX's global
    key is one for the process; split the same way per draw, a key of the seed's own gives
    the draws `run` makes after mx.random.seed(seed)."""
    if options.temperature == 0:
        return lib.make_sampler(temp=0.0)
    mx, utils = lib.mx, lib.sample_utils
    key = mx.random.key(options.seed)
    temperature = options.temperature

    def sample(logprobs: Any) -> Any:
        nonlocal key
        if 0 < options.top_p < 1.0:
            logprobs = utils.apply_top_p(logprobs, options.top_p)
        if options.min_p != 0.0:
            logprobs = utils.apply_min_p(logprobs, options.min_p)
        if top_k > 0:
            logprobs = utils.apply_top_k(logprobs, top_k)
        key, draw = mx.random.split(key)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=draw)

    return sample


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
