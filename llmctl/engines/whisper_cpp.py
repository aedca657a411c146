"""Whisper on whisper.cpp: its ggml model files (ggml-tiny.bin, ggml-base.en-q5_1.bin, ...),
on the CPU, through pywhispercpp's bindings of whisper.h.

whisper.cpp decodes a whole recording in one call (`whisper_full`) and announces the
segments of each window through its new-segment callback as they are decoded. The call runs
in a worker thread (the binding releases the GIL while it computes); the callback hands the
segments through a queue to the generator, so they reach the caller as they are decoded.
Closing the generator sets the flag whisper.cpp's abort callback reads (it is asked during
every encoder and decoder pass), so the work stops within one decoder step (40 ms on
whisper tiny here), and the thread is joined before the generator returns.

The bindings (`_pywhispercpp`) rather than pywhispercpp's `Model`: `Model` keeps the whisper
context to itself, and with it the detected language and the tokens' times (words); it
silences whisper.cpp while loading by pointing the whole process's stderr at /dev/null (our
own messages from other threads with it), and keeps every option of one call for the next.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmctl.engines.speech import (
    SAMPLE_RATE,
    Detected,
    Segment,
    SpeechLoadOptions,
    SpeechRequest,
    Word,
    english_only,
)
from llmctl.errors import EngineFailure, UsageError
from llmctl.formats.whisper import ggml_header

ERROR = 4  # ggml's log level GGML_LOG_LEVEL_ERROR
CENTISECONDS = 100  # whisper.cpp's times are in units of 10 ms


def build_backend() -> str:
    """llmctl runs whisper.cpp on the CPU everywhere (`use_gpu` off), whatever its build."""
    return "CPU"


@contextmanager
def _captured_log() -> Iterator[deque[tuple[int, str]]]:
    """whisper.cpp's and ggml's log, which goes to stderr unless a callback takes it: kept
    here (the last lines explain a failure) while a call runs, then whisper.cpp's own
    logger back. The Python callback must not stay installed: whisper.cpp logs while the
    interpreter shuts down, and a Python callback then is a fatal error (pywhispercpp 1.5)."""
    import _pywhispercpp as pw

    lines: deque[tuple[int, str]] = deque(maxlen=50)
    pw.whisper_log_set(lambda level, text: lines.append((level, text.strip())))
    try:
        yield lines
    finally:
        pw.whisper_log_set(None)


def _errors(lines: deque[tuple[int, str]]) -> list[str]:
    return [text for level, text in lines if level >= ERROR and text]


def _check_options(options: SpeechLoadOptions) -> None:
    if options.device not in (None, "cpu"):
        raise UsageError(f"--device {options.device}: llmctl runs whisper.cpp on the CPU",
                         hint="leave out --device, or use a CTranslate2 model on "
                              "--engine faster-whisper for a CUDA GPU")
    if options.compute_type is not None:
        raise UsageError("--compute-type is not available on the whisper.cpp engine",
                         hint="whisper.cpp computes in the file's own types (the q5_0, q8_0 "
                              "files are quantized); leave out --compute-type")


def _check_request(request: SpeechRequest) -> None:
    if request.vad:
        raise UsageError("--vad is not available on the whisper.cpp engine",
                         hint="whisper.cpp's VAD needs a Silero model file llmctl does not "
                              "manage; leave out --vad, or use a CTranslate2 model (its "
                              "engine, faster-whisper, has VAD built in)")


@dataclass(frozen=True)
class _Finished:
    code: int


class WhisperCppEngine:
    name = "whisper.cpp"
    device = "cpu"

    def __init__(self, path: Path, options: SpeechLoadOptions):
        import _pywhispercpp as pw

        _check_options(options)
        self.threads = options.threads
        params = pw.whisper_context_default_params()
        params.use_gpu = False
        with _captured_log() as log:
            ctx = pw.whisper_init_from_file_with_params(str(path), params)
        # The binding wraps a NULL context without saying so; whisper.cpp logs an error on
        # every path that returns one. A file that ends before its first tensor loads as an
        # "empty model for testing" whose weights are whatever memory held.
        errors = _errors(log)
        empty = any("no tensors loaded" in text for _, text in log)
        if errors or empty:
            pw.whisper_free(ctx)  # NULL is safe; an empty model's context is a real one
            said = errors[0] if errors else "it holds no tensors (a truncated file?)"
            raise EngineFailure(f"whisper.cpp could not open {path}: "
                                f"{said.split(': ', 1)[-1].removeprefix('ERROR ')}")
        self.ctx = ctx
        self.multilingual = bool(pw.whisper_is_multilingual(ctx))

    def transcribe(self, samples: Any, request: SpeechRequest) -> Iterator[Detected | Segment]:
        import _pywhispercpp as pw
        import numpy as np

        _check_request(request)
        if not self.multilingual:  # an .en model: English by design, nothing to detect
            english_only(request)
            request = replace(request, language="en")
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        seconds = samples.size / SAMPLE_RATE
        params = self._params(request)
        events: queue.Queue[Any] = queue.Queue()  # unbounded: the callback never waits
        stop = threading.Event()
        announced = request.language is not None

        def on_segments(ctx: Any, n_new: int) -> None:
            nonlocal announced
            if not announced:  # the language is known once the first window is decoded
                events.put(self._detected(ctx))
                announced = True
            n = pw.whisper_full_n_segments(ctx)
            for i in range(n - n_new, n):
                events.put(self._segment(ctx, i, seconds, request.word_timestamps))

        def work() -> None:
            try:
                events.put(_Finished(pw.whisper_full(self.ctx, params, samples, samples.size)))
            except BaseException as exc:  # handed to the generator, raised there
                events.put(exc)

        pw.assign_new_segment_callback(params, on_segments)
        pw.assign_abort_callback(params, stop.is_set)
        if request.language is not None:
            yield Detected(request.language, only=not self.multilingual)
        thread = threading.Thread(target=work, name="whisper.cpp", daemon=True)
        with _captured_log() as log:
            thread.start()
            try:
                while not isinstance(event := events.get(), _Finished):
                    if isinstance(event, BaseException):
                        raise event
                    if not (isinstance(event, Segment) and not event.text.strip()):
                        yield event
            finally:
                stop.set()
                thread.join()
        if event.code != 0:
            said = (_errors(log) or [f"error {event.code}"])[-1]
            raise EngineFailure(f"whisper.cpp could not transcribe the audio: {said}")
        if not announced:  # no segment at all (silence): the language it settled on
            yield self._detected(self.ctx)

    def _params(self, request: SpeechRequest) -> Any:
        """A fresh whisper_full_params per call, so that nothing carries over."""
        import _pywhispercpp as pw

        strategies = pw.whisper_sampling_strategy
        beam = request.beam_size > 1
        params = pw.whisper_full_default_params(
            strategies.WHISPER_SAMPLING_BEAM_SEARCH if beam else strategies.WHISPER_SAMPLING_GREEDY)
        if beam:
            params.beam_search = {"beam_size": request.beam_size, "patience": -1.0}
        params.language = request.language or ""  # "": detect it
        params.translate = request.task == "translate"
        if request.initial_prompt:
            params.initial_prompt = request.initial_prompt
        if request.temperature is not None:  # that temperature only: no fallback
            params.temperature = request.temperature
            params.temperature_inc = 0.0
        # else whisper.cpp's default is Whisper's fallback: 0.0, then +0.2 up to 1.0
        params.token_timestamps = request.word_timestamps
        params.print_progress = params.print_realtime = params.print_timestamps = False
        if self.threads:
            params.n_threads = self.threads
        return params

    @staticmethod
    def _detected(ctx: Any) -> Detected:
        """whisper.cpp's language; its probability is not in the API (only in its log)."""
        import _pywhispercpp as pw

        return Detected(pw.whisper_lang_str(pw.whisper_full_lang_id(ctx)))

    @staticmethod
    def _segment(ctx: Any, i: int, seconds: float, words: bool) -> Segment:
        """Segment i, its times kept within the audio (an unfinished last segment ends
        where its 30-second window does); avg_logprob: the mean over its text tokens."""
        import _pywhispercpp as pw

        def clamp(t: int) -> float:
            return min(max(t / CENTISECONDS, 0.0), seconds)

        text = pw.whisper_full_get_segment_text(ctx, i).decode("utf-8", errors="replace")
        end_of_text = pw.whisper_token_eot(ctx)
        tokens = [pw.whisper_full_get_token_data(ctx, i, j)
                  for j in range(pw.whisper_full_n_tokens(ctx, i))]
        tokens = [t for t in tokens if t.id < end_of_text]  # no timestamps, no specials
        timed: list[Word] = []
        if words:
            # A token that starts with a space starts a word; the bytes of a word's tokens
            # are joined before decoding (a character can span two tokens).
            groups: list[list[Any]] = []
            for token in tokens:
                piece = pw.whisper_token_to_bytes(ctx, token.id)
                if not groups or piece.startswith(b" "):
                    groups.append([])
                groups[-1].append((token, piece))
            for group in groups:
                word = b"".join(piece for _, piece in group).decode("utf-8", errors="replace")
                probability = sum(t.p for t, _ in group) / len(group)
                timed.append(Word(clamp(group[0][0].t0), clamp(group[-1][0].t1), word,
                                  round(float(probability), 4)))
        start = clamp(pw.whisper_full_get_segment_t0(ctx, i))
        end = max(start, clamp(pw.whisper_full_get_segment_t1(ctx, i)))
        logprob = sum(t.plog for t in tokens) / len(tokens) if tokens else None
        return Segment(start, end, text, logprob, None, tuple(timed))

    def close(self) -> None:
        if self.ctx is not None:
            import _pywhispercpp as pw

            with _captured_log():
                pw.whisper_free(self.ctx)
            self.ctx = None


def load(path: Path, options: SpeechLoadOptions) -> WhisperCppEngine:
    if not path.is_file() or ggml_header(path) is None:
        raise EngineFailure(f"{path} is not a whisper.cpp ggml model (no ggml magic at its "
                            "start); the whisper.cpp engine opens ggml-*.bin files: "
                            "llmctl pull whisper:tiny-ggml")
    return WhisperCppEngine(path, options)
