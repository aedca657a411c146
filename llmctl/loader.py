"""Opening a model: what every command that runs one does before its first token.

    reference -> the model's files (stored, pulled first, or a path: store.resolve)
              -> the right kind (a text command refuses an image model, and back)
              -> the engine (its format, or --engine: engines.registry)
              -> the options' bounds, the memory check (engines.memory)
              -> the loaded engine

`open_text` serves run and chat (and every later command that runs a text model);
`open_image` serves imagine; `open_speech` serves transcribe and chat's /listen. Each takes a
parsed reference, report pulling through `on_event` and notes through `on_note` as they
arise (before the load, which can take a while), and return an `Opened`: the model, its
engine spec, the loaded engine, the memory check and the catalog's default parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from llmctl.engines import registry
from llmctl.engines.image import ImageEngine, ImageLoadOptions
from llmctl.engines.memory import (
    MemoryCheck,
    check_fits,
    estimate_image_memory,
    estimate_speech_memory,
    estimate_text_memory,
    model_shape,
)
from llmctl.engines.registry import EngineSpec
from llmctl.engines.speech import SpeechEngine, SpeechLoadOptions
from llmctl.engines.text import LoadOptions, TextEngine
from llmctl.errors import UsageError
from llmctl.formats.diffusers import default_size
from llmctl.host import default_torch_device
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout
from llmctl.store.names import Reference
from llmctl.store.register import OnEvent, no_events
from llmctl.store.resolve import Runnable, runnable
from llmctl.units import format_bytes

if TYPE_CHECKING:
    from llmctl.engines.prompt_cache import CacheIdentity

E = TypeVar("E")


@dataclass(frozen=True)
class Note:
    """Something the user should know about how the model was opened."""

    text: str
    severity: Literal["note", "warning"] = "note"


OnNote = Callable[[Note], None]


def no_notes(_note: Note) -> None:
    pass


@dataclass(frozen=True)
class Opened(Generic[E]):
    model: Runnable
    spec: EngineSpec
    engine: E
    memory: MemoryCheck
    # The catalog entry's default parameters (imagine's steps, guidance, size), if any.
    defaults: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0  # open_speech times the load (transcribe --verbose)
    sequences: int = 1  # a text engine's sequences decoded together (batch --parallel)


# Engines whose contexts hold several sequences (engines.parallel); the most `batch`
# picks by itself: llama.cpp's batched decoding of SmolLM2 on 2 cores gained little
# past 8 (TESTDATA.md: 314 tokens/s at 8, 377 at 16).
PARALLEL_ENGINES = frozenset({"llama", "mlx"})
MOST_SEQUENCES = 8


def open_text(ref: Reference, layout: StoreLayout, catalog: Catalog, *,
              engine: str | None = None, options: LoadOptions | None = None,
              force: bool = False, on_event: OnEvent = no_events,
              on_note: OnNote = no_notes) -> Opened[TextEngine]:
    """Find the text model `ref` names (pulling a catalog model first), check its options
    and that it fits in memory (InsufficientResources unless `force`), and load it."""
    target = runnable(ref, layout, catalog, on_event=on_event)
    if target.kind != "text":
        raise UsageError(f"{target.name} is {_a(target.kind)} model",
                         hint=f"use llmctl {COMMANDS[target.kind]}")
    spec = registry.choose(target.format, target.kind, engine)
    # Bounds first: a --ctx past the model's trained context is a usage error, not a
    # memory estimate of terabytes.
    options, notes = (options or LoadOptions()).validate(model_shape(target).trained_context)
    if options.gpu_layers is not None and spec.name != "llama":
        notes.append(f"--gpu-layers applies to the llama engine; {spec.name} places the "
                     "whole model on its own device")
    torch_only = [name for name, value in (("--device", options.device),
                                           ("--dtype", options.dtype),
                                           ("--trust-pickle", options.trust_pickle)) if value]
    if torch_only and spec.name != "transformers":
        notes.append(f"{', '.join(torch_only)} applies to the transformers engine, not to "
                     f"{spec.name}")
    if options.compute_unit is not None and spec.name != "coreml":
        notes.append(f"--compute-unit applies to Core ML models, not to {spec.name}")
    if spec.name not in PARALLEL_ENGINES and options.sequences != 1:
        if options.sequences > 1:
            notes.append(f"the {spec.name} engine decodes one sequence at a time; "
                         f"--parallel {options.sequences} runs them one after another")
        options = replace(options, sequences=1)
    for note in notes:
        on_note(Note(note))

    def estimate(sequences: int, force: bool = force) -> MemoryCheck:
        return check_fits(estimate_text_memory(target, options.context_length,
                                               upcast=_upcasts(spec, options),
                                               sequences=sequences), force)

    if options.sequences == 0:  # as many as fit, up to MOST_SEQUENCES
        most = options.most_sequences or MOST_SEQUENCES
        fitting = (n for n in range(min(most, MOST_SEQUENCES), 1, -1)
                   if estimate(n, force=True).fits)
        options = replace(options, sequences=next(fitting, 1))
    check = estimate(options.sequences)
    _warn_if_forced(target, check, on_note)
    return Opened(target, spec, registry.load_text_engine(spec, target.path, options), check,
                  sequences=options.sequences)


def open_image(ref: Reference, layout: StoreLayout, catalog: Catalog, *,
               engine: str | None = None, options: ImageLoadOptions | None = None,
               width: int | None = None, height: int | None = None, force: bool = False,
               on_event: OnEvent = no_events, on_note: OnNote = no_notes
               ) -> Opened[ImageEngine]:
    """Find the image model `ref` names (pulling a catalog model first), check that its
    engine runs here and that a `width` x `height` image fits in memory, and load it."""
    target = runnable(ref, layout, catalog, on_event=on_event)
    if target.kind != "image":
        raise UsageError(f"{target.name} is {_a(target.kind)} model",
                         hint=f"try: llmctl {COMMANDS[target.kind]} {ref}")
    spec = registry.choose(target.format, target.kind, engine)
    registry.check_available(spec)
    options = options or ImageLoadOptions()
    defaults: dict[str, Any] = {}
    if target.manifest is not None:
        match = catalog.find(target.manifest.name, target.manifest.tag)
        defaults = dict(match.entry.parameters) if match else {}
    size = default_size(target.path) or (512, 512)
    # float16 weights count twice where diffusers computes in float32 (on a CPU).
    upcast = spec.name == "diffusers" and (options.device or default_torch_device()) == "cpu"
    check = check_fits(estimate_image_memory(
        target.path, width or defaults.get("width", size[0]),
        height or defaults.get("height", size[1]), upcast), force)
    _warn_if_forced(target, check, on_note)
    return Opened(target, spec, registry.load_image_engine(spec, target.path, options), check,
                  defaults)


def open_speech(ref: Reference, layout: StoreLayout, catalog: Catalog, *,
                audio_seconds: float, engine: str | None = None,
                options: SpeechLoadOptions | None = None, force: bool = False,
                on_event: OnEvent = no_events, on_note: OnNote = no_notes
                ) -> Opened[SpeechEngine]:
    """Find the speech model `ref` names (pulling a catalog model first), check that its
    engine runs here and that `audio_seconds` of audio fit in memory with it, and load it.
    The load's time is `Opened.load_seconds`."""
    target = runnable(ref, layout, catalog, on_event=on_event)
    if target.kind != "speech":
        raise UsageError(f"{target.name} is {_a(target.kind)} model, not a speech model",
                         hint=f"try: llmctl {COMMANDS[target.kind]} {ref}, or transcribe "
                              "with a Whisper model: llmctl pull whisper")
    spec = registry.choose(target.format, target.kind, engine)
    registry.check_available(spec)
    check = check_fits(estimate_speech_memory(target.path, audio_seconds), force)
    _warn_if_forced(target, check, on_note)
    started = time.perf_counter()
    loaded = registry.load_speech_engine(spec, target.path, options or SpeechLoadOptions())
    return Opened(target, spec, loaded, check, load_seconds=time.perf_counter() - started)


