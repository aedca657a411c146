"""The speech engine contract, and the one transcription loop every speech engine feeds.

    transcribe, chat's /listen, bench  ->  transcribe(engine, audio, request)
        yields Detected(language) first, one Segment per decoded segment as the engine
        decodes it, then Transcribed(SpeechStats)

An engine writes only what is its own: opening the model and `SpeechEngine.transcribe`,
which takes 16 kHz mono float32 samples (`llmctl.engines.audio` decodes every input the
same way for all engines) and yields the detected language, then the segments. The loop
here adds the timing and the statistics (audio seconds, processing seconds, real-time
factor), so that every engine reports them alike.

Import-light (no numpy, no engine library): `transcribe --help` and the option checks use it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from llmctl.errors import UsageError
from llmctl.host import peak_memory_bytes

SAMPLE_RATE = 16_000  # what every Whisper model takes
TASKS = ("transcribe", "translate")
# The language codes Whisper knows (large-v3's 100; earlier models know the first 99).
LANGUAGES = tuple((  # noqa: SIM905 (a list literal of 100 codes reads worse)
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da "
    "hu ta no th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy "
    "ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht "
    "ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split())
MAX_BEAM = 64


@dataclass(frozen=True)
class Audio:
    """Audio as every engine takes it (`llmctl.engines.audio.decode` makes it)."""

    name: str  # the path as given, or "-" for stdin
    samples: Any  # 1-D float32 numpy array at SAMPLE_RATE
    seconds: float


@dataclass(frozen=True)
class SpeechLoadOptions:
    device: str | None = None  # "cpu" | "cuda" (faster-whisper); None: the engine's best
    compute_type: str | None = None  # CTranslate2's: int8, float16, ...; None: by device
    threads: int | None = None  # CPU threads; None: the engine's default


@dataclass(frozen=True)
class SpeechRequest:
    language: str | None = None  # a LANGUAGES code; None: detect it
    task: str = "transcribe"  # or "translate": into English
    initial_prompt: str | None = None  # words to expect (names, spelling, style)
    vad: bool = False  # skip silence (voice activity detection) before decoding
    # None: Whisper's fallback (0.0, then 0.2 ... 1.0 for a window that decodes badly).
    temperature: float | None = None
    beam_size: int = 5
    word_timestamps: bool = False


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass(frozen=True)
class Segment:
    """A stretch of speech, in seconds from the start of the audio."""

    start: float
    end: float
    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    words: tuple[Word, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.words:
            del data["words"]
        return data


@dataclass(frozen=True)
class Detected:
    """The language the audio is transcribed in: the one asked for, or the one detected
    (`probability` None when it was given)."""

    language: str
    probability: float | None = None
    only: bool = False  # an English-only model: nothing was detected, it knows no other


@dataclass(frozen=True)
class SpeechStats:
    audio_seconds: float
    processing_seconds: float  # from the first sample handed to the engine to the last segment
    language: str
    language_probability: float | None
    segments: int
    engine: str
    device: str
    load_seconds: float = 0.0  # filled in by the caller that loaded the model
    peak_memory_bytes: int = 0  # the process's largest resident set, at the end

    @property
    def real_time_factor(self) -> float:
        """Seconds of processing per second of audio: below 1, faster than real time."""
        return self.processing_seconds / self.audio_seconds if self.audio_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "real_time_factor": round(self.real_time_factor, 4)}


@dataclass(frozen=True)
class Transcribed:
    stats: SpeechStats
    segments: tuple[Segment, ...] = field(default=(), repr=False)


class SpeechEngine(Protocol):
    name: str
    device: str

    def transcribe(self, samples: Any, request: SpeechRequest) -> Iterator[Detected | Segment]:
        """Yield the language (given or detected), then each segment as it is decoded.
        `samples`: a 1-D float32 numpy array at SAMPLE_RATE. Closing the generator stops
        the decoding at the next segment (a KeyboardInterrupt does the same)."""
        ...

    def close(self) -> None: ...


def transcribe(engine: SpeechEngine, audio: Audio, request: SpeechRequest
               ) -> Iterator[Detected | Segment | Transcribed]:
    """The one transcription loop: the engine's events as they come, then the stats (and
    every segment again, for writers that need them all: srt numbering, json)."""
    started = time.perf_counter()
    detected = Detected(request.language or "")
    segments: list[Segment] = []
    events = engine.transcribe(audio.samples, request)
    try:
        for event in events:
            if isinstance(event, Detected):
                detected = event
            else:
                segments.append(event)
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    seconds = time.perf_counter() - started
    yield Transcribed(SpeechStats(audio.seconds, seconds, detected.language,
                                  detected.probability, len(segments), engine.name,
                                  engine.device, peak_memory_bytes=peak_memory_bytes()),
                      tuple(segments))


class SpeechClock:
    """How far a transcription is and the time left, from the end of the last segment:
    audio seconds done out of the total, and the processing speed so far."""

    def __init__(self, total: float, now: float):
        self.total = total
        self.started = now

    def progress(self, done: float, now: float) -> tuple[float, float]:
        """(elapsed seconds, seconds left)."""
        elapsed = now - self.started
        done = min(max(done, 0.0), self.total)
        left = elapsed * (self.total - done) / done if done > 0 else 0.0
        return elapsed, left


def check_request(request: SpeechRequest) -> None:
    """What can be refused before any audio is read or any model loads (exit 2)."""
    if request.language is not None and request.language not in LANGUAGES:
        close = [code for code in LANGUAGES if code.startswith(request.language[:1])]
        raise UsageError(f"unknown language code '{request.language}'",
                         hint="use a Whisper language code such as en, fr, de"
                              + (f" (starting with {request.language[:1]}: "
                                 f"{', '.join(close[:8])})" if close else "")
                              + ", or leave out --language to detect it")
    if request.task not in TASKS:
        raise UsageError(f"unknown task '{request.task}'",
                         hint=f"choose one of: {', '.join(TASKS)}")
    if request.temperature is not None and not 0.0 <= request.temperature <= 1.0:
        raise UsageError(f"--temperature {request.temperature} is outside 0..1",
                         hint="Whisper samples at 0 (greedy or beam search) up to 1")
    if not 1 <= request.beam_size <= MAX_BEAM:
        raise UsageError(f"--beam-size {request.beam_size} is outside 1..{MAX_BEAM}",
                         hint="1 decodes greedily; 5 is Whisper's usual beam")


def english_only(request: SpeechRequest) -> None:
    """Refuse what an English-only model (the `.en` ones) cannot do: another language, or
    translating (its output is English already); UsageError, exit 2."""
    hint = "use a multilingual model, e.g. whisper:base"
    if request.language not in (None, "en"):
        raise UsageError(f"this model knows English only, not '{request.language}'", hint=hint)
    if request.task == "translate":
        raise UsageError("this model knows English only: it cannot translate", hint=hint)
