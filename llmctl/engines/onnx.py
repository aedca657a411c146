"""ONNX Runtime GenAI: the folders `llmctl convert --to onnx` makes (genai_config.json,
model.onnx and its data, the tokenizer files), on the CPU, CUDA or DirectML, whichever
execution provider the build was made for.

The token stream is onnxruntime-genai's own generator loop (`og.Generator`: `append_tokens`
for the prompt, then `generate_next_token` / `get_next_tokens`), with its own sampler set
through the search options: greedy at temperature 0, else top-k, top-p and temperature
seeded with `random_seed`. The shared loop (`llmctl.engines.text`) turns it into the
contract, with the same events and statistics as every text engine.

What onnxruntime-genai's sampler does not do as the other engines do, said here once:
- min_p is ignored: its search options have no min-p.
- Temperature scales the logits before top-p picks the nucleus (llama.cpp, MLX and
  transformers take the nucleus of the unscaled distribution).
- Seeds are C++ ints there (a negative one means "random"): seeds of 2^31 and above are
  folded onto 0..2^31-1, so two seeds 2^31 apart sample alike.

The KV cache lives in the generator, and stays there between replies (`rewind_to` cuts it
to the prefix kept), but only for greedy replies: onnxruntime-genai fixes a generator's
sampling and seeds its random numbers once, when the generator is made, so a sampled reply
gets a generator of its own, seeded for it, and processes its whole prompt. What is kept
is exact on the CPU (see ROW_BLOCK); other providers are not measured and keep nothing
exactly. Constrained output masks the logits between onnxruntime-genai's steps
(`get_logits` / `set_logits`), and its sampler then draws from what the grammar allows.

The prompt is the model's own chat template (chat_template.jinja, or tokenizer_config.json's)
rendered by `llmctl.engines.chat_template`, the renderer the llama engine uses too, and
tokenized by onnxruntime-genai's tokenizer (which reads the same tokenizer.json): the
same ids as transformers' apply_chat_template, without importing transformers (and torch)
for every run. Replies are detokenized by its tokenizer stream, which holds a character's
bytes back until the character is whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.engines import chat_template
from llmctl.engines.text import (
    Event,
    GenerationOptions,
    LoadOptions,
    Message,
    TokenEngine,
    default_context,
)
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError, first_line
from llmctl.formats import hf, onnx
from llmctl.host import default_threads, sample_cpu

if TYPE_CHECKING:
    from llmctl.engines.constraint import Matcher

# genai_config.json's provider names -> where the model computes, as `show` and the
# benchmark tables say it.
PROVIDERS = {"cuda": "CUDA", "dml": "DirectML", "webgpu": "WebGPU", "qnn": "QNN",
             "openvino": "OpenVINO", "nvtensorrtrtx": "TensorRT-RTX"}
SEED_RANGE = 1 << 31  # onnxruntime-genai's random_seed is a C++ int; < 0 means random
# Measured here on SmolLM2 (int4 and fp32 builds, 1 and 2 threads): ONNX Runtime's CPU
# kernels compute a batch of one token, and the last row of a batch whose length is one
# more than a multiple of ROW_BLOCK (129, 257, ...), in a way of their own; every other
# row comes out bit for bit the same however the tokens are split into batches
# (tests/test_onnx.py checks both). `_exact_keep` keeps a prefix only where the batches
# it leads to compute every row as the whole prompt in one batch does.
ROW_BLOCK = 128


@lru_cache(maxsize=1)
def _library() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise EngineUnavailable("onnx", f"onnxruntime-genai cannot be imported ({exc})",
                                "pip install 'llmctl[onnx]'") from None
    return og


def provider(config: dict[str, Any]) -> str:
    """The execution provider a genai config names first ("cpu" when it names none)."""
    decoder = config.get("model", {}).get("decoder", {})
    options = decoder.get("session_options", {}).get("provider_options", [])
    for entry in options if isinstance(options, list) else []:
        if isinstance(entry, dict) and entry:
            return str(next(iter(entry))).lower()
    return "cpu"


def _end_tokens(config: dict[str, Any], tokenizer: Any) -> set[int]:
    """The ids that end a reply: genai_config's eos_token_id (one id or a list) and the
    tokenizer's."""
    found: set[int] = set()
    value = config.get("model", {}).get("eos_token_id")
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, int) and not isinstance(item, bool):
            found.add(item)
    found.update(int(t) for t in getattr(tokenizer, "eos_token_ids", []))
    return found


def _odd_rows(start: int, end: int) -> dict[int, str]:
    """The rows that a batch of tokens start..end computes in a way of their own (see
    ROW_BLOCK), by position: a batch of one token, or the last row of a batch whose length
    is one more than a multiple of ROW_BLOCK."""
    length = end - start
    if length == 1:
        return {start: "alone"}
    if length > 1 and length % ROW_BLOCK == 1:
        return {end - 1: "last in its block"}
    return {}


