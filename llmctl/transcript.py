"""Transcripts out: text, SubRip, WebVTT, JSON and TSV, streamed or written whole.

    transcribe -> read_sources(inputs)              every input checked (and stdin read)
                                                    before the model loads
               -> plan_outputs(inputs, -o, format)  one destination per input: stdout, a
                                                    file, or a file in a folder named after
                                                    the input
               -> writing(path)                     stdout, or a temporary file renamed
                                                    into place once the transcript is whole
               -> WRITERS[format](stream)           begin, one call per segment as it is
                                                    decoded, end with the stats
    transcribe_one(engine, source, ...)             all of it for one input
    chat /listen -> Listener.hear(path)             a speech model opened at first use, the
                                                    file's words as one message

Text, srt, vtt and tsv are written segment by segment, so a pipe gets the words while the
rest of the audio is still being decoded; json is one document per input, written at the
end (it holds the language and the statistics, known only then). An interrupted file
output leaves nothing behind: the temporary file is removed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from llmctl import loader
from llmctl.engines import audio
from llmctl.engines.speech import (
    Detected,
    Segment,
    SpeechClock,
    SpeechEngine,
    SpeechLoadOptions,
    SpeechRequest,
    Transcribed,
    transcribe,
)
from llmctl.errors import UsageError
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout
from llmctl.store.names import parse_reference
from llmctl.store.register import OnEvent, no_events

STDIN = audio.STDIN
EXTENSIONS = {"text": ".txt", "srt": ".srt", "vtt": ".vtt", "json": ".json", "tsv": ".tsv"}
FORMATS = tuple(EXTENSIONS)


def timestamp(seconds: float, decimal: str = ",") -> str:
    """HH:MM:SS,mmm (SubRip; WebVTT uses "." for the decimal mark)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


class Writer:
    """Writes one input's transcript to `stream`; each format overrides what it needs."""

    def __init__(self, stream: TextIO, source: str, model: str):
        self.stream = stream
        self.source = source
        self.model = model

    def begin(self) -> None:
        pass

    def segment(self, segment: Segment) -> None:
        pass

    def end(self, done: Transcribed) -> None:
        pass

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class TextWriter(Writer):
    """One line per segment: what a pipe into `llmctl run` wants."""

    def segment(self, segment: Segment) -> None:
        if text := segment.text.strip():
            self._write(text + "\n")


class SrtWriter(Writer):
    def begin(self) -> None:
        self.count = 0

    def segment(self, segment: Segment) -> None:
        self.count += 1
        self._write(f"{self.count}\n{timestamp(segment.start)} --> {timestamp(segment.end)}\n"
                    f"{segment.text.strip()}\n\n")


class VttWriter(Writer):
    def begin(self) -> None:
        self._write("WEBVTT\n\n")

    def segment(self, segment: Segment) -> None:
        self._write(f"{timestamp(segment.start, '.')} --> {timestamp(segment.end, '.')}\n"
                    f"{segment.text.strip()}\n\n")


class TsvWriter(Writer):
    """start and end in whole milliseconds, as Whisper's own tsv output has them."""

    def begin(self) -> None:
        self._write("start\tend\ttext\n")

    def segment(self, segment: Segment) -> None:
        text = " ".join(segment.text.split())  # no tabs or newlines inside a field
        self._write(f"{round(segment.start * 1000)}\t{round(segment.end * 1000)}\t{text}\n")


class JsonWriter(Writer):
    def end(self, done: Transcribed) -> None:
        self._write(json.dumps(document(self.source, self.model, done), indent=2,
                               ensure_ascii=False) + "\n")


def document(source: str, model: str, done: Transcribed) -> dict[str, Any]:
    """An input's transcript as one JSON object: `--format json`, and chat's /listen."""
    stats = done.stats
    return {"file": source, "model": model, "language": stats.language,
            "language_probability": stats.language_probability,
            "duration": round(stats.audio_seconds, 3),
            "text": "".join(s.text for s in done.segments).strip(),
            "segments": [s.to_dict() for s in done.segments], "stats": stats.to_dict()}


WRITERS: dict[str, type[Writer]] = {"text": TextWriter, "srt": SrtWriter, "vtt": VttWriter,
                                    "json": JsonWriter, "tsv": TsvWriter}


def plan_outputs(inputs: list[str], output: str | None, fmt: str) -> list[Path | None]:
    """Where each input's transcript goes: stdout (None) without -o; the file -o names for
    one input; for a folder (one that exists, or a name ending in /), a file per input in
    it named after the input (memo.m4a -> memo.srt; stdin -> stdin.srt)."""
    if output is None:
        return [None] * len(inputs)
    text, output = output, Path(output)
    folder = output.is_dir() or text.endswith(("/", os.sep))
    if not folder:
        if len(inputs) > 1:
            raise UsageError(f"-o {text} names one file, but {len(inputs)} inputs were given",
                             hint="give a folder for one transcript per input: -o "
                                  f"{output.with_suffix('').name or 'out'}/")
        if not output.parent.is_dir():
            raise UsageError(f"-o {text}: the folder {output.parent} does not exist",
                             hint="create it first, or end -o with / to have it created")
        return [output]
    names = [("stdin" if name == STDIN else Path(name).stem) + EXTENSIONS[fmt]
             for name in inputs]
    for name in set(names):
        if names.count(name) > 1:
            sources = [i for i, n in zip(inputs, names, strict=True) if n == name]
            raise UsageError(f"{' and '.join(sources)} would both be written to "
                             f"{Path(text) / name}",
                             hint="transcribe them in separate calls, or rename one")
    return [Path(text) / name for name in names]


