"""ExecuTorch: the programs `llmctl convert --to executorch` makes (model.pte beside the
tokenizer files), on ExecuTorch's Python runtime: XNNPACK's kernels on the CPU where the
program was lowered to them, its portable kernels otherwise.

The program is transformers' decoder with a static KV cache of the program's context
length, exported for one token at a time: `forward(input_ids [1, 1], cache_position [1])`
gives that position's logits and writes its keys and values into the cache the program
holds. The prompt goes through it token by token, then each sampled token; the shared
loop (`llmctl.engines.text`) turns that into the contract, with the same events and
statistics as every text engine. Sampling is llmctl's (`llmctl.engines.sampling`) on the
logits the program returns; constrained output masks them first.

The cache's attention mask comes from the cache position (positions after it are
masked), so keeping a prefix of the cache for the next reply is only a matter of where
the next token goes: `_trim_cache` moves the position back. Every token is computed alone,
the same way whatever came before it was split into, so what is kept is exact.

The prompt is the model's chat template rendered by `llmctl.engines.chat_template` and
tokenized by the `tokenizers` library from tokenizer.json: no transformers (and no
transformers import time) at run time.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from llmctl.engines import chat_template
from llmctl.engines.chat_template import IncrementalDetokenizer
from llmctl.engines.sampling import Sampler
from llmctl.engines.text import GenerationOptions, LoadOptions, Message, TokenEngine
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError, first_line
from llmctl.formats import hf, pte
from llmctl.host import default_threads, quiet_stderr, sample_cpu

if TYPE_CHECKING:
    from llmctl.engines.constraint import Matcher

INSTALL = "pip install 'llmctl[executorch]'"


@lru_cache(maxsize=1)
def _library() -> Any:
    with quiet_stderr():
        return _import()


def _import() -> Any:
    try:
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise EngineUnavailable("executorch", f"executorch cannot be imported ({exc})",
                                INSTALL) from None
    return SimpleNamespace(torch=torch, runtime=Runtime.get(), portable=portable_lib,
                           Tokenizer=Tokenizer)


def _constant(program: Any, name: str, default: Any) -> Any:
    """One of the program's constant methods (the values ExecuTorch's runner reads)."""
    if name not in program.method_names:
        return default
    values = program.load_method(name).execute([])
    return list(values) if name == "get_eos_ids" else values[0]


class ExecutorchEngine(TokenEngine):
    name = "executorch"

    def __init__(self, folder: Path, program_path: Path, options: LoadOptions):
        started = time.perf_counter()
        self.lib = _library()
        with quiet_stderr():  # the thread pool's start and XNNPACK's set-up log on stderr
            self._load(folder, program_path, options)
        self.load_seconds = time.perf_counter() - started

    def _load(self, folder: Path, program_path: Path, options: LoadOptions) -> None:
        lib = self.lib
        config = hf.read_config(folder)
        try:
            self.program = lib.runtime.load_program(program_path)
        except (RuntimeError, ValueError) as exc:
            raise EngineFailure(f"ExecuTorch could not load {program_path}: "
                                f"{first_line(exc)}; convert the model again: llmctl "
                                "convert MODEL --to executorch --force") from None
        if "forward" not in self.program.method_names:
            raise EngineFailure(f"{program_path} has no forward method; it is not a "
                                "language model program llmctl made")
        program_context = (int(_constant(self.program, "get_max_seq_len", 0))
                           or pte.cache_context(folder))
        wanted = options.context_length
        if wanted and program_context and wanted > program_context:
            raise UsageError(f"--ctx {wanted} is more than the {program_context} tokens this "
                             "program's KV cache holds", hint=f"use --ctx {program_context} "
                             "or less, or convert again with a larger --ctx")
        options, _ = options.validate(program_context or None)
        # The cache is as long as the program made it; --ctx may only use less of it.
        self.n_ctx = options.context_length or program_context
        since = sample_cpu() if options.threads is None else None
        self.threads = options.threads or default_threads(since)[0]
        # XNNPACK's work runs on ExecuTorch's one thread pool, shared by every program.
        lib.portable._unsafe_reset_threadpool(self.threads)
        self.forward = self.program.load_method("forward")
        self.vocabulary = int(_constant(self.program, "get_vocab_size", 0)) or hf.vocabulary(
            config)
        self.eos_ids = {int(i) for i in _constant(self.program, "get_eos_ids", [])}
        self.eos_ids |= _generation_eos(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise EngineFailure(f"{folder} has no tokenizer.json beside its program; convert "
                                "the model again: llmctl convert MODEL --to executorch")
        self.tokenizer = lib.Tokenizer.from_file(str(tokenizer_file))
        self.template = hf.chat_template(folder)
        self.bos_text = hf.special_token(folder, "bos_token")
        self.eos_text = hf.special_token(folder, "eos_token")
        self.folder = folder
        self.record = pte.read_record(folder)
        self.backend = "CPU (XNNPACK)" if self.record.get("backend", "xnnpack") == "xnnpack" \
            else "CPU (portable)"
        self._position = 0  # tokens the cache holds
        self._warm_up()

    def _warm_up(self) -> None:
        """One token through the program, forgotten: XNNPACK sets its kernels up on the
        first call, which belongs to loading, not to the first reply."""
        self._run(next(iter(self.eos_ids), 0), 0)

    def _run(self, token: int, position: int) -> Any:
        torch = self.lib.torch
        try:
            out = self.forward.execute([torch.tensor([[token]], dtype=torch.long),
                                        torch.tensor([position], dtype=torch.long)])
        except RuntimeError as exc:
            raise EngineFailure(f"ExecuTorch failed: {first_line(exc)}") from None
        return out[0]

    # -- text <-> tokens -------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.n_ctx

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        text = chat_template.prompt_text(self.template, messages, self.bos_text,
                                         self.eos_text)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def text_tokens(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    # -- generation ------------------------------------------------------------------------

    def _trim_cache(self, keep: int) -> int:
        self._position = min(keep, self._position)
        return self._position

    def _cache_length(self) -> int:
        return self._position

    def _output_tokenizer(self) -> Any:
        from llmctl.engines.constraint import hf_tokenizer

        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise EngineUnavailable("constrained output", f"transformers cannot be imported "
                                    f"({exc})", INSTALL) from None
        return hf_tokenizer(AutoTokenizer.from_pretrained(self.folder))

    def _vocabulary_size(self) -> int:
        return self.vocabulary

    def _steps(self, tokens: list[int], options: GenerationOptions, budget: int,
               matcher: Matcher | None = None) -> Generator[int, None, None]:
        return self._stream(tokens, Sampler(options), matcher)

    def _stream(self, tokens: list[int], sample: Sampler, matcher: Matcher | None
                ) -> Generator[int, None, None]:
        logits = None
        for token in tokens:
            logits = self._run(token, self._position)
            self._position += 1
        while True:
            row = logits[0, -1].float().numpy()
            if matcher is not None:
                matcher.mask(row)
            token = sample(row)
            if matcher is not None:
                matcher.consume(token)
            yield token
            # The loop asked for another: this one goes through the program first.
            logits = self._run(token, self._position)
            self._position += 1

    def _detokenizer(self) -> IncrementalDetokenizer:
        tokenizer = self.tokenizer
        return IncrementalDetokenizer(
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False))

    def _is_end(self, token: int) -> bool:
        return token in self.eos_ids

    def close(self) -> None:
        self.forward = None
        self.program = None


def _generation_eos(folder: Path) -> set[int]:
    """generation_config.json's eos_token_id (one id or a list): the end of a turn."""
    value = hf.read_config(folder, "generation_config.json").get("eos_token_id")
    return {v for v in (value if isinstance(value, list) else [value])
            if isinstance(v, int) and not isinstance(v, bool)}



def build_backend() -> str:
    """Where ExecuTorch computes here (`show`)."""
    return "CPU (XNNPACK)"


def load(path: Path, options: LoadOptions) -> ExecutorchEngine:
    folder = path if path.is_dir() else path.parent
    program = pte.program(folder)
    if program is None:
        raise UsageError(f"{folder} holds no ExecuTorch program (model.pte)",
                         hint="make one with: llmctl convert MODEL --to executorch")
    return ExecutorchEngine(folder, program, options)