class OnnxEngine(TokenEngine):
    name = "onnx"

    def __init__(self, folder: Path, options: LoadOptions, config: dict[str, Any]):
        og = self.og = _library()
        started = time.perf_counter()
        trained = onnx.shape(config)[2]
        options, _ = options.validate(trained or None)
        self.provider = provider(config)
        self.backend = PROVIDERS.get(self.provider, "CPU")
        if self.provider == "cpu":
            since = sample_cpu() if options.threads is None else None
            self.threads = options.threads or default_threads(since)[0]
        try:
            og_config = og.Config(str(folder))
            if self.threads is not None:
                # An overlay changes the one setting and keeps the rest of the config's.
                og_config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": self.threads}}}}))
            self.model = og.Model(og_config)
            self.tokenizer = og.Tokenizer(self.model)
        except RuntimeError as exc:
            raise EngineFailure(_load_failure(folder, self.provider, exc)) from None
        # The template writes the special tokens itself; skipped ones (end of turn) add
        # no text to a reply, as llama.cpp renders them.
        self.tokenizer.update_options(add_special_tokens="false", skip_special_tokens="true")
        self._text_tokenizer: Any = None  # with the special tokens, for text_tokens
        self.folder = folder
        self.n_ctx = default_context(options.context_length, trained)
        self.vocabulary = onnx.shape(config)[1]
        self.eos_ids = _end_tokens(config, self.tokenizer)
        self.template = hf.chat_template(folder)
        self.bos_text = hf.special_token(folder, "bos_token")
        self.eos_text = hf.special_token(folder, "eos_token")
        self._generator: Any = None  # holds the KV cache between replies
        self._generator_kind: tuple[bool, bool] | None = None
        self._next_kind: tuple[bool, bool] | None = None
        self._pending = False  # a sampled token appended but not yet run through the model
        self._odd: dict[int, str] = {}  # the cache's rows computed apart (see _odd_rows)
        self._warm_up()
        self.load_seconds = time.perf_counter() - started

    def _warm_up(self) -> None:
        """One token through the model, forgotten: the first run sets ONNX Runtime's
        kernels and buffers up, which belongs to loading, not to the first reply."""
        generator = self._new_generator(GenerationOptions(temperature=0.0))
        generator.append_tokens([next(iter(self.eos_ids), 0)])

    # -- text <-> tokens -------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.n_ctx

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        text = chat_template.prompt_text(self.template, messages, self.bos_text,
                                         self.eos_text)
        return self.tokenizer.encode(text).tolist()

    def text_tokens(self, text: str) -> list[int]:
        # The tokenizer's own special tokens (a BOS where tokenizer.json adds one).
        if self._text_tokenizer is None:
            self._text_tokenizer = self.og.Tokenizer(self.model)
            self._text_tokenizer.update_options(add_special_tokens="true")
        return self._text_tokenizer.encode(text).tolist()

    # -- generation ------------------------------------------------------------------------

    def generate_from_tokens(self, tokens: list[int], options: GenerationOptions, *,
                             keep_cache: bool = False, exact: bool = True
                             ) -> Iterator[Event]:
        # onnxruntime-genai fixes a generator's sampling, and seeds its random numbers,
        # when it is made: only a greedy reply can go on in the generator (and KV cache)
        # a greedy reply left, so `_trim_cache` needs to know what this reply samples with.
        self._next_kind = _kind(options)
        yield from super().generate_from_tokens(tokens, options, keep_cache=keep_cache,
                                                exact=exact)

    def _new_generator(self, options: GenerationOptions) -> Any:
        og = self.og
        params = og.GeneratorParams(self.model)
        search: dict[str, Any] = {"max_length": self.n_ctx, "batch_size": 1}
        if options.temperature > 0:
            # top_k=0 keeps every token (as on the other engines); more than the
            # vocabulary is refused by onnxruntime-genai and means the same.
            top_k = options.top_k if options.top_k < (self.vocabulary or 1 << 31) else 0
            search |= {"do_sample": True, "temperature": options.temperature,
                       "top_k": top_k, "top_p": options.top_p,
                       "random_seed": (options.seed or 0) % SEED_RANGE}
        else:
            search["do_sample"] = False
        if options.ignore_eos:
            # Below min_length onnxruntime-genai never picks an end token; past one it
            # would pad the sequence with the pad token instead of sampling.
            search["min_length"] = self.n_ctx
        params.set_search_options(**search)
        try:
            return og.Generator(self.model, params)
        except RuntimeError as exc:
            raise EngineFailure(f"onnxruntime-genai could not start generating: "
                                f"{first_line(exc)}") from None

    def _trim_cache(self, keep: int) -> int:
        generator = self._generator
        if (keep and generator is not None and self._next_kind is not None
                and self._next_kind == self._generator_kind and keep <= self._cache_length()):
            generator.rewind_to(keep)
            self._odd = {p: kind for p, kind in self._odd.items() if p < keep}
            return keep
        self._generator = self._generator_kind = None  # the next reply makes its own
        self._odd = {}
        return 0

    def _cache_length(self) -> int:
        return int(self._generator.token_count()) if self._generator is not None else 0

    def _exact_keep(self, keep: int, total: int) -> int:
        if self.backend != "CPU":
            return 0  # measured on the CPU only (see ROW_BLOCK)
        whole = _odd_rows(0, total)
        for kept in range(keep, 0, -1):
            rows = {p: kind for p, kind in self._odd.items() if p < kept}
            if rows | _odd_rows(kept, total) == whole:
                return kept
        return 0

    def _output_tokenizer(self) -> Any:
        from llmctl.engines.constraint import hf_tokenizer

        # llguidance reads Hugging Face tokenizers; the folder has one's files.
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise EngineUnavailable("constrained output", f"transformers cannot be imported "
                                    f"({exc})", "pip install 'llmctl[onnx]'") from None
        return hf_tokenizer(AutoTokenizer.from_pretrained(self.folder))

    def _vocabulary_size(self) -> int:
        return self.vocabulary

    def _steps(self, tokens: list[int], options: GenerationOptions, budget: int,
               matcher: Matcher | None = None) -> Generator[int, None, None]:
        if self._generator is None:
            self._generator = self._new_generator(options)
            self._generator_kind = _kind(options)
        return self._stream(self._generator, tokens, matcher)

    def _stream(self, generator: Any, tokens: list[int], matcher: Matcher | None
                ) -> Generator[int, None, None]:
        start = int(generator.token_count())
        try:
            generator.append_tokens(tokens)
            self._odd |= _odd_rows(start, start + len(tokens))
            while True:
                if matcher is not None:
                    # Runs the model on the token before (when one is pending), then
                    # leaves the sampler only the tokens the grammar allows.
                    logits = generator.get_logits()
                    matcher.mask(logits.reshape(-1))
                    generator.set_logits(logits)
                generator.generate_next_token()
                self._pending = True
                token = int(generator.get_next_tokens()[0])
                if matcher is not None:
                    matcher.consume(token)
                yield token
        except GeneratorExit:  # the loop has what it wanted
            raise
        except RuntimeError as exc:
            self._generator = self._generator_kind = None
            raise EngineFailure(f"onnxruntime-genai failed: {first_line(exc)}") from None
        except BaseException:  # Ctrl-C inside a step: the generator's state is unknown
            self._generator = self._generator_kind = None
            raise
        finally:
            if self._pending and self._generator is not None:
                # The last token sampled was never run through the model: the cache ends
                # before it.
                generator.rewind_to(int(generator.token_count()) - 1)
            self._pending = False

    def _detokenizer(self) -> StreamDetokenizer:
        return StreamDetokenizer(self.tokenizer.create_stream())

    def _is_end(self, token: int) -> bool:
        return token in self.eos_ids

    def close(self) -> None:
        self._generator = None
        self.tokenizer = self._text_tokenizer = None
        self.model = None


