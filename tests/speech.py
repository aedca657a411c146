"""Real speech for the transcription tests: sentences spoken by espeak-ng, the word error
rate they are judged by, and readers for the subtitle formats (parsed, not compared)."""

from __future__ import annotations

import re
import shutil
import subprocess
import wave
from pathlib import Path

import pytest

SENTENCES = (
    "The capital of France is Paris. It is a large city on the river Seine.",
    "Please send me the report by Friday morning. We are going to the park to play "
    "football with our friends.",
)
# Distinct sentences for long audio: repeating one sentence makes Whisper skip windows.
LONG_SENTENCES = [
    f"{subject} {verb} {place} on {day}."
    for subject in ("My sister", "The old teacher", "A tall farmer", "Our neighbour")
    for verb in ("walked to", "drove past", "painted", "cleaned", "visited")
    for place in ("the station", "the library", "the harbour")
    for day in ("Monday", "Friday")
]


SPEED = 140  # words per minute: a little slower than espeak-ng's 175, clearer for tiny


def espeak(path: Path, text: str) -> Path:
    """`text` spoken into a WAV file (22 kHz mono)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: scripts/debian-packages.sh installs it")
    subprocess.run(["espeak-ng", "-s", str(SPEED), "-w", str(path), text], check=True,
                   capture_output=True)
    return path


def concatenate(parts: list[Path], path: Path, seconds: float, gap: float = 0.4) -> Path:
    """The WAV files `parts` one after the other, with `gap` seconds of silence between
    them, repeated until the whole lasts at least `seconds`."""
    clips = []
    for part in parts:
        with wave.open(str(part)) as w:
            params = w.getparams()
            clips.append(w.readframes(w.getnframes()))
    silence = b"\0" * (params.sampwidth * int(params.framerate * gap))
    with wave.open(str(path), "wb") as out:
        out.setparams(params)
        written = 0
        while written < seconds * params.framerate:
            for clip in clips:
                out.writeframes(clip + silence)
                written += (len(clip) + len(silence)) // params.sampwidth
    return path


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / words of `reference`, after lower-casing
    and stripping punctuation: the edit distance over words."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1] / max(len(ref), 1)


CUE = re.compile(r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)")


def _seconds(parts: tuple[str, ...]) -> float:
    h, m, s, ms = (int(p) for p in parts)
    return h * 3600 + m * 60 + s + ms / 1000


def parse_cues(text: str, *, vtt: bool) -> list[tuple[float, float, str]]:
    """SubRip or WebVTT cues as (start, end, text); an AssertionError where the text is
    not well formed (numbering, the timing line, the decimal mark, blank lines)."""
    blocks = text.strip("\n").split("\n\n")
    if vtt:
        assert blocks[0] == "WEBVTT", blocks[0]
        blocks = blocks[1:]
    cues = []
    for number, block in enumerate(blocks, 1):
        lines = block.split("\n")
        if not vtt:
            assert lines[0] == str(number), block
            lines = lines[1:]
        timing = CUE.fullmatch(lines[0])
        assert timing, lines[0]
        assert ("." if vtt else ",") in lines[0]
        start, end = _seconds(timing.groups()[:4]), _seconds(timing.groups()[4:])
        assert 0 <= start <= end
        assert len(lines) >= 2 and all(lines[1:]), block
        cues.append((start, end, " ".join(lines[1:])))
    return cues
