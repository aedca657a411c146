"""The one place that writes to the terminal.

stdout carries only the payload (generated text, tables, JSON, names of what was made);
progress, statistics, notes and errors go to stderr. When a stream is not a terminal, or
NO_COLOR is set, nothing but plain text goes to it: no colour, no spinners, no bars.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TextIO, TypeVar

from llmctl.units import format_bytes, format_seconds

if TYPE_CHECKING:
    from llmctl.batch.local import Progress
    from llmctl.engines.speech import SpeechStats
    from llmctl.engines.text import Stats, TextEngine
    from llmctl.loader import Note


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Output:
    def __init__(self, *, json_mode: bool = False, quiet: bool = False,
                 stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.json_mode = json_mode
        self.quiet = quiet
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self._in_reply = False  # a reply's text is on stdout, its newline not yet
        self._bars: Any = None  # rich's Progress while progress() shows bars

    @property
    def fancy_stderr(self) -> bool:
        """Bars and colour on stderr: only for a person watching a terminal."""
        return (is_terminal(self.stderr) and not os.environ.get("NO_COLOR")
                and os.environ.get("TERM") != "dumb")

    # -- payload (stdout) ------------------------------------------------------------------

    def line(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def text(self, text: str) -> None:
        """Streamed text (tokens): written and flushed at once, no newline added."""
        self.stdout.write(text)
        self.stdout.flush()

    def json(self, data: Any) -> None:
        """One JSON document."""
        import json

        self.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")

    def json_line(self, data: Any) -> None:
        """One event of a JSON Lines stream, flushed so a reader sees it at once."""
        import json

        self.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
        self.stdout.flush()

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """Columns padded with spaces, like Ollama's `ls`: greppable, no borders."""
        columns = zip(headers, *rows, strict=True)
        widths = [max(len(str(cell)) for cell in column) for column in columns]
        for row in (headers, *rows):
            cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
            self.line("    ".join(cells).rstrip())

    # -- diagnostics (stderr) --------------------------------------------------------------

    def info(self, message: str) -> None:
        if not self.quiet:
            self._diagnostic(message)

    def warn(self, message: str) -> None:
        self._diagnostic(f"warning: {message}")

    def _diagnostic(self, message: str) -> None:
        if self._bars is not None:  # above the progress bars, which stay at the bottom
            self._bars.console.print(message, markup=False, highlight=False,
                                     soft_wrap=True)
            return
        self.stderr.write(message + "\n")
        self.stderr.flush()

    def error(self, message: str) -> None:
        self.stderr.write(f"error: {message}\n")
        self.stderr.flush()

    def confirm(self, question: str) -> bool:
        """Ask on the terminal; callers decide what happens without one."""
        self.stderr.write(f"{question} [y/N] ")
        self.stderr.flush()
        try:
            answer = sys.stdin.readline()
        except KeyboardInterrupt:
            self.stderr.write("\n")
            raise
        return answer.strip().lower() in ("y", "yes")

    @contextmanager
    def progress(self) -> Iterator[Callable[[ProgressEvent], None]]:
        """A function to hand progress events to (the library's PullEvent, or anything
        with model, status, completed and total): bars on a terminal, one line per status
        change otherwise, nothing when quiet or writing JSON. Pass it as `on_event`."""
        if self.quiet or self.json_mode:
            yield lambda event: None
            return
        if not self.fancy_stderr:
            seen: set[tuple[str, str]] = set()

            def plain(event: ProgressEvent) -> None:
                if (event.model, event.status) not in seen:
                    seen.add((event.model, event.status))
                    self.info(f"{event.model}: {event.status}")

            yield plain
            return
        bars, report = _rich_progress(self.stderr)
        with bars:
            self._bars = bars
            try:
                yield report
            finally:
                self._bars = None

    # -- records: the modes in one place ---------------------------------------------------

    def records(self, items: Sequence[T], *, record: Callable[[T], Any],
                name: Callable[[T], str], columns: Sequence[str] | None = None,
                row: Callable[[T], Sequence[str]] | None = None, summary: str | None = None,
                listed: Callable[[T], bool] | None = None) -> None:
        """A listing: one JSON document of every item's `record` (--json); otherwise the
        items `listed` lets through (all by default), as one `name` per line (--quiet, or
        no `columns`) or a table of `row`s under `columns` with `summary` on stderr."""
        if self.json_mode:
            self.json([record(item) for item in items])
            return
        shown = [item for item in items if listed is None or listed(item)]
        if self.quiet or columns is None or row is None:
            for item in shown:
                self.line(name(item))
        else:
            self.table(columns, [row(item) for item in shown])
            if summary:
                self.info(summary)

    def document(self, record: Any, lines: Callable[[], Iterable[str]]) -> None:
        """One thing described: its JSON document (--json), else the `lines` a person
        reads."""
        if self.json_mode:
            self.json(record)
        else:
            for line in lines():
                self.line(line)

    # -- a streamed reply (run, chat) ------------------------------------------------------

    def token(self, text: str) -> None:
        """One piece of a reply as it is generated: a {"type": "token"} line (--json),
        else the text itself."""
        if self.json_mode:
            self.json_line({"type": "token", "text": text})
        else:
            self.text(text)
            self._in_reply = True

    def reply_done(self, record: dict[str, Any]) -> None:
        """The end of a reply: a {"type": "done", ...record} line (--json), else the
        newline that ends the reply's text."""
        if self.json_mode:
            self.json_line({"type": "done", **record})
        else:
            self.text("\n")
        self._in_reply = False

    def reply_stopped(self) -> None:
        """A reply cut short (Ctrl-C): what comes next (the shell's prompt) starts on a
        line of its own."""
        if self._in_reply:
            self.text("\n")
        self._in_reply = False

    def stats(self, stats: Stats, engine: TextEngine | None = None) -> None:
        """--verbose: Ollama's statistics block of a reply, on stderr, with the CPU threads
        the engine ran when it counts them (the default depends on what else keeps the
        CPUs busy) and where it computed (the backend, the layers offloaded to a GPU)."""
        self.info(
            f"load duration:     {stats.load_seconds:.2f}s\n"
            f"prompt eval count: {stats.prompt_tokens} token(s)"
            + (f", {stats.cached_tokens} from the cache, {stats.processed_tokens} processed"
               if stats.cached_tokens else "") + "\n"
            f"prompt eval rate:  {stats.prompt_tokens_per_second:.2f} tokens/s\n"
            f"first token after: {stats.prompt_seconds:.2f}s\n"
            f"eval count:        {stats.generated_tokens} token(s)\n"
            f"eval rate:         {stats.generate_tokens_per_second:.2f} tokens/s\n"
            f"stop reason:       {stats.stop_reason}\n"
            + (f"threads:           {engine.threads}\n" if engine and engine.threads else "")
            + (f"backend:           {engine.backend}"
               + (f" ({engine.gpu_layers} layers on the GPU)" if engine.gpu_layers else "")
               + "\n" if engine else "")
            + f"peak memory:       {format_bytes(stats.peak_memory_bytes)}"
        )

    def speech_stats(self, source: str, stats: SpeechStats) -> None:
        """transcribe --verbose: one input's statistics, on stderr."""
        detected = (f" (detected, p={stats.language_probability:.2f})"
                    if stats.language_probability is not None else "")
        self.info(
            f"{source}:\n"
            f"  load duration:     {stats.load_seconds:.2f}s\n"
            f"  audio:             {format_seconds(stats.audio_seconds)}\n"
            f"  processing:        {format_seconds(stats.processing_seconds)}\n"
            f"  real-time factor:  {stats.real_time_factor:.3f} "
            f"({1 / stats.real_time_factor if stats.real_time_factor else 0:.1f}x real time)\n"
            f"  language:          {stats.language}{detected}\n"
            f"  segments:          {stats.segments}\n"
            f"  engine:            {stats.engine} on {stats.device}\n"
            f"  peak memory:       {format_bytes(stats.peak_memory_bytes)}")

    def note(self, note: Note) -> None:
        """A note from the library: "note: ..." or a warning."""
        if note.severity == "warning":
            self.warn(note.text)
        else:
            self.info(f"note: {note.text}")

    def measured(self, line: str, finished: bool) -> None:
        """A benchmark's running figure (`bench`): one line rewritten in place on a
        terminal, kept when `finished`; elsewhere only the finished line. Nothing when
        quiet."""
        if self.quiet:
            return
        if self.fancy_stderr:
            self.stderr.write("\r\x1b[2K" + line + ("\n" if finished else ""))
            self.stderr.flush()
        elif finished:
            self._diagnostic(line)

    def item(self, record: Any, name: str) -> None:
        """One thing made or stored, as it is made: its JSON line (--json), else its
        name on a line of its own (what scripts read)."""
        if self.json_mode:
            self.json_line(record)
        else:
            self.line(name)


