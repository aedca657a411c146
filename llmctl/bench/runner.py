"""Running benchmarks: the tests of each model on each engine, as `Result` rows.

Text models get llama-bench's tests, on the shared generation loop every command uses (so
what is measured is what `run` and `chat` do, sampling included: greedy, the cheapest):

    pp<N>      prompt processing: N tokens in one request, timed to the first token
    tg<N>      generation: N tokens after a one-token prompt, timed from the first token
    pg<N>,<M>  both in one request: (N + M) tokens over the whole request
    ttft<N>    the pp request's time to its first token, in ms
    -d D       each test after D tokens already in the context (the KV cache of the
               previous request keeps them: `generate_from_tokens(keep_cache=True)`)
    load       opening the model (cold: its files evicted from the page cache first)
    <prompt>   a shipped prompt (`llmctl/data/bench_prompts.toml`) through the chat
               template: time to first token and generation tokens/s

The tokens of pp, tg and depth are real text (the shipped long prompt, repeated), so that
engines with the same tokenizer process the same tokens. Image models get seconds per
denoising step and per image; speech models their real-time factor on an audio file
(--audio, else a shipped 37-second clip of read speech), on the transcription loop
`transcribe` uses. Nothing here prints: progress goes to `on_progress`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmctl import host, loader
from llmctl.bench.results import Machine, Result, Run, Unit, mean_stddev, value
from llmctl.bench.settings import DEFAULT_STEPS, Settings, TextTest, prompt_set, speech_clip
from llmctl.engines import audio, registry
from llmctl.engines.image import ImageEngine, ImageLoadOptions, ImageRequest, Rendered
from llmctl.engines.speech import (
    Audio,
    SpeechEngine,
    SpeechLoadOptions,
    SpeechRequest,
    SpeechStats,
    Transcribed,
    transcribe,
)
from llmctl.engines.text import (
    Done,
    GenerationOptions,
    LoadOptions,
    Message,
    Stats,
    TextEngine,
)
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError
from llmctl.formats.diffusers import default_size
from llmctl.loader import OnNote, Opened, no_notes
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout
from llmctl.store.lookup import relatives
from llmctl.store.names import parse_reference
from llmctl.store.register import OnEvent, no_events
from llmctl.store.resolve import Runnable, runnable

IMAGE_PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"


@dataclass(frozen=True)
class Progress:
    """A test's samples so far, for the progress line."""

    model: str
    engine: str
    threads: int | None
    test: str
    done: int
    total: int
    mean: float
    unit: Unit
    finished: bool = False


OnProgress = Callable[[Progress], None]


def no_progress(_progress: Progress) -> None:
    pass


@dataclass(frozen=True)
class Candidate:
    """A model to measure, as the user named it or as a relative in another format."""

    reference: str
    engine: str | None = None  # None: the engine its format runs on


@dataclass
class Context:
    """What every test of one run shares."""

    layout: StoreLayout
    catalog: Catalog
    settings: Settings
    force: bool = False
    on_event: OnEvent = no_events
    on_note: OnNote = no_notes
    on_progress: OnProgress = no_progress
    results: list[Result] = field(default_factory=list)


# -- text models -----------------------------------------------------------------------------

def bench_text(candidate: Candidate, run: Context) -> list[Result]:
    """Every test of `run.settings` on one text model and engine, once per thread count."""
    settings = run.settings
    rows: list[Result] = []
    for threads in _thread_counts(candidate, run):
        options = LoadOptions(settings.ctx, threads)

        def open_model(options: LoadOptions = options) -> Opened[TextEngine]:
            return _open_text(candidate, run, options)

        opened = open_model()  # imports the engine's library: not timed
        loads: list[Result] = []
        try:
            _check_context(opened, settings)
            if settings.load:  # one model in memory at a time
                opened.engine.close()
                loads = _load_rows(_text_row(opened), opened.model, run, open_model)
                opened = open_model()  # the one the tests run on
            engine, base = opened.engine, _text_row(opened)
            tests = settings.tests()
            filler = _filler(engine, max((t.depth + t.n_prompt for t in tests), default=1))
            for test in tests:
                rows += _text_test(engine, base, test, filler, run)
            for name in settings.prompt_set:
                rows += _prompt_test(engine, base, name, run)
            rows += loads
        finally:
            opened.engine.close()
    return rows


def _thread_counts(candidate: Candidate, run: Context) -> tuple[int | None, ...]:
    """--threads applies to engines that count threads (llama.cpp); others run once."""
    counts = run.settings.threads
    if len(counts) > 1 or counts[0] is not None:
        target = _target(candidate, run)
        if target.format != "gguf":
            run.on_note(loader.Note(f"{candidate.reference}: --threads does not apply to the "
                                    f"{target.engine} engine (it sizes its own work)"))
            return (None,)
    return counts


