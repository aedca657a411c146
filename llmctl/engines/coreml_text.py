"""Core ML language models: the folders `llmctl convert MODEL --to coreml` makes from a text
model (Model.mlpackage, or Model.mlmodelc where it was compiled on macOS, beside the
tokenizer files, config.json and conversion.json), on Core ML through coremltools. macOS
only: Core ML's predictions need Apple's frameworks (the registry says so elsewhere).

The model's interface, which llmctl.convert.coreml_lm writes and this module reads (the
names are those of Apple's stateful Llama and Mistral examples, which swift-transformers
reads too):

    inputIds    (1, N) int32            the tokens to process, N from 1 to the context
    causalMask  (1, 1, N, P + N) fp16   P: the positions the cache holds before them; 0
                                        where a token may attend, MASKED where not
    logits      (1, N, vocabulary) fp16 the next token's scores after each of the N
    keyCache, valueCache                Core ML state, (layers, 1, kv_heads, context,
                                        head_dim) fp16: the KV cache

The model finds where the N tokens go from the mask's shape: positions P to P + N - 1 of
the cache are written, positions 0 to P + N - 1 read. So the state keeps what earlier
predictions wrote, and keeping a prefix of it for the next reply is only a matter of the
next mask being shorter (`_trim_cache` moves the position back); what lies beyond is
never read.

The token stream: the prompt in chunks of at most PREFILL_CHUNK tokens (one prediction
each), then one prediction per sampled token. Sampling is llmctl's
(`llmctl.engines.sampling`) on the logits of the last row. The prompt is the model's
chat template rendered by `llmctl.engines.chat_template` and tokenized by the
`tokenizers` library from tokenizer.json: no transformers (and no torch) at run time.

Untested where llmctl is tested (Linux): the predictions themselves. The helpers the
stream is made of (masks, chunks, prompt tokens, end tokens, finding the model and its
context) are module-level functions, tested on Linux; the stream itself is tested with a
stand-in for MLModel that computes the same interface in PyTorch.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from llmctl.engines import chat_template
from llmctl.engines.chat_template import IncrementalDetokenizer
from llmctl.engines.sampling import Sampler
from llmctl.engines.text import GenerationOptions, LoadOptions, Message, TokenEngine
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError, first_line
from llmctl.formats import hf
from llmctl.formats.coreml import COMPUTE_UNITS, KEY_CACHE, context_of, read_report

if TYPE_CHECKING:
    from llmctl.engines.constraint import Matcher

INSTALL = "pip install 'llmctl[coreml]'"
# The interface (see the module's docstring).
INPUT_IDS = "inputIds"
CAUSAL_MASK = "causalMask"
LOGITS = "logits"
VALUE_CACHE = "valueCache"
# What the mask adds where a token may not attend. Finite, and far inside float16's range
# (65504): a score plus it stays finite, and its exp is 0 in float16 and float32 alike, so
# no row of the softmax meets inf - inf.
MASKED = -1e4
# The files of a converted folder.
PACKAGE = "Model.mlpackage"
COMPILED = "Model.mlmodelc"
# Prompt tokens per prediction. Each prediction returns logits for all of its tokens
# (N x vocabulary float16: 256 x 128k = 64 MB for Llama 3's vocabulary), and the mask
# grows with N too; 256 keeps both small and the prompt in few predictions.
PREFILL_CHUNK = 256
# The compute units when --compute-unit is not given: Apple runs its stateful language
# models on CPU_AND_GPU (the Neural Engine takes no flexible shapes like these).
DEFAULT_UNIT = "cpu_and_gpu"


class StatefulModel(Protocol):
    """A Core ML model as the engine uses it: coremltools' MLModel (or CompiledMLModel),
    or a stand-in."""

    def make_state(self) -> Any: ...

    def predict(self, data: dict[str, Any], state: Any = None) -> dict[str, Any]: ...


# -- the pure helpers the stream is made of ------------------------------------------------

def causal_mask(past: int, count: int) -> np.ndarray:
    """The causalMask for `count` tokens after `past` cached ones: (1, 1, count,
    past + count) float16, row r letting token past + r attend to positions 0..past + r."""
    rows = np.arange(count)[:, None] + past
    columns = np.arange(past + count)[None, :]
    mask = np.where(columns <= rows, 0.0, MASKED).astype(np.float16)
    return mask.reshape(1, 1, count, past + count)


def input_ids(tokens: Sequence[int]) -> np.ndarray:
    """The inputIds for `tokens`: (1, N) int32."""
    return np.asarray(tokens, dtype=np.int32).reshape(1, -1)


def prediction_inputs(tokens: Sequence[int], past: int) -> dict[str, np.ndarray]:
    """One prediction's inputs: `tokens` after `past` cached positions."""
    return {INPUT_IDS: input_ids(tokens), CAUSAL_MASK: causal_mask(past, len(tokens))}