class ProgressEvent(Protocol):
    model: str
    status: str
    completed: int
    total: int


T = TypeVar("T")


def _rich_progress(stream: TextIO) -> tuple[Any, Callable[[ProgressEvent], None]]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(file=stream)
    bars = Progress(
        TextColumn("{task.description}"), TaskProgressColumn(), BarColumn(),
        DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )
    tasks: dict[tuple[str, str], Any] = {}

    def report(event: ProgressEvent) -> None:
        task, status, done, total = event.model, event.status, event.completed, event.total
        key = (task, status)
        if key not in tasks:
            tasks[key] = bars.add_task(f"{task}: {status}", total=total or None)
        bars.update(tasks[key], completed=done if total else None, total=total or None)
        if not total:
            bars.update(tasks[key], total=1, completed=1)

    return bars, report


class _StatusLine:
    """One line of stderr rewritten in place (a terminal's progress line); `close` ends it
    when the last write left it open, so that what comes next starts on its own line."""

    def __init__(self, out: Output):
        self.out = out
        self.open = False

    def write(self, text: str, final: bool) -> None:
        self.out.stderr.write("\r\x1b[2K" + text + ("\n" if final else ""))
        self.out.stderr.flush()
        self.open = not final

    def close(self) -> None:
        if self.open:
            self.out.stderr.write("\n")
            self.out.stderr.flush()