# What runs each kind of model, for the refusals above.
COMMANDS = {"text": "run", "image": "imagine", "speech": "transcribe"}


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _upcasts(spec: EngineSpec, options: LoadOptions) -> bool:
    """Whether half-precision weights take twice their size once loaded: MLX upcasts them
    on a CPU, transformers computes in float32 there unless --dtype says otherwise."""
    if spec.name == "mlx":
        return registry.backend(spec) == "CPU"
    if spec.name == "transformers":
        device = options.device or default_torch_device()
        return device == "cpu" and options.dtype in (None, "float32", "fp32")
    return False


def _warn_if_forced(target: Runnable, check: MemoryCheck, on_note: OnNote) -> None:
    """A model that does not fit is loaded only with --force (check_fits refused it
    otherwise): say so before the load."""
    if not check.fits:
        on_note(Note(f"{target.name} may not fit in memory (need about "
                     f"{format_bytes(check.estimate.total)}, have "
                     f"{format_bytes(check.allowed or 0)}); loading anyway (--force)",
                     "warning"))


# -- prompt caches on disk (run --prompt-cache, chat's conversation caches) ---------------


@dataclass(frozen=True)
class CacheUse:
    """What a prompt cache file did for a reply: `--json`'s "prompt_cache"."""

    file: Path
    loaded_tokens: int = 0
    load_seconds: float = 0.0
    saved: bool = False
    tokens: tuple[int, ...] = field(default=(), repr=False)  # the ones loaded

    def to_dict(self) -> dict[str, Any]:
        return {"file": str(self.file), "loaded_tokens": self.loaded_tokens,
                "load_seconds": round(self.load_seconds, 4), "saved": self.saved}


