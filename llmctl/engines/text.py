"""The text engine contract, and the one generation loop every text engine feeds.

    run, chat, bench, batch  ->  TextEngine.generate(messages, options)
                                 yields Token(text) per generated token, then Done(Stats)

An engine built on `TokenEngine` writes only what is its own: opening the model, turning
messages into prompt tokens (its chat template), and the token stream (`_steps`: prefill,
sampling, decoding, in whatever way keeps its library fastest), the text of each token
(`_detokenizer`), its end-of-generation test and its KV cache (`_trim_cache`,
`_cache_length`). `TokenEngine.generate_from_tokens` does the rest once for all engines:
the options and context checks, the token budget, the seed, the leading-space strip, one
`Token` per token, what the cache holds, the timing and the `Done` statistics.

With `keep_cache=True` a reply starts from the longest prefix of its tokens that the cache
still holds from the reply before, and processes only the rest (`Stats.cached_tokens` says
how many were reused). By default the prefix kept is one whose cached state is exactly what
processing the whole prompt would have computed (`_exact_keep`), so that the reply is the
same, token for token at temperature 0, as without the cache (chat, `--prompt-cache`);
`exact=False` keeps the whole common prefix (`bench -d` measures a test after a context
filled that way).

Import-light (no numpy, no engine library): `run --help` and the option checks use it.
"""

from __future__ import annotations

import codecs
import math
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from llmctl import host
from llmctl.errors import EngineFailure, UsageError

if TYPE_CHECKING:
    from pathlib import Path

    from llmctl.engines.constraint import Matcher, OutputFormat
    from llmctl.engines.prompt_cache import CacheIdentity

