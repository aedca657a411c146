"""Hugging Face causal-LM checkpoints on PyTorch through transformers: CUDA, Apple's MPS
or the CPU.

The token stream is the model's own forward pass over a `DynamicCache`, one call for the
prompt and one per generated token, with transformers' logits warpers for top-k, top-p,
min-p and temperature: what `generate` does per step, without the per-step bookkeeping of
its general loop (stopping criteria lists, streamers, output dictionaries), so the shared
loop (`llmctl.engines.text`) gives the same events and statistics as every text engine.
The prompt is formatted with the tokenizer's own chat template.

Sampling happens on the CPU with a seeded `torch.Generator`, whatever the device: the same
seed gives the same reply on every device that computes the same logits.

Pickled weights (pytorch_model.bin) are loaded only with `trust_pickle`: unpickling can
run any code the file holds.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Generator
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from llmctl.engines.chat_template import IncrementalDetokenizer, hf_prompt_tokens
from llmctl.engines.text import (
    DTYPES,
    GenerationOptions,
    LoadOptions,
    Message,
    TokenEngine,
    default_context,
)
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError
from llmctl.formats import hf
from llmctl.host import default_threads, peak_memory_bytes, quiet_stderr, sample_cpu

if TYPE_CHECKING:
    from llmctl.engines.constraint import Matcher

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@lru_cache(maxsize=1)
def _library() -> Any:
    try:
        import torch
        import transformers
        from transformers import DynamicCache
        from transformers.generation import logits_process
    except ImportError as exc:
        raise EngineUnavailable(
            "transformers", f"torch or transformers cannot be imported ({exc})",
            "pip install 'llmctl[torch]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # llmctl reports loading itself
    return SimpleNamespace(torch=torch, transformers=transformers, DynamicCache=DynamicCache,
                           warpers=logits_process)


def pick_device(torch: Any, requested: str | None) -> str:
    """`requested` when this torch build has it, else UsageError; None: cuda, then mps,
    then cpu."""
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested is None:
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested.startswith("cuda") and not cuda:
        raise UsageError(f"--device {requested}: this PyTorch ({torch.__version__}) sees no "
                         "CUDA device", hint="use --device cpu, or install a CUDA build of "
                         "torch")
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device {requested}: there are {torch.cuda.device_count()} CUDA "
                         "devices", hint="use cuda:0 up to the last one")
    if requested == "mps" and not mps:
        raise UsageError("--device mps: Apple's Metal (MPS) is not available here",
                         hint="use --device cpu")
    return requested


def pick_dtype(torch: Any, device: str, requested: str | None) -> Any:
    """The precision to compute in: `requested`, else bfloat16 (or float16 where the GPU
    lacks it) on CUDA, float16 on MPS, float32 on a CPU (which computes half precision far
    slower, where it computes it at all)."""
    name = DTYPES.get(requested or "auto")
    if name is None:
        if device.startswith("cuda"):
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            name = "float16" if device == "mps" else "float32"
    return getattr(torch, name)


def check_weights(folder: Path, trust_pickle: bool) -> None:
    """Refuse a checkpoint whose weights are only Python pickles, unless trusted."""
    names = [p.name for p in folder.iterdir()]
    if trust_pickle or any(n.endswith(".safetensors") for n in names):
        return
    if pickled := sorted(n for n in names if n.endswith(PICKLE_SUFFIXES)):
        raise UsageError(
            f"{folder.name} keeps its weights as Python pickles ({', '.join(pickled[:3])}), "
            "which can run code when loaded",
            hint="load it only if you trust where it came from: add --trust-pickle")


class TransformersEngine(TokenEngine):
    name = "transformers"

    def __init__(self, path: Path, options: LoadOptions, config: dict[str, Any]):
        lib = self.lib = _library()
        torch = lib.torch
        started = time.perf_counter()
        check_weights(path, options.trust_pickle)
        trained = hf.trained_context(config)
        options, _ = options.validate(trained or None)
        self.device = pick_device(torch, options.device)
        self.dtype = pick_dtype(torch, self.device, options.dtype)
        self.backend = {"cuda": "CUDA", "mps": "MPS"}.get(self.device.split(":")[0], "CPU")
        if self.device == "cpu":
            since = sample_cpu() if options.threads is None else None
            self.threads = options.threads or default_threads(since)[0]
            torch.set_num_threads(self.threads)
        # transformers 4.56 renamed torch_dtype to dtype; both spellings load the same.
        version = int(lib.transformers.__version__.split(".")[0])
        precision = {"dtype" if version >= 5 else "torch_dtype": self.dtype}
        try:
            with quiet_stderr():  # transformers imports torchao, if installed, here
                self.model = lib.transformers.AutoModelForCausalLM.from_pretrained(
                    path, use_safetensors=None if options.trust_pickle else True,
                    low_cpu_mem_usage=True, **precision)
                self.tokenizer = lib.transformers.AutoTokenizer.from_pretrained(path)
        except (ValueError, OSError, KeyError) as exc:
            # transformers' words for an architecture it lacks (or one that needs the
            # repository's own code, which llmctl never runs) or a folder that is no model.
            raise EngineFailure(f"transformers could not load {path}: "
                                f"{str(exc).splitlines()[0]}") from None
        self.model.to(self.device).eval()
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.n_ctx = default_context(options.context_length, trained)
        self.vocabulary = hf.vocabulary(config) or len(self.tokenizer)
        self.eos_ids = _end_tokens(self.model, self.tokenizer)
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        # Newer models take logits_to_keep (older ones num_logits_to_keep): the prompt
        # pass then computes the last position's logits only, not a vocabulary-wide row
        # per prompt token.
        accepted = inspect.signature(self.model.forward).parameters
        self._keep_logits = next((k for k in ("logits_to_keep", "num_logits_to_keep")
                                  if k in accepted), None)
        # transformers 5.x renames past_key_values to cache (and warns about the old name).
        self._cache_argument = "cache" if "cache" in accepted else "past_key_values"
        self._cache: Any = None
        self._warm_up()
        self.load_seconds = time.perf_counter() - started

    def _warm_up(self) -> None:
        """One token through the model, forgotten: the first call sets up kernels (and on
        a GPU, allocates), which belongs to loading, not to the first reply's tokens/s."""
        torch = self.lib.torch
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([[next(iter(self.eos_ids), 0)]],
                                              device=self.device))

    # -- text <-> tokens -------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.n_ctx

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        return hf_prompt_tokens(self.tokenizer, messages, self.has_template)

    def text_tokens(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    # -- generation ------------------------------------------------------------------------

    def _trim_cache(self, keep: int) -> int:
        if keep and self._cache is not None and self._cache_length() >= keep:
            self._cache.crop(keep)
            return keep
        self._cache = self.lib.DynamicCache()
        return 0

    def _cache_length(self) -> int:
        return int(self._cache.get_seq_length()) if self._cache is not None else 0

    def _exact_keep(self, keep: int, total: int) -> int:
        # PyTorch's kernels block their work by the number of rows: a prompt processed in
        # two parts need not give the same logits, bit for bit, as processed whole, so an
        # exact reply re-processes the prompt.
        return 0

    def _output_tokenizer(self) -> Any:
        from llmctl.engines.constraint import hf_tokenizer

        return hf_tokenizer(self.tokenizer)

    def _vocabulary_size(self) -> int:
        return self.vocabulary

    def _warpers(self, options: GenerationOptions) -> list[Any]:
        """top-k, top-p, min-p, then temperature: llama.cpp's order, so a setting means
        the same on every engine."""
        w = self.lib.warpers
        chain = []
        if 0 < options.top_k < self.vocabulary:
            chain.append(w.TopKLogitsWarper(options.top_k))
        if options.top_p < 1.0:
            chain.append(w.TopPLogitsWarper(options.top_p))
        if options.min_p > 0.0:
            chain.append(w.MinPLogitsWarper(options.min_p))
        chain.append(w.TemperatureLogitsWarper(options.temperature))
        return chain

    def _steps(self, tokens: list[int], options: GenerationOptions, budget: int,
               matcher: Matcher | None = None) -> Generator[int, None, None]:
        torch = self.lib.torch
        generator = torch.Generator().manual_seed(options.seed)
        warpers = self._warpers(options) if options.temperature > 0 else []
        # `_trim_cache` has run before: the cache is there, holding the prefix kept.
        return self._stream(tokens, warpers, generator, matcher)

    def _stream(self, tokens: list[int], warpers: list[Any], generator: Any,
                matcher: Matcher | None) -> Generator[int, None, None]:
        torch, model, device = self.lib.torch, self.model, self.device
        cache = {self._cache_argument: self._cache}
        keep = {self._keep_logits: 1} if self._keep_logits else {}
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([tokens], device=device), use_cache=True,
                        **cache, **keep)
            while True:
                logits = out.logits[0, -1].float().cpu()
                if matcher is not None:
                    matcher.mask(logits.numpy())  # in place: the array shares its memory
                if warpers:
                    scores = logits[None]
                    for warper in warpers:
                        scores = warper(None, scores)
                    probs = torch.softmax(scores[0], dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(torch.argmax(logits))
                if matcher is not None:
                    matcher.consume(token)
                yield token
                out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True,
                            **cache)

    def _detokenizer(self) -> IncrementalDetokenizer:
        tokenizer = self.tokenizer
        return IncrementalDetokenizer(
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False))

    def _is_end(self, token: int) -> bool:
        return token in self.eos_ids

    def _peak_memory(self) -> int:
        torch = self.lib.torch
        gpu = torch.cuda.max_memory_allocated() if self.device.startswith("cuda") else 0
        return max(peak_memory_bytes(), int(gpu))

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        self.model = None
        self._cache = None
        torch = self.lib.torch
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _end_tokens(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end a reply: the generation config's (often several: end of turn and
    end of text) and the tokenizer's."""
    found: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None),
                  tokenizer.eos_token_id):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(v for v in value if isinstance(v, int))
    return found


def build_backend() -> str:
    """Where transformers computes here by default (`show`)."""
    torch = _library().torch
    return {"cuda": "CUDA", "mps": "MPS"}.get(pick_device(torch, None), "CPU")


def load(path: Path, options: LoadOptions) -> TransformersEngine:
    if not (path / "config.json").is_file():
        raise EngineFailure(f"{path} has no config.json; the transformers engine opens "
                            "Hugging Face model folders")
    return TransformersEngine(path, options, hf.read_config(path))
