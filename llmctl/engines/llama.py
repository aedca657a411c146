"""llama.cpp through llama-cpp-python's low-level bindings.

The token stream the shared loop (`llmctl.engines.text`) runs talks to the C API directly:
the whole prompt goes to `llama_decode` in batches, sampling runs in C on a sampler chain,
and each step costs a handful of ctypes calls with no Python copy of the logits. The
convenience `Llama` class spends about 20% of generation speed on per-token Python work
(TESTDATA.md); this loop runs at llama-bench's speed (README, performance table).
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
import time
from collections.abc import Generator, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.engines import chat_template
from llmctl.engines.text import (
    ALL_LAYERS,
    ByteDetokenizer,
    GenerationOptions,
    LoadOptions,
    Message,
    Slots,
    TokenEngine,
    default_context,
)
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError
from llmctl.host import CpuSample, default_threads, sample_cpu

if TYPE_CHECKING:
    from llmctl.engines.constraint import Matcher

MAX_BATCH = 2048
PIECE_BUFFER = 256
# llama.cpp's CPU flash attention runs a batch of this many query tokens or more through
# its tiled kernel (float32 queries), and a smaller one through a per-row kernel that
# rounds the queries to float16 (ggml-cpu ops.cpp, GGML_FA_TILE_Q): a single-token decode,
# as every generated token is, differs from the same token processed in a prompt by up to
# 0.5 in a logit with SmolLM2, while batches of 64 or more give the same numbers bit for
# bit however the prompt is split (measured: 63-token remainders differ, 64 do not;
# tests/test_prompt_cache.py keeps checking it). A cached prefix is reused only where that
# keeps a reply as without the cache. GPU backends have their own kernels: not measured.
SAME_RESULT_BATCH = 64
# With the default thread count, a reply that starts this long after the last one ended
# (a person typing in `chat`) first looks again at what other processes keep busy: over
# the pause, or over a fresh tenth of a second when the pause is older than RECENT.
RECHECK_AFTER = 1.0
RECENT = 5.0

# The last lines llama.cpp logged, so that a failure can say what llama.cpp said.
_recent_log: collections.deque[str] = collections.deque(maxlen=20)


@lru_cache(maxsize=1)
def _library() -> Any:
    try:
        import llama_cpp.llama_cpp as lib
    except ImportError as exc:
        raise EngineUnavailable(
            "llama", f"llama-cpp-python is not installed ({exc})", "pip install 'llmctl[llama]'"
        ) from None

    debug = bool(os.environ.get("LLMCTL_DEBUG"))

    @lib.llama_log_callback
    def on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        _recent_log.append(line)
        if debug:
            os.write(2, text)

    # llama.cpp logs every load step on stderr; keep it quiet unless debugging. The
    # callback must outlive every call into the library, hence the function attribute.
    _library.on_log = on_log  # type: ignore[attr-defined]
    lib.llama_log_set(on_log, ctypes.c_void_p(0))
    lib.llama_backend_init()
    return lib


# A GPU backend's name as llama.cpp's system information lists it -> what we call it.
GPU_BACKENDS = {"CUDA": "CUDA", "Metal": "Metal", "MTL": "Metal", "Vulkan": "Vulkan",
                "ROCm": "ROCm", "HIP": "ROCm", "SYCL": "SYCL", "OpenCL": "OpenCL"}


def _gpu_backend(lib: Any) -> str | None:
    """The GPU backend this build of llama.cpp offloads to, None for a CPU-only build."""
    if not lib.llama_supports_gpu_offload():
        return None
    info = lib.llama_print_system_info().decode("utf-8", "replace")
    found = next((name for key, name in GPU_BACKENDS.items() if key in info), None)
    return found or ("Metal" if sys.platform == "darwin" else "GPU")


def build_backend() -> str:
    """Where this build computes (`show`): its GPU backend, else the CPU."""
    return _gpu_backend(_library()) or "CPU"


def _llama_said() -> str:
    lines = [line.strip() for line in _recent_log if line.strip()]
    return f" (llama.cpp: {lines[-1]})" if lines else ""


class LlamaEngine(TokenEngine):
    name = "llama"
    saves_cache = True

    def __init__(self, path: Path, options: LoadOptions):
        # What other processes do while the model loads decides the default thread count.
        since = sample_cpu() if options.threads is None else None
        lib = _library()
        self.lib = lib
        started = time.perf_counter()
        _recent_log.clear()
        model_params = lib.llama_model_default_params()
        gpu = _gpu_backend(lib)
        # --gpu-layers N|all; by default every layer where the build has a GPU backend.
        model_params.n_gpu_layers = (0 if gpu is None else -1 if options.gpu_layers in (
            None, ALL_LAYERS) else options.gpu_layers)
        self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise EngineFailure(f"llama.cpp could not load {path}{_llama_said()}")
        trained = lib.llama_model_n_ctx_train(self.model)
        try:
            # The command has checked already; a library caller gets the same bounds.
            options, _ = options.validate(trained if trained > 0 else None)
        except UsageError:
            lib.llama_model_free(self.model)
            self.model = None
            raise
        n_ctx = default_context(options.context_length, trained)
        # The default leaves out the cores other processes keep busy. llama.cpp's threads
        # wait for each other at every operation, so one queueing for a CPU stalls them all:
        # with one of 2 cores busy elsewhere, 2 threads generated 23 tokens/s where 1 made
        # 65 (benchmarks/contention.py; issue 10 saw 0.34). Lowering llama.cpp's polling
        # does not cure it here: the PyPI build uses OpenMP (GCC on Linux), which ignores
        # the threadpool's `poll` level (llama-cpp-python 0.3 binds no
        # llama_attach_threadpool anyway), and OpenMP's own spinning, GOMP_SPINCOUNT from
        # 300 to 300000, left 2 contended threads at 9-39 tokens/s and cost idle speed.
        self.auto_threads = options.threads is None
        threads = options.threads or default_threads(since)[0]
        ctx_params = lib.llama_context_default_params()
        # Several sequences (batch --parallel): each its own stream of n_ctx cells, so that
        # a sequence attends to its own cache as a lone one does.
        sequences = max(options.sequences, 1)
        ctx_params.n_ctx = n_ctx * sequences
        ctx_params.n_batch = min(n_ctx * sequences, MAX_BATCH)
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        if sequences > 1:
            ctx_params.n_seq_max = sequences
            ctx_params.kv_unified = False
        self.sequences = sequences
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            self.model = None
            total = f"{sequences} x {n_ctx}" if sequences > 1 else f"{n_ctx}"
            raise EngineFailure(f"llama.cpp could not create a context of {total} tokens"
                                f"{_llama_said()}; try a smaller --ctx")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self._piece = ctypes.create_string_buffer(PIECE_BUFFER)
        # llama.cpp pads the context it allocates (to 256 cells: --ctx 16 gets 256); the
        # context asked for is the one kept to, so that prompts, replies and chat's history
        # fit what was asked, and what is reported is what is used.
        self.n_ctx = min(n_ctx, lib.llama_n_ctx(self.ctx) // sequences)
        self.n_batch = ctx_params.n_batch
        self.n_ubatch = lib.llama_n_ubatch(self.ctx)
        self._batched = 0  # leading cache positions processed in batches of the same kind
        self.threads = threads
        self.parameters = lib.llama_model_n_params(self.model)
        layers = lib.llama_model_n_layer(self.model)
        offloaded = 0 if gpu is None else (layers if model_params.n_gpu_layers < 0
                                           else min(model_params.n_gpu_layers, layers))
        self.gpu_layers = offloaded
        self.backend = gpu if offloaded else "CPU"
        template = lib.llama_model_chat_template(self.model, None)
        self.template = template.decode("utf-8") if template else None
        self.bos_text = self._special_text(lib.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(lib.llama_vocab_eos(self.vocab))
        self._warm_up()
        self.load_seconds = time.perf_counter() - started
        self._idle_since: CpuSample | None = sample_cpu() if self.auto_threads else None

    def _recheck_threads(self) -> None:
        """With the default thread count, follow what other processes do between replies:
        one started since the last reply takes a core from us, one that ended gives it
        back. The window is the time between replies, when this process is idle."""
        since = self._idle_since
        if since is None or (pause := time.monotonic() - since.at) < RECHECK_AFTER:
            return
        if pause > RECENT:  # what runs now, not an average since the last reply
            since = sample_cpu() or since
        threads, _ = default_threads(since)
        if threads != self.threads:
            self.lib.llama_set_n_threads(self.ctx, threads, threads)
            self.threads = threads

    def _warm_up(self) -> None:
        """Decode one token and forget it, as llama.cpp's own tools do after loading: the
        first single-token decode allocates its compute graph and pages weights in, a cost
        that belongs to loading, not to the first reply's tokens/s."""
        token = self.lib.llama_vocab_bos(self.vocab)
        warm = (self.lib.llama_token * 1)(max(token, 0))
        self._decode(warm, 1)
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    # -- text <-> tokens -------------------------------------------------------------------

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._token_bytes(token, special=True).decode("utf-8", errors="replace")

    def _token_bytes(self, token: int, special: bool = False) -> bytes:
        n = self.lib.llama_token_to_piece(self.vocab, token, self._piece, PIECE_BUFFER, 0,
                                          special)
        if n < 0:  # longer than the buffer: ask again with the size llama.cpp reported
            bigger = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, bigger, -n, 0, special)
            return bigger.raw[:n]
        return self._piece.raw[:n]

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        # Add BOS only when the model wants one and the template has not written it.
        add_bos = bool(self.lib.llama_vocab_get_add_bos(self.vocab)) and not (
            self.bos_text and text.startswith(self.bos_text)
        )
        capacity = len(data) + 8
        buffer = (self.lib.llama_token * capacity)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_bos, True)
        if n < 0:
            capacity = -n
            buffer = (self.lib.llama_token * capacity)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_bos,
                                        True)
        return list(buffer[:n])

    def format(self, messages: list[Message]) -> str:
        if self.template:
            return chat_template.render(self.template, messages, bos_token=self.bos_text,
                                        eos_token=self.eos_text)
        return chat_template.plain(messages)

    # -- generation ------------------------------------------------------------------------

    def _sampler(self, options: GenerationOptions) -> Any:
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if options.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if options.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(options.top_k))
        if 0 < options.top_p < 1:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(options.top_p, 1))
        if options.min_p > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(options.min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(options.temperature))
        # The loop always gives a seed, never llama.cpp's "random" value.
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(options.seed))
        return chain

    def _decode(self, tokens: ctypes.Array, count: int) -> None:
        batch = self.lib.llama_batch_get_one(tokens, count)
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise EngineFailure(f"llama_decode failed with status {status}{_llama_said()}")

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        return self.tokenize(self.format(messages))

    def text_tokens(self, text: str) -> list[int]:
        return self.tokenize(text)

    @property
    def context_length(self) -> int:
        return self.n_ctx

    def _detokenizer(self) -> ByteDetokenizer:
        return ByteDetokenizer(self._token_bytes)

    def _is_end(self, token: int) -> bool:
        return self.lib.llama_vocab_is_eog(self.vocab, token)

    def _trim_cache(self, keep: int) -> int:
        memory = self.lib.llama_get_memory(self.ctx)
        # seq_rm refuses a partial removal where the model's memory cannot (recurrent
        # models): then the cache starts again from nothing.
        if keep and self.lib.llama_memory_seq_rm(memory, 0, keep, -1):
            return keep
        self.lib.llama_memory_clear(memory, True)
        return 0

    def _cache_length(self) -> int:
        return self.lib.llama_memory_seq_pos_max(self.lib.llama_get_memory(self.ctx), 0) + 1

    def _exact_length(self) -> int:
        return min(self._batched, self._prompt_length)

    def _exact_keep(self, keep: int, total: int) -> int:
        """Processing a whole prompt, llama.cpp computes it in micro-batches of n_ubatch
        tokens from position 0, the last one shorter. A kept prefix is exact when every
        micro-batch the rest is processed in (split at the same positions) is of the
        same kind as the whole prompt's there: both SAME_RESULT_BATCH tokens or more, or
        the very same batch."""
        size, least = self.n_ubatch, SAME_RESULT_BATCH
        last = (total - 1) // size * size  # where the whole prompt's last batch starts
        if total - last < least:  # a short last batch: processed again, as it was
            keep = min(keep, last)
        start = keep // size * size  # the whole prompt's batch `keep` falls in
        end = min(start + size, total)
        if keep > start and end - keep < least:  # its rest would be a short batch
            keep = max(end - least, start)
        return keep

    def _write_state(self, path: Path, header: dict[str, Any]) -> None:
        from llmctl.engines.prompt_cache import write_container

        lib = self.lib
        size = lib.llama_state_seq_get_size(self.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(self.ctx, buffer, size, 0)
        if written == 0 and size:
            raise EngineFailure(f"llama.cpp could not copy its KV cache{_llama_said()}")
        write_container(path, header, memoryview(buffer)[:written])

    def _read_state(self, path: Path, header: dict[str, Any]) -> int:
        from llmctl.engines.prompt_cache import CacheRefused, read_payload

        buffer = read_payload(path, header, lambda size: (ctypes.c_uint8 * size)())
        lib = self.lib
        self._trim_cache(0)
        if lib.llama_state_seq_set_data(self.ctx, buffer, len(buffer), 0) == 0:
            self._trim_cache(0)
            raise CacheRefused(f"prompt cache {path} not used: llama.cpp could not restore "
                               f"it{_llama_said()}")
        # Saved from prompt processing only (`cached_prefix`): exact as processed.
        self._batched = self._cache_length()
        return self._batched

    def _output_tokenizer(self) -> Any:
        from llmctl.engines.constraint import llama_tokenizer

        return llama_tokenizer(self.vocab)

    def _vocabulary_size(self) -> int:
        return self.lib.llama_vocab_n_tokens(self.vocab)

    def _steps(self, tokens: list[int], options: GenerationOptions, budget: int,
               matcher: Matcher | None = None) -> Generator[int, None, None]:
        self._recheck_threads()
        return self._sample_and_decode(tokens, options, matcher)

    def _sample_and_decode(self, tokens: list[int], options: GenerationOptions,
                           matcher: Matcher | None) -> Generator[int, None, None]:
        """The C API loop: the prompt in micro-batches, then per token one sample and
        one single-token decode into a batch made once, with no Python copy of the logits."""
        lib, ctx = self.lib, self.ctx
        start = self._cache_length()
        self._batched = min(self._batched, start)
        sampler = self._sampler(options)
        step = (lib.llama_token * 1)()
        step_batch = lib.llama_batch_get_one(step, 1)
        sample, decode = lib.llama_sampler_sample, lib.llama_decode
        try:
            for position, stop in _micro_batches(start, start + len(tokens), self.n_ubatch):
                chunk = tokens[position - start:stop - start]
                self._decode((lib.llama_token * len(chunk))(*chunk), len(chunk))
                if self._batched == position and len(chunk) >= SAME_RESULT_BATCH:
                    self._batched = stop
            while True:
                if matcher is not None:
                    _mask_row(lib, ctx, matcher, -1)
                token = sample(sampler, ctx, -1)
                if matcher is not None:
                    matcher.consume(token)
                yield token  # the loop asks for the next one only when the reply goes on
                step[0] = token
                status = decode(ctx, step_batch)
                if status != 0:
                    raise EngineFailure(f"llama_decode failed with status {status}"
                                        f"{_llama_said()}")
        finally:
            lib.llama_sampler_free(sampler)
            if self.auto_threads:
                self._idle_since = sample_cpu()

    def open_slots(self, count: int) -> LlamaSlots | None:
        """The context's sequences as slots; None when it was made for one (load with
        LoadOptions(sequences=count))."""
        if self.sequences < 2:
            return None
        self._recheck_threads()
        return LlamaSlots(self, min(count, self.sequences))

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        self.close()


def _micro_batches(start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    """(first, past-the-end) positions of the chunks a prompt from `start` to `end` is
    decoded in: split where processing the whole prompt from position 0 splits it, every
    `size` (n_ubatch) positions, so that its numbers are the whole prompt's
    (SAME_RESULT_BATCH)."""
    position = start
    while position < end:
        stop = min((position // size + 1) * size, end)
        yield position, stop
        position = stop


def _mask_row(lib: Any, ctx: Any, matcher: Matcher, row: int) -> None:
    """Mask the logits of batch row `row` (-1: the last) in llama.cpp's own buffer, which
    the sampler chain then reads: every token `matcher` does not allow at -inf."""
    import numpy as np

    logits = lib.llama_get_logits_ith(ctx, row)
    matcher.mask(np.ctypeslib.as_array(logits, shape=(matcher.size,)))


class LlamaSlots(Slots):
    """The sequences of a multi-sequence llama.cpp context (`llmctl.engines.parallel`):
    a prompt in its own micro-batches at the positions `run` uses, then one llama_decode
    per step with every running sequence's token, each sampled from its row on its own
    sampler chain."""

    def __init__(self, engine: LlamaEngine, count: int):
        lib = engine.lib
        self.engine, self.lib, self.ctx = engine, lib, engine.ctx
        self.count = count
        self.context_length = engine.n_ctx
        self.memory = lib.llama_get_memory(engine.ctx)
        self.batch = lib.llama_batch_init(max(engine.n_batch, count), 0, 1)
        self.samplers: dict[int, Any] = {}
        self.matchers: dict[int, Matcher | None] = {}
        self.lengths = [0] * count
        for slot in range(count):
            lib.llama_memory_seq_rm(self.memory, slot, -1, -1)

    def _fill(self, entries: list[tuple[int, int, int]], last_only: bool) -> None:
        """Put (token, position, slot) entries in the batch and decode it; logits for every
        entry, or for the last only (a prompt's chunk)."""
        batch = self.batch
        for i, (token, position, slot) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = not last_only or i == len(entries) - 1
        batch.n_tokens = len(entries)
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise EngineFailure(f"llama_decode failed with status {status}{_llama_said()}")

    def _sample(self, slot: int, row: int) -> int:
        matcher = self.matchers[slot]
        if matcher is not None:
            _mask_row(self.lib, self.ctx, matcher, row)
        return self.lib.llama_sampler_sample(self.samplers[slot], self.ctx, row)

    def start(self, slot: int, tokens: list[int], options: GenerationOptions,
              matcher: Matcher | None) -> int:
        self.samplers[slot] = self.engine._sampler(options)
        self.matchers[slot] = matcher
        for position, stop in _micro_batches(0, len(tokens), self.engine.n_ubatch):
            self._fill([(tokens[p], p, slot) for p in range(position, stop)], last_only=True)
        self.lengths[slot] = len(tokens)
        return self._sample(slot, -1)

    def advance(self, last: dict[int, int]) -> dict[int, int]:
        # In increasing slot order: llama.cpp computes a multi-stream batch in one pass
        # only over consecutive sequence ids, and splits it at every break in the order
        # (llama_batch_allocr::split_equal); [1, 2, 3, 0] took two passes, [0, 2] two.
        order = sorted(last)
        self._fill([(last[slot], self.lengths[slot], slot) for slot in order],
                   last_only=False)
        following = {}
        for row, slot in enumerate(order):
            self.lengths[slot] += 1
            following[slot] = self._sample(slot, row)
        return following

    def release(self, slot: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, slot, -1, -1)
        self.lengths[slot] = 0
        if (sampler := self.samplers.pop(slot, None)) is not None:
            self.lib.llama_sampler_free(sampler)
        self.matchers.pop(slot, None)

    def close(self) -> None:
        for slot in list(self.samplers):
            self.release(slot)
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        if self.engine.auto_threads:
            self.engine._idle_since = sample_cpu()


def load(path: Path, options: LoadOptions) -> LlamaEngine:
    return LlamaEngine(path, options)