def _target(candidate: Candidate, run: Context) -> Runnable:
    return runnable(parse_reference(candidate.reference), run.layout, run.catalog,
                    on_event=run.on_event)


def _open_text(candidate: Candidate, run: Context, options: LoadOptions
               ) -> Opened[TextEngine]:
    return loader.open_text(parse_reference(candidate.reference), run.layout, run.catalog,
                            engine=candidate.engine, options=options, force=run.force,
                            on_event=run.on_event, on_note=run.on_note)


def _check_context(opened: Opened[TextEngine], settings: Settings) -> None:
    context = opened.engine.context_length
    for test in settings.tests():
        if test.context_needed > context:
            depth = f" @ d{test.depth}" if test.depth else ""
            raise UsageError(
                f"{test.name}{depth} needs {test.context_needed} tokens of context but "
                f"{opened.model.name} is opened with {context}",
                hint="raise --ctx (up to the model's trained context) or lower -d, -p or -n")


def _text_row(opened: Opened[TextEngine]) -> Result:
    """The columns every row of this model and engine shares."""
    engine, model = opened.engine, opened.model
    return Result(
        model=model.name, model_digest=model.manifest.digest if model.manifest else "",
        model_format=model.format, model_size=_model_size(model),
        model_params=engine.parameters, engine=opened.spec.name, backend=engine.backend,
        threads=engine.threads, ctx=engine.context_length, test="", kind="pp", unit="t/s")


def _model_size(model: Runnable) -> int:
    if model.manifest is not None:
        return model.manifest.size
    return sum(path.stat().st_size for path in _files(model.path))