def chunks(tokens: Sequence[int], size: int = PREFILL_CHUNK) -> list[list[int]]:
    """The prompt in predictions of at most `size` tokens, in order."""
    return [list(tokens[i:i + size]) for i in range(0, len(tokens), size)]


def model_file(folder: Path) -> Path | None:
    """The folder's model: Model.mlmodelc (compiled: Core ML loads it without compiling
    again), else Model.mlpackage, else its one .mlmodelc or .mlpackage; None when there
    is none or several."""
    for name in (COMPILED, PACKAGE):
        if (folder / name).is_dir():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in (".mlmodelc", ".mlpackage"))
    return found[0] if len(found) == 1 else None


def state_context(spec: Any) -> int:
    """The context a model's spec says its keyCache holds (0: no such state)."""
    for state in getattr(spec.description, "state", []):
        if state.name == KEY_CACHE:
            shape = list(state.type.stateType.arrayType.shape)
            return int(shape[3]) if len(shape) == 5 else 0
    return 0


def end_tokens(folder: Path, tokenizer: Any = None) -> set[int]:
    """The ids that end a reply: config.json's and generation_config.json's eos_token_id
    (one id or a list), and the tokenizer's eos_token where tokenizer_config.json names
    one."""
    found: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        value = hf.read_config(folder, name).get("eos_token_id")
        found.update(v for v in (value if isinstance(value, list) else [value])
                     if isinstance(v, int) and not isinstance(v, bool))
    if tokenizer is not None and (text := hf.special_token(folder, "eos_token")):
        token = tokenizer.token_to_id(text)
        if token is not None:
            found.add(int(token))
    return found


def encode_prompt(tokenizer: Any, template: str | None, messages: Sequence[Message],
                  bos_text: str = "", eos_text: str = "") -> list[int]:
    """The conversation as token ids: the chat template writes the special tokens itself,
    so the tokenizer adds none."""
    text = chat_template.prompt_text(template, messages, bos_text, eos_text)
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def last_row(logits: Any) -> np.ndarray:
    """The next token's scores from a prediction's logits (1, N, vocabulary), float32."""
    array = np.asarray(logits)
    return array.reshape(-1, array.shape[-1])[-1].astype(np.float32)


# -- the engine ------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _library() -> Any:
    try:
        import coremltools as ct
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise EngineUnavailable("coreml", f"coremltools cannot be imported ({exc})",
                                INSTALL) from None
    return SimpleNamespace(ct=ct, Tokenizer=Tokenizer)


def compute_unit(options: LoadOptions) -> str:
    """The compute units (llmctl's spelling) `options` ask for."""
    return options.compute_unit or DEFAULT_UNIT


def open_model(path: Path, unit: str) -> StatefulModel:
    """The Core ML model at `path` through coremltools, on the compute units `unit`."""
    ct = _library().ct
    units = getattr(ct.ComputeUnit, COMPUTE_UNITS[unit])
    try:
        if path.suffix == ".mlmodelc":
            return ct.models.CompiledMLModel(str(path), compute_units=units)
        return ct.models.MLModel(str(path), compute_units=units)
    except Exception as exc:  # coremltools raises bare Exceptions for what Core ML refuses
        raise EngineFailure(f"Core ML could not load {path.name}: {first_line(exc)}; "
                            "stateful models need macOS 15 or later") from None