def cache_identity(opened: Opened[TextEngine]) -> CacheIdentity:
    """What a cache for this model and engine must have been made by: the stored model's
    digest; for a model run by path, the path with its files' sizes and times."""
    from llmctl.engines.prompt_cache import CacheIdentity

    model = opened.model
    if model.manifest is not None:
        key = model.manifest.digest
    else:
        path = model.path.resolve()
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        key = "path:" + str(path) + "".join(
            f":{f.name}:{st.st_size}:{st.st_mtime_ns}" for f in files
            if f.is_file() and (st := f.stat()))
    return CacheIdentity(key, opened.spec.name, opened.engine.context_length)


def restore_cache(opened: Opened[TextEngine], path: Path, on_note: OnNote = no_notes
                  ) -> CacheUse:
    """Load the prompt cache at `path` into the engine, for the next reply to start from.
    A missing file is simply no cache yet; one made by something else, or damaged, is
    noted and left alone."""
    from llmctl.engines.prompt_cache import CacheRefused

    if not opened.engine.saves_cache:
        raise UsageError(f"the {opened.spec.name} engine cannot save its KV cache to a file",
                         hint="leave out --prompt-cache, or use the llama or mlx engine")
    if not path.exists():
        return CacheUse(path)
    started = time.perf_counter()
    try:
        count = opened.engine.load_cache(path, cache_identity(opened))
    except CacheRefused as exc:
        on_note(Note(str(exc)))
        return CacheUse(path)
    seconds = time.perf_counter() - started
    return CacheUse(path, count, seconds, tokens=tuple(opened.engine.cached_prefix()))


def save_cache(opened: Opened[TextEngine], path: Path, use: CacheUse | None = None,
               on_note: OnNote = no_notes) -> CacheUse:
    """Save the engine's cached prompt to `path` (atomically). A cache that cannot be
    written (a full disk, a read-only folder) is a warning: the reply is done already."""
    use = use or CacheUse(path)
    if use.tokens and use.tokens == tuple(opened.engine.cached_prefix()):
        return use  # the file holds these tokens already
    try:
        opened.engine.save_cache(path, cache_identity(opened))
    except OSError as exc:
        on_note(Note(f"prompt cache {path} not saved: {exc.strerror or exc}", "warning"))
        return use
    return replace(use, saved=True)