@contextmanager
def writing(path: Path | None) -> Iterator[TextIO]:
    """stdout, or a temporary file beside `path` that becomes `path` only when the block
    ends normally; on any exception (Ctrl-C included) the temporary file is removed."""
    if path is None:
        yield sys.stdout
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as stream:
            yield stream
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@dataclass(frozen=True)
class Source:
    """An input, checked: its name as given, the bytes read from stdin for "-", and the
    length its container states (None when it states none)."""

    name: str
    data: bytes | None
    seconds: float | None

    @property
    def label(self) -> str:
        """How messages name it."""
        return "stdin" if self.name == STDIN else self.name


def read_sources(names: list[str]) -> list[Source]:
    """Every input checked before any model loads: a missing file, one that is not audio,
    stdin given twice or stdin that is a terminal are usage errors (exit 2)."""
    if names.count(STDIN) > 1:
        raise UsageError("- (stdin) is given more than once", hint="stdin holds one file")
    sources = []
    for name in names:
        data = None
        if name == STDIN:
            if sys.stdin is None or sys.stdin.isatty():
                raise UsageError("- reads audio from stdin, but stdin is a terminal",
                                 hint="pipe a file in: llmctl transcribe MODEL - < memo.m4a")
            data = sys.stdin.buffer.read()
        sources.append(Source(name, data, audio.probe(name, data)))
    return sources


OnLanguage = Callable[[str, Detected], None]
OnProgress = Callable[[str, float, float, float, float], None]


def transcribe_one(engine: SpeechEngine, source: Source, request: SpeechRequest,
                   path: Path | None, fmt: str, model: str, *, load_seconds: float = 0.0,
                   on_language: OnLanguage, on_progress: OnProgress) -> Transcribed:
    """Decode `source`, transcribe it and write the transcript in `fmt` to `path` (None:
    stdout) as the segments come; report the language when it is known and the progress
    (source, audio seconds done, total, elapsed, left) after each segment."""
    decoded = audio.decode(source.name, source.data)
    clock = SpeechClock(decoded.seconds, time.perf_counter())
    with writing(path) as stream:
        writer = WRITERS[fmt](stream, source.name, model)
        writer.begin()
        for event in transcribe(engine, decoded, request):
            if isinstance(event, Detected):
                on_language(source.label, event)
            elif isinstance(event, Segment):
                writer.segment(event)
                on_progress(source.label, event.end, decoded.seconds,
                            *clock.progress(event.end, time.perf_counter()))
            else:
                done = replace(event, stats=replace(event.stats, load_seconds=load_seconds))
                writer.end(done)
    on_progress(source.label, decoded.seconds, decoded.seconds,
                *clock.progress(decoded.seconds, time.perf_counter()))
    return done


class Listener:
    """chat's /listen: the speech model `reference` names, opened (and pulled, when it is
    a catalog model not stored yet) the first time it is needed, not before: a chat that
    never listens never loads it."""

    def __init__(self, reference: str, layout: StoreLayout, catalog: Catalog, *,
                 on_event: OnEvent = no_events, on_note: loader.OnNote = loader.no_notes):
        self.reference = reference
        self.layout, self.catalog = layout, catalog
        self.on_event, self.on_note = on_event, on_note
        self.opened: loader.Opened[SpeechEngine] | None = None

    def hear(self, path: Path) -> tuple[str, Transcribed]:
        """The words spoken in the audio file `path`, as one line of text."""
        source = Source(str(path), None, audio.probe(str(path)))
        if self.opened is None:
            self.opened = loader.open_speech(
                parse_reference(self.reference), self.layout, self.catalog,
                audio_seconds=source.seconds or 0.0, options=SpeechLoadOptions(),
                on_event=self.on_event, on_note=self.on_note)
        decoded = audio.decode(source.name)
        segments = []
        for event in transcribe(self.opened.engine, decoded, SpeechRequest()):
            if isinstance(event, Transcribed):
                done = event
            elif isinstance(event, Segment):
                segments.append(event.text.strip())
        text = " ".join(s for s in segments if s)
        if not text:
            raise UsageError(f"heard no speech in {path}",
                             hint="give a file with someone speaking in it")
        return text, done

    def close(self) -> None:
        if self.opened is not None:
            self.opened.engine.close()