class CoremlTextEngine(TokenEngine):
    name = "coreml"

    def __init__(self, folder: Path, options: LoadOptions, model: StatefulModel | None = None,
                 tokenizer: Any = None):
        """`model` and `tokenizer` default to the folder's own (through coremltools and
        tokenizers); tests hand in stand-ins."""
        started = time.perf_counter()
        self.folder = folder
        self.report = read_report(folder)
        path = model_file(folder)
        if path is None:
            raise UsageError(f"{folder} holds no Core ML model (Model.mlpackage)",
                             hint="make one with: llmctl convert MODEL --to coreml")
        trained = context_of(self.report)
        if model is None:
            model = open_model(path, compute_unit(options))
            if not trained and hasattr(model, "get_spec"):
                trained = state_context(model.get_spec())
        if not trained:
            raise EngineFailure(f"{folder} does not say how long its KV cache is (no "
                                "keyCache state); convert the model again: llmctl convert "
                                "MODEL --to coreml --force")
        wanted = options.context_length
        if wanted and wanted > trained:
            raise UsageError(f"--ctx {wanted} is more than the {trained} tokens this model's "
                             "KV cache holds", hint=f"use --ctx {trained} or less, or "
                             "convert again with a larger --ctx")
        options, _ = options.validate(trained)
        # The cache is as long as the conversion made it; --ctx may only use less of it.
        self.n_ctx = options.context_length or trained
        self.model = model
        self.backend = f"Core ML ({COMPUTE_UNITS[compute_unit(options)]})"
        if tokenizer is None:
            if not (folder / "tokenizer.json").is_file():
                raise EngineFailure(f"{folder} has no tokenizer.json beside its model; "
                                    "convert the model again: llmctl convert MODEL --to "
                                    "coreml --force")
            tokenizer = _library().Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer = tokenizer
        config = hf.read_config(folder)
        self.vocabulary = hf.vocabulary(config)
        self.eos_ids = end_tokens(folder, tokenizer)
        self.template = hf.chat_template(folder)
        self.bos_text = hf.special_token(folder, "bos_token")
        self.eos_text = hf.special_token(folder, "eos_token")
        self.state = model.make_state()
        self._position = 0  # positions of the state written by earlier predictions
        self._warm_up()
        self.load_seconds = time.perf_counter() - started

    def _warm_up(self) -> None:
        """One token through the model, forgotten (the next prediction writes over it):
        Core ML prepares its kernels on the first prediction, which belongs to loading,
        not to the first reply."""
        self._predict([next(iter(self.eos_ids), 0)], 0)

    def _predict(self, tokens: list[int], past: int) -> np.ndarray:
        try:
            out = self.model.predict(prediction_inputs(tokens, past), state=self.state)
        except Exception as exc:  # coremltools passes Core ML's errors on as Exceptions
            raise EngineFailure(f"Core ML failed: {first_line(exc)}") from None
        return last_row(out[LOGITS])

    # -- text <-> tokens -------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.n_ctx

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        return encode_prompt(self.tokenizer, self.template, messages, self.bos_text,
                             self.eos_text)

    def text_tokens(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    # -- generation ------------------------------------------------------------------------

    def _trim_cache(self, keep: int) -> int:
        self._position = min(keep, self._position)
        return self._position

    def _cache_length(self) -> int:
        return self._position

    def _exact_keep(self, keep: int, total: int) -> int:
        # Whether Core ML computes a position alike however the prompt was split into
        # predictions is not measured (it needs macOS): keep nothing where the reply must
        # be the one the whole prompt gives (chat, --prompt-cache); `bench -d` keeps all.
        return 0

    def _output_tokenizer(self) -> Any:
        from llmctl.engines.constraint import hf_tokenizer

        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise EngineUnavailable("constrained output", f"transformers cannot be imported "
                                    f"({exc})", "pip install transformers") from None
        return hf_tokenizer(AutoTokenizer.from_pretrained(self.folder))

    def _vocabulary_size(self) -> int:
        return self.vocabulary

    def _steps(self, tokens: list[int], options: GenerationOptions, budget: int,
               matcher: Matcher | None = None) -> Generator[int, None, None]:
        return self._stream(tokens, Sampler(options), matcher)

    def _stream(self, tokens: list[int], sample: Sampler, matcher: Matcher | None
                ) -> Generator[int, None, None]:
        row = None
        for piece in chunks(tokens):
            row = self._predict(piece, self._position)
            self._position += len(piece)
        assert row is not None  # the loop always leaves the last prompt token to process
        while True:
            if matcher is not None:
                matcher.mask(row)
            token = sample(row)
            if matcher is not None:
                matcher.consume(token)
            yield token
            # The loop asked for another: this one goes through the model first.
            row = self._predict([token], self._position)
            self._position += 1

    def _detokenizer(self) -> IncrementalDetokenizer:
        tokenizer = self.tokenizer
        return IncrementalDetokenizer(
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False))

    def _is_end(self, token: int) -> bool:
        return token in self.eos_ids

    def close(self) -> None:
        self.state = None
        self.model = None



def build_backend() -> str:
    """Where Core ML computes language models (`show`)."""
    return "Core ML (CPU_AND_GPU, or as --compute-unit says)"


def load(path: Path, options: LoadOptions) -> CoremlTextEngine:
    folder = path if path.is_dir() else path.parent
    if folder.suffix in (".mlpackage", ".mlmodelc"):  # the model itself, given by path
        folder = folder.parent
    return CoremlTextEngine(folder, options)
