"""Audio in: any file FFmpeg decodes, as the 16 kHz mono float32 samples Whisper takes.

Decoding goes through PyAV (its wheels ship FFmpeg's libraries), so no system ffmpeg is
needed, and every speech engine gets exactly the same samples. `probe` reads only the
container's header: the memory check before a model loads needs the length of the audio,
not the audio.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmctl.engines.speech import SAMPLE_RATE, Audio
from llmctl.errors import EngineUnavailable, UsageError

STDIN = "-"
INSTALL = "pip install 'llmctl[whisper]'"


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise EngineUnavailable("audio decoding", "PyAV (av) is not installed", INSTALL) from None
    return av


def _source(name: str, data: bytes | None) -> Any:
    if data is not None:
        return io.BytesIO(data)
    path = Path(name)
    if not path.exists():
        raise UsageError(f"no such audio file: {name}")
    if not path.is_file():
        raise UsageError(f"{name} is not a regular file", hint="give an audio or video file, "
                         "or - to read one from stdin")
    if path.stat().st_size == 0:
        raise UsageError(f"{name} is empty (0 bytes)", hint="give a file that holds audio")
    return str(path)


@contextmanager
def _audio_stream(name: str, data: bytes | None) -> Iterator[tuple[Any, Any, Any]]:
    """(av, the open container, its first audio stream); what FFmpeg cannot read, and a
    file without an audio track, are usage errors."""
    av = _av()
    if data is not None and not data:
        raise UsageError("stdin is empty", hint="pipe an audio file in: llmctl transcribe "
                         "MODEL - < memo.m4a")
    try:
        with av.open(_source(name, data), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise UsageError(f"{name} has no audio track",
                                 hint="give an audio file or a video with sound")
            yield av, container, container.streams.audio[0]
    except av.error.FFmpegError as exc:
        raise UsageError(f"{name} is not audio FFmpeg can decode ({_reason(exc)})",
                         hint="give a wav, mp3, m4a, flac, ogg, mp4 or mkv file") from None


def decode(name: str, data: bytes | None = None) -> Audio:
    """The audio track of the file `name` (or of `data`, the bytes read from stdin),
    resampled to 16 kHz mono float32. A file FFmpeg cannot read, one with no audio track
    and one whose audio holds no samples are usage errors (exit 2)."""
    import numpy as np

    chunks: list[Any] = []
    with _audio_stream(name, data) as (av, container, stream):
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):  # what the resampler still holds
            chunks.append(out.to_ndarray().reshape(-1))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if samples.size == 0:
        raise UsageError(f"{name} holds no audio (zero length)",
                         hint="give a file with at least some sound in it")
    return Audio(name, samples.astype(np.float32, copy=False), samples.size / SAMPLE_RATE)


def probe(name: str, data: bytes | None = None) -> float | None:
    """Check that `name` (or `data`) is audio FFmpeg can open, before any model loads, and
    return its length in seconds as the container states it (None when it states none:
    decode finds out). Not audio, no audio track, a stated length of zero: exit 2."""
    seconds = None
    with _audio_stream(name, data) as (_, container, stream):
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1_000_000  # av.time_base: microseconds
    if seconds is not None and seconds <= 0:
        raise UsageError(f"{name} holds no audio (zero length)",
                         hint="give a file with at least some sound in it")
    return seconds


def _reason(exc: BaseException) -> str:
    return (getattr(exc, "strerror", None) or str(exc)).strip().rstrip(".").lower() or \
        type(exc).__name__