def _kind(options: GenerationOptions) -> tuple[bool, bool] | None:
    """What a generator made for `options` can serve again: (greedy, ignore_eos) for a
    greedy reply; None for a sampled one, which needs a generator seeded for it."""
    return (True, options.ignore_eos) if options.temperature <= 0 else None


class StreamDetokenizer:
    """onnxruntime-genai's tokenizer stream as the loop's Detokenizer: it gives "" while a
    character's bytes are incomplete, and keeps nothing back to flush."""

    def __init__(self, stream: Any):
        self._decode = stream.decode

    def add(self, token: int) -> str:
        return self._decode(token)

    def flush(self) -> str:
        return ""



def _load_failure(folder: Path, wanted: str, exc: BaseException) -> str:
    """One line for a model onnxruntime-genai would not open, with the next step."""
    said = first_line(exc)
    if wanted != "cpu":
        return (f"onnxruntime-genai could not open {folder.name} for {wanted} ({said}); "
                f"this build may lack that execution provider: convert for this machine "
                f"with llmctl convert MODEL --to onnx")
    return f"onnxruntime-genai could not open {folder}: {said}"


def build_backend() -> str:
    """Where onnxruntime-genai can compute here (`show`): a GPU provider its build has,
    else the CPU. A model runs where its build was made for (its genai_config.json)."""
    og = _library()
    for name, check in (("CUDA", "is_cuda_available"), ("DirectML", "is_dml_available")):
        if getattr(og, check, lambda: False)():
            return name
    return "CPU"


def load(path: Path, options: LoadOptions) -> OnnxEngine:
    folder = onnx.genai_folder(path) if path.is_dir() else None
    if folder is None:
        raise EngineFailure(f"{path} has no genai_config.json (or several builds); the onnx "
                            "engine opens ONNX Runtime GenAI folders: make one with llmctl "
                            "convert MODEL --to onnx")
    config = onnx.read_genai_config(folder)
    if not config:
        raise UsageError(f"{folder / onnx.CONFIG} is not a readable genai config",
                         hint="convert the model again: llmctl convert MODEL --to onnx "
                         "--force")
    return OnnxEngine(folder, options, config)