Role = Literal["system", "user", "assistant"]
StopReason = Literal["stop", "stop_sequence", "length", "interrupted"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


# Context used when none is asked for: the model's own, at most this many tokens (more
# costs memory few prompts need). The engines and the memory estimate share it.
DEFAULT_CONTEXT = 4096
# The smallest context --ctx takes. llama.cpp allocates at least 256 cells whatever is
# asked; the engines keep to the number asked for, so that what is reported is what is used.
MIN_CONTEXT = 16
# The largest context for a model that does not say what it was trained for. llama.cpp
# keeps the context in 32-bit fields (4294967312 wrapped round to 16 and then aborted);
# 2^24 tokens is above every trained context published so far and far inside that.
MAX_CONTEXT = 1 << 24
# Seeds: llama.cpp's samplers take 32 bits and read 0xFFFFFFFF (LLAMA_DEFAULT_SEED) as
# "pick a random seed", so the largest seed that reproduces is one below it. MLX gets the
# same range, so that a seed means the same on both engines.
MAX_SEED = 0xFFFFFFFF - 1
# Temperature: above a few, sampling is already uniform; past float32's range (which the
# engines compute in) it turns into infinity. 100 keeps every useful value.
MAX_TEMPERATURE = 100.0
MAX_TOP_K = (1 << 31) - 1  # llama.cpp's int32; beyond the vocabulary, top-k keeps everything


def default_context(requested: int | None, trained: int | None) -> int:
    """The context length an engine opens a model with."""
    return requested or min(trained or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


ALL_LAYERS = -1  # --gpu-layers all
# --dtype -> torch's name for it (the short names as the field writes them).
DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "float16": "float16",
          "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class LoadOptions:
    context_length: int | None = None  # None: the engine's default for the model
    threads: int | None = None  # None: the cores other processes leave free
    # Model layers offloaded to the GPU (llama.cpp): ALL_LAYERS, or None for the default
    # (all where the build has a GPU backend, none otherwise).
    gpu_layers: int | None = None
    # PyTorch engines (transformers): where and in what precision the weights compute;
    # None: the first of cuda, mps, cpu, and the precision that device computes best.
    device: str | None = None
    dtype: str | None = None  # a DTYPES key
    trust_pickle: bool = False  # load pickled weights (.bin), which can run code
    # Core ML language models: the compute units (llmctl.formats.coreml's spelling);
    # None: CPU and GPU.
    compute_unit: str | None = None
    # Sequences decoded together (batch --parallel), each with a context of its own of
    # `context_length` tokens; 0: as many as fit in memory (loader.open_text), at most
    # `most_sequences` when that is set (there are no more prompts than that).
    sequences: int = 1
    most_sequences: int | None = None

    def validate(self, trained_context: int | None = None) -> tuple[LoadOptions, list[str]]:
        """The options bounded by what the engines accept, and notes on what was changed.

        A context outside MIN_CONTEXT..the model's trained context (MAX_CONTEXT when the
        model does not say) is refused: beyond its trained length a model writes nonsense,
        and past 32 bits llama.cpp aborts. More threads than this process may run at once
        are lowered to that many (`llmctl.host.cpu_limit`), with a note: the extra
        threads could only wait for a CPU, and slow every other thread down while they do.
        """
        ctx = self.context_length
        if ctx is not None:
            if ctx < MIN_CONTEXT:
                raise UsageError(f"--ctx {ctx} is below the smallest context, {MIN_CONTEXT} "
                                 "tokens", hint=f"use --ctx {MIN_CONTEXT} or more")
            limit = trained_context or MAX_CONTEXT
            if ctx > limit:
                said = (f"the {limit} tokens the model was trained for" if trained_context
                        else f"llmctl's limit of {limit} tokens for a model that does not "
                             "say its trained context")
                raise UsageError(f"--ctx {ctx} is more than {said}",
                                 hint=f"use --ctx {limit} or less")
        notes = []
        if self.device is not None and not _DEVICE.fullmatch(self.device):
            raise UsageError(f"unknown --device '{self.device}'",
                             hint="use cuda, cuda:N, mps or cpu")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"unknown --dtype '{self.dtype}'",
                             hint=f"use {', '.join(DTYPES)}")
        if self.gpu_layers is not None and self.gpu_layers < ALL_LAYERS:
            raise UsageError(f"--gpu-layers {self.gpu_layers} is below 0",
                             hint="use a number of layers, or all")
        threads = self.threads
        if threads is not None:
            if threads < 1:
                raise UsageError(f"--threads {threads} is below 1", hint="use --threads 1 or "
                                 "more, or leave it out to use the cores that are free")
            if threads > (most := host.cpu_limit()):
                notes.append(f"--threads {threads} is more than the {most} CPUs this process "
                             f"may use; using {most}")
                threads = most
        return replace(self, threads=threads), notes


@dataclass(frozen=True)
class GenerationOptions:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None  # None: a fresh random seed each time
    max_tokens: int | None = None  # None: until the model stops or the context is full
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens
    stop: tuple[str, ...] = ()  # the reply ends before the first of these (not shown)
    output: OutputFormat | None = None  # the reply must be JSON (of this schema)

    def validate(self) -> GenerationOptions:
        """The options themselves, or UsageError for a value no engine can sample with.
        Called by run and chat before loading the model, and by the engines before each
        reply, so that no caller hands llama.cpp or MLX a NaN or a wrapped-round integer
        (command-line ranges do not catch NaN: every comparison with it is false)."""
        _check_range("--temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_range("--top-p", self.top_p, 0.0, 1.0)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("--top-k", self.top_k, 0, MAX_TOP_K)
        if self.seed is not None:
            _check_range("--seed", self.seed, 0, MAX_SEED,
                         why=f" ({MAX_SEED + 1} means 'random' to llama.cpp)")
        if self.max_tokens is not None:
            _check_range("--max-tokens", self.max_tokens, 1, None)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UsageError("--stop takes a sequence of one character or more",
                             hint="e.g. --stop '\\n\\n' or --stop END")
        return self


def _check_range(name: str, value: float, low: float, high: float | None, why: str = ""
                 ) -> None:
    finite = isinstance(value, int) or math.isfinite(value)
    if finite and value >= low and (high is None or value <= high):
        return
    bounds = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
    if isinstance(low, int):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
    raise UsageError(f"{name} {value} is out of range{why}", hint=f"use a number {bounds}")


@dataclass(frozen=True)
class Token:
    """One generated token. `text` is "" while a character's bytes are incomplete."""

    text: str


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    generated_tokens: int
    prompt_seconds: float  # prompt processing, up to the first token
    generate_seconds: float  # from the first token to the last
    stop_reason: StopReason
    load_seconds: float = 0.0
    peak_memory_bytes: int = 0
    cached_tokens: int = 0  # leading prompt tokens taken from the cache, not processed

    @property
    def processed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.processed_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tokens_per_second(self) -> float:
        # The first token is produced by prompt processing; the rest each cost one decode.
        decoded = max(self.generated_tokens - 1, 0)
        return decoded / self.generate_seconds if self.generate_seconds else 0.0

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["processed_tokens"] = self.processed_tokens
        data["prompt_tokens_per_second"] = round(self.prompt_tokens_per_second, 2)
        data["generate_tokens_per_second"] = round(self.generate_tokens_per_second, 2)
        return data


@dataclass(frozen=True)
class Done:
    stats: Stats


Event = Token | Done


class TextEngine(Protocol):
    """A loaded text model, as every command uses it. Typed against this, not an engine."""

    @property
    def name(self) -> str:
        """The engine's name in the registry ("llama", "mlx")."""
        ...

    @property
    def context_length(self) -> int:
        """Tokens the context holds: prompt and reply together never exceed it."""
        ...

    @property
    def threads(self) -> int | None:
        """CPU threads the engine computes with; None where it sizes its own work (MLX)."""
        ...

    @property
    def load_seconds(self) -> float: ...

    @property
    def backend(self) -> str:
        """Where it computes, as benchmark tables say it: "CPU", "Metal", "CUDA"."""
        ...

    @property
    def parameters(self) -> int | None:
        """The model's parameter count, where the engine can tell."""
        ...

    @property
    def gpu_layers(self) -> int:
        """Layers offloaded to a GPU (llama.cpp); 0 on the CPU or where not counted."""
        ...

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        """The conversation formatted with the model's own chat template, as token ids."""
        ...

    def count_tokens(self, messages: list[Message]) -> int:
        """len(prompt_tokens(messages)): what `chat` trims its history by."""
        ...

    def text_tokens(self, text: str) -> list[int]:
        """`text` as token ids with no chat template (`run --raw`), with the BOS token
        where the model wants one."""
        ...

    def generate(self, messages: list[Message], options: GenerationOptions, *,
                 keep_cache: bool = False) -> Iterator[Event]:
        """Stream the reply to `messages`, formatted with the model's own chat template
        (with `keep_cache`, as `generate_from_tokens` says)."""
        ...

    def generate_from_tokens(self, tokens: list[int], options: GenerationOptions, *,
                             keep_cache: bool = False, exact: bool = True
                             ) -> Iterator[Event]:
        """Stream the continuation of `tokens` as they are (benchmarks time this). With
        `keep_cache`, the prefix the cache holds from the reply before is not processed
        again (with `exact`, only as far as the reply stays the same as without it)."""
        ...

    @property
    def saves_cache(self) -> bool:
        """Whether the engine can save its KV cache to a file and load it (--prompt-cache)."""
        ...

    def cached_prefix(self) -> list[int]:
        """The leading tokens the KV cache holds exactly as processing them as one prompt
        would: what a saved prompt cache keeps."""
        ...

    def save_cache(self, path: Path, identity: CacheIdentity) -> int:
        """Write `cached_prefix()`'s state to `path` (atomically); the tokens written."""
        ...

    def load_cache(self, path: Path, identity: CacheIdentity) -> int:
        """Restore a state `save_cache` wrote, for the next reply to start from; the tokens
        restored. CacheRefused (with the reason) for a file made by another model, engine,
        context or version, or one that is damaged: the cache is then left empty."""
        ...

    def close(self) -> None: ...


class Detokenizer(Protocol):
    """Text from token ids, one token at a time, for one reply."""

    def add(self, token: int) -> str:
        """The text `token` completes: "" while a character's bytes are incomplete."""
        ...

    def flush(self) -> str:
        """What is left at the end of the reply (an unfinished character, as U+FFFD)."""
        ...


class ByteDetokenizer:
    """For tokenizers that give each token's bytes: decoded as UTF-8 incrementally, so that
    a character split over two tokens comes out whole with the second."""

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._bytes = token_bytes
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode

    def add(self, token: int) -> str:
        return self._decode(self._bytes(token))

    def flush(self) -> str:
        return self._decode(b"", True)


class Slots(ABC):
    """`count` sequences of one loaded model, decoded together: what an engine that can
    gives `llmctl.engines.parallel.generate_many` (TokenEngine.open_slots)."""

    count: int
    context_length: int  # tokens each sequence holds, prompt and reply together

    @abstractmethod
    def start(self, slot: int, tokens: list[int], options: GenerationOptions,
              matcher: Matcher | None) -> int:
        """Process `tokens` as the prompt of the empty `slot`, alone, and sample its first
        token (`options.seed` is set)."""

    @abstractmethod
    def advance(self, last: dict[int, int]) -> dict[int, int]:
        """Decode each slot's last token (slot -> token) in one batch and sample each
        one's next token. `generate_many` passes every running slot, always."""

    @abstractmethod
    def release(self, slot: int) -> None:
        """Forget the slot's sequence (its cache, its sampler): it can take another."""

    def close(self) -> None:  # noqa: B027  (slots without native resources keep this)
        pass


class TokenEngine(ABC):
    """A text engine on the shared generation loop. Subclasses set `name`, `load_seconds`
    (and `threads` where they have them) and write the abstract methods."""

    name: str
    load_seconds: float = 0.0
    threads: int | None = None
    backend: str = "CPU"
    gpu_layers: int = 0  # layers the engine runs on a GPU (llama.cpp's offload)
    parameters: int | None = None
    # The tokens the engine's KV cache holds, in order, as the last reply left it, and
    # how many of them (from the start) were processed as prompt.
    _cached: tuple[int, ...] = ()
    _prompt_length: int = 0
    _lltokenizer: Any = None  # llguidance's view of the vocabulary, once needed
    saves_cache: bool = False  # engines that write `_write_state`/`_read_state` say True

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @abstractmethod
    def prompt_tokens(self, messages: list[Message]) -> list[int]: ...

    @abstractmethod
    def text_tokens(self, text: str) -> list[int]: ...

    @abstractmethod
    def _steps(self, tokens: list[int], options: GenerationOptions, budget: int,
               matcher: Matcher | None = None) -> Generator[int, None, None]:
        """The token stream of one reply: prefill `tokens` after what the cache holds
        (`_trim_cache` has cut it to the prefix kept), then sample and decode. With a
        `matcher` (constrained output), each token is sampled from the logits with every
        token `matcher.allowed()` leaves out masked, and then given to `matcher.consume`.

        Called before the clock starts, so what runs before it returns is set-up
        (seeding). The first `next()` processes the prompt and yields the first
        sampled token; each later one decodes the token before it and yields the next.
        The loop asks for at most `budget` tokens and stops asking at the end-of-generation
        token, so nothing is decoded that the reply does not use; then it closes the
        stream, which frees what the stream holds (in its `finally`). `options.seed` is
        always set: the loop picks one when the caller did not."""

    @abstractmethod
    def _detokenizer(self) -> Detokenizer:
        """A fresh detokenizer for one reply."""

    @abstractmethod
    def _is_end(self, token: int) -> bool:
        """Whether `token` ends the reply (end of turn, end of text)."""

    def _output_tokenizer(self) -> Any:
        """The vocabulary as llguidance reads it, for constrained output. Engines that
        cannot mask their logits keep this refusal."""
        raise UsageError(f"the {self.name} engine cannot constrain its output to JSON",
                         hint="use the llama or mlx engine")

    def _vocabulary_size(self) -> int:
        raise NotImplementedError

    def _matcher(self, output: OutputFormat) -> Matcher:
        from llmctl.engines.constraint import Matcher

        # Reading the vocabulary takes about 0.4 s: once per loaded model.
        if self._lltokenizer is None:
            self._lltokenizer = self._output_tokenizer()
        return Matcher(self._lltokenizer, output, self._vocabulary_size())

    def _trim_cache(self, keep: int) -> int:
        """Keep the first `keep` tokens of the KV cache and drop the rest (all of it for
        0); returns how many are kept, 0 where the engine could only clear it. Engines
        without a cache to keep take this default."""
        return 0

    def _cache_length(self) -> int:
        """How many tokens the KV cache holds now."""
        return 0

    def _exact_keep(self, keep: int, total: int) -> int:
        """The longest prefix, at most `keep` of a prompt of `total` tokens, whose cached
        state is what processing the whole prompt computes. Engines whose results do not
        depend on how the prompt is split into batches keep this default (MLX on the CPU:
        measured bit for bit in tests/test_prompt_cache.py)."""
        return keep

    def _exact_length(self) -> int:
        """How many leading cached tokens `_exact_keep` may keep: those processed as part
        of a prompt, not decoded one at a time as a reply was generated."""
        return self._prompt_length

    def _write_state(self, path: Path, header: dict[str, Any]) -> None:
        """Write the KV cache (cut to `cached_prefix()`) with `header`, to `path`."""
        raise UsageError(f"the {self.name} engine cannot save its KV cache",
                         hint="leave out --prompt-cache")

    def _read_state(self, path: Path, header: dict[str, Any]) -> int:
        """Restore the cache `_write_state` wrote with `header` (already checked); the
        tokens the cache holds after."""
        raise UsageError(f"the {self.name} engine cannot load a KV cache",
                         hint="leave out --prompt-cache")

    def cached_prefix(self) -> list[int]:
        return list(self._cached[:self._exact_length()])

    def save_cache(self, path: Path, identity: CacheIdentity) -> int:
        from llmctl.engines import prompt_cache

        tokens = self.cached_prefix()
        self._trim_cache(len(tokens))
        self._cached = tuple(tokens[:self._cache_length()])
        prompt_cache.write(path, self._write_state, identity, self._cached)
        return len(self._cached)

    def load_cache(self, path: Path, identity: CacheIdentity) -> int:
        from llmctl.engines import prompt_cache

        self._cached, self._prompt_length = (), 0
        tokens = prompt_cache.read(path, identity, self._read_state)
        self._cached, self._prompt_length = tuple(tokens), len(tokens)
        return len(tokens)

    def _peak_memory(self) -> int:
        """The peak memory reported in the reply's statistics."""
        return host.peak_memory_bytes()

    def open_slots(self, count: int) -> Slots | None:
        """`count` sequences decoded together (llmctl.engines.parallel), where the engine
        can; None: its replies run one at a time."""
        return None

    def close(self) -> None:  # noqa: B027  (engines without native resources keep this)
        pass

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.prompt_tokens(messages))

    def generate(self, messages: list[Message], options: GenerationOptions, *,
                 keep_cache: bool = False) -> Iterator[Event]:
        yield from self.generate_from_tokens(self.prompt_tokens(messages), options,
                                             keep_cache=keep_cache)

    def generate_from_tokens(self, tokens: list[int], options: GenerationOptions, *,
                             keep_cache: bool = False, exact: bool = True
                             ) -> Iterator[Event]:
        """The one generation loop. Per token it adds only a clock read, the end test and
        the detokenizer's call to the engine's own step (llama.cpp's runs at llama-bench's
        speed through it: README, performance table)."""
        # Checked before each reply as well as by the commands, so that no library caller
        # hands an engine a NaN or a wrapped-round integer.
        options.validate()
        context = self.context_length
        if len(tokens) >= context:
            raise UsageError(
                f"the prompt is {len(tokens)} tokens but the context holds {context}",
                hint="raise --ctx or shorten the prompt",
            )
        budget = context - len(tokens)
        if options.max_tokens is not None:
            budget = min(budget, options.max_tokens)
        if options.seed is None:
            # A seed of our own, from the range a user could pass, never an engine's
            # "random" value: every reply ran with a seed that reproduces it.
            options = replace(options, seed=secrets.randbelow(MAX_SEED + 1))
        # The last prompt token is always processed: its logits give the first token.
        keep = _common_prefix(self._cached, tokens, len(tokens) - 1) if keep_cache else 0
        if keep and exact:
            keep = self._exact_keep(min(keep, self._exact_length()), len(tokens))
        kept = self._trim_cache(keep)
        self._cached, self._prompt_length = (), 0  # unknown until the stream has ended
        detokenizer = self._detokenizer()
        add, is_end = detokenizer.add, self._is_end
        stop_on_end = not options.ignore_eos
        stops = options.stop
        held = ""  # text that may be the start of a stop sequence, not shown yet
        clock = time.perf_counter
        generated = 0
        sampled: list[int] = []
        stop_reason: StopReason = "length"
        leading = True
        matcher = self._matcher(options.output) if options.output is not None else None
        steps = self._steps(tokens[kept:], options, budget, matcher)
        started = clock()
        first_token_at = last_token_at = started
        try:
            for token in steps:
                now = clock()
                if generated == 0:
                    first_token_at = now
                sampled.append(token)
                if stop_on_end and is_end(token):
                    stop_reason = "stop"  # the end-of-generation token is not in the reply
                    break
                generated += 1
                last_token_at = now
                text = add(token)
                if leading:  # the reply starts at its first visible character
                    text = text.lstrip()
                    leading = not text
                if stops:
                    text, held, found = _hold_back(held + text, stops)
                    if found:
                        stop_reason = "stop_sequence"
                        yield Token(text)
                        break
                # One event per token, even when its bytes end mid-character and the text
                # waits for the next one: consumers can count tokens by events.
                yield Token(text)
                if generated >= budget:
                    break
        finally:
            steps.close()
            # The cache holds the prompt and the sampled tokens the engine has decoded.
            self._cached = (*tokens, *sampled)[:self._cache_length()]
            self._prompt_length = min(len(tokens), len(self._cached))
        tail = detokenizer.flush() if stop_reason != "stop_sequence" else ""
        tail = held + (tail.lstrip() if leading else tail)
        if stops and tail:  # a stop sequence completed by the last, unfinished character
            text, _, found = _hold_back(tail, stops)
            tail = text if found else tail
            stop_reason = "stop_sequence" if found else stop_reason
        if tail:
            yield Token(tail)
        if matcher is not None and not matcher.complete:
            raise ReplyCut(f"the reply was cut at {generated} tokens before the JSON was "
                           "complete; raise --max-tokens (or --ctx)")
        yield Done(Stats(
            prompt_tokens=len(tokens),
            generated_tokens=generated,
            prompt_seconds=first_token_at - started,
            # Covers generated_tokens - 1 steps: the first token comes from the prompt.
            generate_seconds=last_token_at - first_token_at,
            stop_reason=stop_reason,
            load_seconds=self.load_seconds,
            peak_memory_bytes=self._peak_memory(),
            cached_tokens=kept,
        ))


class ReplyCut(EngineFailure):
    """A constrained reply ended before its JSON was whole (exit 1: never a half object
    presented as success)."""


def _hold_back(text: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """(what can be shown, what is held back, whether a stop sequence was found): the text
    before the first stop sequence, or all but the longest end of `text` that begins one
    (a stop sequence can span several tokens)."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    if found:
        return text[:min(found)], "", True
    for size in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        if any(stop.startswith(text[-size:]) for stop in stops):
            return text[:-size], text[-size:], False
    return text, "", False


def _common_prefix(held: tuple[int, ...], tokens: list[int], most: int) -> int:
    """How many leading tokens `held` and `tokens` share, at most `most`."""
    n = 0
    for a, b in zip(held, tokens[:most], strict=False):
        if a != b:
            break
        n += 1
    return n