@contextmanager
def step_progress(out: Output) -> Iterator[Callable[[str, int, int, float, float], None]]:
    """A function to report (label, step, steps, elapsed, seconds left) of a computation in
    steps (image generation): one line rewritten in place on a terminal, one line per
    step otherwise, nothing when quiet or writing JSON."""
    if out.quiet or out.json_mode:
        yield lambda label, step, total, elapsed, left: None
        return
    line = _StatusLine(out) if out.fancy_stderr else None

    def report(label: str, step: int, total: int, elapsed: float, left: float) -> None:
        text = (f"{label}step {step}/{total}, {format_seconds(elapsed)} elapsed, "
                f"{format_seconds(left)} left")
        if line:  # the last step ends the line
            line.write(text, final=step >= total)
        else:
            out.info(text)

    try:
        yield report
    finally:
        if line:
            line.close()


LONG_AUDIO = 30.0  # seconds: shorter audio is done before progress would tell anything
PLAIN_EVERY = 0.1  # without a terminal, a line each time another tenth is done


@contextmanager
def audio_progress(out: Output) -> Iterator[Callable[[str, float, float, float, float], None]]:
    """A function to report (source, audio seconds done, total, elapsed, seconds left) of
    a transcription: one line rewritten in place on a terminal, a line per tenth of the
    audio otherwise; nothing for audio under LONG_AUDIO or when quiet."""
    if out.quiet:
        yield lambda source, done, total, elapsed, left: None
        return
    line = _StatusLine(out) if out.fancy_stderr else None
    reported: dict[str, float] = {}

    def report(source: str, done: float, total: float, elapsed: float, left: float) -> None:
        if total < LONG_AUDIO or reported.get(source, 0.0) >= 1.0:
            return  # short audio; or the end, shown once already
        done = min(done, total)
        share = done / total
        text = (f"{source}: {format_seconds(done)} of {format_seconds(total)} of audio "
                f"({share:.0%}), {format_seconds(elapsed)} elapsed, "
                f"{format_seconds(left)} left")
        if line:
            line.write(text, final=share >= 1.0)
        elif share < 1.0 and share - reported.get(source, 0.0) < PLAIN_EVERY:
            return
        else:
            out.info(text)
        reported[source] = share

    try:
        yield report
    finally:
        if line:
            line.close()


@contextmanager
def batch_progress(out: Output, json_events: bool = False
                   ) -> Iterator[Callable[[Progress], None]]:
    """A function to report a batch's progress (prompts done of all, tokens/s, time
    left), called as each prompt ends: one line rewritten in place on a terminal, a line
    per tenth of the prompts otherwise, or with `json_events` a JSON line on stderr per
    prompt. Nothing when quiet."""
    if out.quiet:
        yield lambda progress: None
        return
    line = _StatusLine(out) if out.fancy_stderr and not json_events else None
    shown = [0.0]

    def report(progress: Progress) -> None:
        if json_events:
            import json

            out.stderr.write(json.dumps(progress.to_dict()) + "\n")
            out.stderr.flush()
            return
        share = progress.done / progress.total if progress.total else 1.0
        left = progress.left
        text = (f"{progress.done}/{progress.total} prompts"
                + (f", {progress.failed} failed" if progress.failed else "")
                + f", {progress.tokens_per_second:.1f} tokens/s, "
                  f"{format_seconds(progress.elapsed)} elapsed"
                + (f", {format_seconds(left)} left" if left is not None else ""))
        if line:
            line.write(text, final=share >= 1.0)
        elif share >= 1.0 or share - shown[0] >= PLAIN_EVERY:
            out.info(text)
            shown[0] = share

    try:
        yield report
    finally:
        if line:
            line.close()