def _filler(engine: TextEngine, count: int) -> list[int]:
    """`count` tokens of real text: the shipped long prompt's, repeated."""
    pool = engine.prompt_tokens([Message("user", prompt_set()["long"])])
    return (pool * (count // len(pool) + 1))[:count]


GREEDY = GenerationOptions(temperature=0.0, seed=0, ignore_eos=True)


def _text_test(engine: TextEngine, base: Result, test: TextTest, filler: list[int],
               run: Context) -> list[Result]:
    settings = run.settings
    depth = filler[:test.depth]
    if test.kind == "tg":
        tokens = [*depth, filler[test.depth % len(filler)]]
    else:
        tokens = depth + filler[test.depth:test.depth + test.n_prompt]
    options = replace(GREEDY, max_tokens=1 + test.n_gen)
    row = replace(base, test=test.name, kind=test.kind, n_prompt=test.n_prompt,
                  n_gen=test.n_gen, depth=test.depth)
    ttft = replace(row, test=f"ttft{test.n_prompt}", kind="ttft", unit="ms")

    def once() -> Stats:
        if depth:  # back to a context of exactly the depth's tokens
            _generate(engine, depth, replace(GREEDY, max_tokens=1), keep_cache=True)
        stats = _generate(engine, tokens, options, keep_cache=bool(depth))
        if stats.cached_tokens != len(depth):
            raise EngineFailure(f"the {engine.name} engine could not keep {len(depth)} "
                                "tokens in its cache; -d needs an engine that can")
        if stats.generated_tokens != 1 + test.n_gen:
            raise EngineFailure(f"{engine.name} generated {stats.generated_tokens} tokens "
                                f"where {1 + test.n_gen} were asked for")
        return stats

    samples: list[tuple[int, float]] = []  # (ns, value)
    ttft_samples: list[tuple[int, float]] = []
    for stats in _repeat(once, row, run):
        if test.kind == "pp":
            seconds, count = stats.prompt_seconds, test.n_prompt
            ttft_samples.append((_ns(seconds), value("ms", 0, seconds)))
        elif test.kind == "tg":
            seconds, count = stats.generate_seconds, test.n_gen
        else:
            seconds, count = stats.prompt_seconds + stats.generate_seconds, (
                test.n_prompt + test.n_gen)
        samples.append((_ns(seconds), value("t/s", count, seconds)))
        _report(row, samples, settings, run)
    rows = [_with_samples(row, samples)]
    if ttft_samples:
        rows.append(_with_samples(ttft, ttft_samples))
    return rows


def _prompt_test(engine: TextEngine, base: Result, name: str, run: Context) -> list[Result]:
    """One shipped prompt through the chat template: ms to the first token, then tokens/s
    over the reply of `prompt_gen` tokens."""
    tokens = engine.prompt_tokens([Message("user", prompt_set()[name])])
    n_gen = run.settings.prompt_gen
    row = replace(base, test=name, kind="prompt-tg", n_prompt=len(tokens), n_gen=n_gen)
    ttft = replace(row, kind="prompt-ttft", unit="ms")
    options = replace(GREEDY, max_tokens=1 + n_gen)
    samples: list[tuple[int, float]] = []
    ttft_samples: list[tuple[int, float]] = []
    for stats in _repeat(lambda: _generate(engine, tokens, options), row, run):
        ttft_samples.append((_ns(stats.prompt_seconds), value("ms", 0, stats.prompt_seconds)))
        samples.append((_ns(stats.generate_seconds),
                        value("t/s", stats.generated_tokens - 1, stats.generate_seconds)))
        _report(row, samples, run.settings, run)
    return [_with_samples(ttft, ttft_samples), _with_samples(row, samples)]


def _generate(engine: TextEngine, tokens: list[int], options: GenerationOptions,
              keep_cache: bool = False) -> Stats:
    # The whole depth is kept: a test after a context of D tokens, not an exact reply.
    for event in engine.generate_from_tokens(tokens, options, keep_cache=keep_cache,
                                             exact=False):
        if isinstance(event, Done):
            return event.stats
    raise EngineFailure(f"the {engine.name} engine ended a reply without its statistics")


def _repeat(once: Callable[[], Any], row: Result, run: Context) -> Iterator[Any]:
    """The warm-up run (not kept), then -r measured runs."""
    if run.settings.warmup:
        once()
    _report(row, [], run.settings, run)
    for _ in range(run.settings.repetitions):
        yield once()


def _report(row: Result, samples: list[tuple[int, float]], settings: Settings,
            run: Context) -> None:
    mean = mean_stddev([v for _, v in samples])[0]
    run.on_progress(Progress(row.model, row.engine, row.threads, row.label, len(samples),
                             settings.repetitions, mean, row.unit,
                             finished=len(samples) == settings.repetitions))


def _with_samples(row: Result, samples: list[tuple[int, float]]) -> Result:
    return replace(row, samples_ns=[ns for ns, _ in samples],
                   samples=[round(v, 6) for _, v in samples],
                   peak_memory_bytes=host.peak_memory_bytes())


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


# -- loading ---------------------------------------------------------------------------------

def _load_rows(base: Result, model: Runnable, run: Context,
               open_model: Callable[[], Opened[Any]]) -> list[Result]:
    """-r cold loads (each after evicting the model's files from the page cache), then -r
    warm ones; wall time of the whole open, as a user waits for it. Where the OS lets
    nothing be evicted, only the warm row is made, and a note says why."""
    rows = []
    load = replace(base, test="load", kind="load", unit="s", n_prompt=0, n_gen=0)
    caches = ["warm"]
    if evict(_files(model.path)):
        caches.insert(0, "cold")
    else:
        run.on_note(loader.Note("this OS does not let llmctl drop the model from the page "
                                "cache: only warm load times are measured"))
    for cache in caches:
        row = replace(load, cache=cache)
        samples: list[tuple[int, float]] = []
        _report(row, samples, run.settings, run)
        for _ in range(run.settings.repetitions):
            if cache == "cold":
                evict(_files(model.path))
            started = time.perf_counter()
            opened = open_model()
            seconds = time.perf_counter() - started
            opened.engine.close()
            samples.append((_ns(seconds), seconds))
            _report(row, samples, run.settings, run)
        rows.append(_with_samples(row, samples))
    return rows


def _files(path: Path) -> list[Path]:
    """The files a model is made of, through the store's links to its blobs."""
    if path.is_file():
        return [path.resolve()]
    return sorted({p.resolve() for p in path.rglob("*") if p.is_file()})


def evict(files: list[Path]) -> bool:
    """Drop `files` from the page cache (posix_fadvise DONTNEED: Linux and the BSDs; no
    privileges needed for pages that are not dirty). False where the OS has no way."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return False
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            return False
        finally:
            os.close(fd)
    return True


# -- image models ----------------------------------------------------------------------------

def bench_image(candidate: Candidate, run: Context) -> list[Result]:
    """Seconds per denoising step and per image, and the load rows, on one image model."""
    settings = run.settings

    def open_model() -> Opened[ImageEngine]:
        return _open_image(candidate, run)

    opened = open_model()  # imports torch or Core ML: not timed
    loads: list[Result] = []
    try:
        if settings.load:
            opened.engine.close()
            loads = _load_rows(_image_row(opened), opened.model, run, open_model)
            opened = open_model()
        engine, base = opened.engine, _image_row(opened)
        width, height = _image_size(opened, settings)
        steps = settings.steps or DEFAULT_STEPS
        request = ImageRequest(prompt=IMAGE_PROMPT, seed=0, steps=steps,
                               guidance=float(opened.defaults.get("guidance", 7.5)),
                               width=width, height=height)
        step = replace(base, test="step", kind="step", unit="s", steps=steps,
                       width=width, height=height)
        image = replace(step, test="image", kind="image")
        step_samples: list[tuple[int, float]] = []
        image_samples: list[tuple[int, float]] = []
        for done in _repeat(lambda: _render(engine, request), image, run):
            step_samples.append((_ns(done.step_seconds), done.step_seconds))
            image_samples.append((_ns(done.seconds), done.seconds))
            _report(image, image_samples, settings, run)
        return [_with_samples(step, step_samples), _with_samples(image, image_samples), *loads]
    finally:
        opened.engine.close()


def _image_size(opened: Opened[ImageEngine], settings: Settings) -> tuple[int, int]:
    """--size, else the catalog's default size, else the model's own."""
    own = default_size(opened.model.path) or (512, 512)
    defaults = opened.defaults
    return (settings.width or defaults.get("width") or own[0],
            settings.height or defaults.get("height") or own[1])


def _open_image(candidate: Candidate, run: Context) -> Opened[ImageEngine]:
    settings = run.settings
    return loader.open_image(parse_reference(candidate.reference), run.layout, run.catalog,
                             engine=candidate.engine, options=ImageLoadOptions(),
                             width=settings.width, height=settings.height, force=run.force,
                             on_event=run.on_event, on_note=run.on_note)


def _render(engine: ImageEngine, request: ImageRequest) -> Rendered:
    events = engine.generate(request)
    try:
        for event in events:
            if isinstance(event, Rendered):
                return event
    finally:
        events.close()
    raise EngineFailure(f"the {engine.name} engine ended without an image")


def _image_row(opened: Opened[ImageEngine]) -> Result:
    model, engine = opened.model, opened.engine
    device = getattr(engine, "device", "cpu")
    backend = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}.get(device, device)
    return Result(
        model=model.name, model_digest=model.manifest.digest if model.manifest else "",
        model_format=model.format, model_size=_model_size(model), model_params=None,
        engine=opened.spec.name, backend=backend, threads=None, ctx=None, test="",
        kind="step", unit="s")


# -- speech models ---------------------------------------------------------------------------

def bench_speech(candidate: Candidate, run: Context) -> list[Result]:
    """The real-time factor of transcribing the audio (--audio, else the shipped clip), and
    the load rows, on one speech model."""
    settings = run.settings
    name = settings.audio or speech_clip()
    seconds = audio.probe(name) or 0.0

    def open_model() -> Opened[SpeechEngine]:
        return loader.open_speech(parse_reference(candidate.reference), run.layout,
                                  run.catalog, audio_seconds=seconds, engine=candidate.engine,
                                  options=SpeechLoadOptions(), force=run.force,
                                  on_event=run.on_event, on_note=run.on_note)

    opened = open_model()  # imports the engine's library: not timed
    loads: list[Result] = []
    try:
        if settings.load:
            opened.engine.close()
            loads = _load_rows(_speech_row(opened), opened.model, run, open_model)
            opened = open_model()
        decoded = audio.decode(name)
        request = SpeechRequest(language="en" if settings.audio is None else None)
        row = replace(_speech_row(opened), test=f"rtf {decoded.seconds:.0f}s", kind="rtf",
                      unit="rtf")
        samples: list[tuple[int, float]] = []
        for stats in _repeat(lambda: _transcribed(opened.engine, decoded, request), row, run):
            samples.append((_ns(stats.processing_seconds), stats.real_time_factor))
            _report(row, samples, settings, run)
        return [_with_samples(row, samples), *loads]
    finally:
        opened.engine.close()


def _transcribed(engine: SpeechEngine, decoded: Audio, request: SpeechRequest
                 ) -> SpeechStats:
    for event in transcribe(engine, decoded, request):
        if isinstance(event, Transcribed):
            return event.stats
    raise EngineFailure(f"the {engine.name} engine ended without its statistics")


def _speech_row(opened: Opened[SpeechEngine]) -> Result:
    model, engine = opened.model, opened.engine
    return Result(
        model=model.name, model_digest=model.manifest.digest if model.manifest else "",
        model_format=model.format, model_size=_model_size(model), model_params=None,
        engine=opened.spec.name, backend=engine.device.upper(), threads=None, ctx=None,
        test="", kind="rtf", unit="rtf")


# -- a run ---------------------------------------------------------------------------------

def bench(models: list[str], run: Context, engines: tuple[str, ...] = (),
          argv: list[str] | None = None) -> Run:
    """Every model in `models` (and, with `engines`, its relatives in the formats those
    engines run) through the tests `run.settings` asks for."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    for candidate in candidates(models, engines, run):
        kind = _target(candidate, run).kind
        _check_kind(candidate, kind, run.settings)
        bench_kind = {"text": bench_text, "image": bench_image, "speech": bench_speech}[kind]
        run.results += bench_kind(candidate, run)
    return Run(machine(), run.results, started, argv or [])


def _check_kind(candidate: Candidate, kind: str, settings: Settings) -> None:
    if settings.audio is not None and kind != "speech":
        article = "an" if kind == "image" else "a"
        raise UsageError(f"--audio is for speech models; {candidate.reference} is {article} "
                         f"{kind} model", hint="leave it out, or bench a Whisper model")
    if kind == "speech" and (settings.text_options or settings.steps is not None
                             or settings.width is not None):
        raise UsageError(f"{candidate.reference} is a speech model: it is measured on "
                         "--audio and -r only", hint="leave out the text and image options")
    image_options = settings.steps is not None or settings.width is not None
    if kind == "text" and image_options:
        raise UsageError(f"--steps and --size are for image models; {candidate.reference} "
                         "is a text model", hint="leave them out, or bench an image model")
    if kind == "image" and settings.text_options:
        raise UsageError(f"{', '.join(settings.text_options)} are for text models; "
                         f"{candidate.reference} is an image model",
                         hint="use --steps, --size and -r for image models")


def candidates(models: list[str], engines: tuple[str, ...], run: Context) -> list[Candidate]:
    """What to measure: each model as named; with `engines` ("all": every engine that runs
    here), each model and its stored relatives (`store.lookup.relatives`) on every listed
    engine that runs their format. A listed engine with nothing to run says so."""
    if not engines:
        return [Candidate(model) for model in models]
    chosen: list[Candidate] = []
    for model in models:
        target = _target(Candidate(model), run)
        family = [(model, target.format)]
        if target.manifest is not None:
            family += [(m.reference, m.format) for m in relatives(run.layout, target.manifest)]
        names = engines
        if "all" in engines:
            names = tuple(name for name, spec in registry.ENGINES.items()
                          if target.kind in spec.kinds and _available(spec))
        for name in names:
            spec = registry.get_spec(name)
            runs = [Candidate(ref, name) for ref, fmt in family if fmt in spec.formats]
            if not runs:
                make = (f"; make one with: llmctl convert {model} --to {spec.convert_to}"
                        if spec.convert_to else "")
                run.on_note(loader.Note(f"no stored model of {model}'s family runs on the "
                                        f"{name} engine{make}"))
            chosen += [c for c in runs if c not in chosen]
    if not chosen:
        raise UsageError(f"no model to measure on {', '.join(engines)}",
                         hint="see the notes above, or leave --engine out")
    return chosen


def _available(spec: Any) -> bool:
    try:
        registry.check_available(spec)
    except EngineUnavailable:
        return False
    return True


# -- the machine -----------------------------------------------------------------------------

LIBRARIES = ("llama-cpp-python", "mlx", "mlx-lm", "torch", "diffusers", "coremltools",
             "transformers", "onnxruntime-genai", "faster-whisper", "ctranslate2",
             "mlx-whisper", "pywhispercpp")


def machine() -> Machine:
    """The machine and the library versions, read without importing an engine."""
    import importlib.metadata
    import platform
    import sys

    from llmctl import __version__

    libraries = {}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            libraries[name] = importlib.metadata.version(name)
    if "llama_cpp" in sys.modules:  # the build's CPU features, once llama.cpp is loaded
        with contextlib.suppress(Exception):
            info = sys.modules["llama_cpp"].llama_cpp.llama_print_system_info()
            libraries["llama.cpp"] = info.decode("utf-8", "replace").strip()
    return Machine(cpu=_cpu_name(), cores=host.cpu_limit(),
                   ram_bytes=host.physical_memory_bytes() or 0,
                   os=platform.platform(terse=True), gpu=_gpu_name(), libraries=libraries,
                   llmctl_version=__version__, python_version=platform.python_version())


def _cpu_name() -> str:
    import platform
    import subprocess
    import sys

    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
    return platform.processor() or platform.machine()


def _gpu_name() -> str:
    import platform
    import sys

    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "Apple Silicon GPU (Metal)"
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        with contextlib.suppress(OSError):
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
    return ", ".join(names)
