"""Whisper on faster-whisper: CTranslate2 models (`config.json`, `model.bin`, vocabulary),
on the CPU or a CUDA GPU.

faster-whisper decodes lazily: its `transcribe` detects the language (or takes the one
given) and returns a generator that decodes one 30-second window per step, so segments
reach the caller as they are decoded and closing the generator stops the work there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.engines.speech import (
    Detected,
    Segment,
    SpeechLoadOptions,
    SpeechRequest,
    Word,
    english_only,
)
from llmctl.errors import EngineFailure, UsageError
from llmctl.formats.whisper import CT2_VOCABULARIES, CT2_WEIGHTS

# Whisper's fallback: a window whose decoding looks wrong (compressed too well, too
# unlikely) is decoded again at the next temperature.
FALLBACK = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _devices() -> tuple[str, ...]:
    import ctranslate2

    return ("cuda", "cpu") if ctranslate2.get_cuda_device_count() > 0 else ("cpu",)


def build_backend() -> str:
    """Where CTranslate2 computes here (`show`): a CUDA GPU when its build sees one."""
    return "CUDA" if _devices()[0] == "cuda" else "CPU"


def compute_type_for(device: str, asked: str | None) -> str:
    """int8 weights on a CPU (4x smaller than float32, fast on CTranslate2's kernels),
    float16 on a GPU; an explicit --compute-type the device supports otherwise."""
    import ctranslate2

    supported = sorted(ctranslate2.get_supported_compute_types(device))
    if asked is None:
        wanted = "float16" if device == "cuda" else "int8"
        return wanted if wanted in supported else "default"
    if asked != "default" and asked not in supported:
        raise UsageError(f"--compute-type {asked} is not supported on {device} here",
                         hint=f"choose one of: {', '.join(supported)}")
    return asked


class FasterWhisperEngine:
    name = "faster-whisper"

    def __init__(self, folder: Path, options: SpeechLoadOptions):
        from faster_whisper import WhisperModel

        devices = _devices()
        self.device = options.device or devices[0]
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"--device {self.device} is not one faster-whisper runs on",
                             hint="use cpu or cuda")
        if self.device not in devices:
            raise UsageError("--device cuda: CTranslate2 sees no CUDA GPU here",
                             hint="leave out --device to run on the CPU")
        self.compute_type = compute_type_for(self.device, options.compute_type)
        try:
            self.model = WhisperModel(str(folder), device=self.device,
                                      compute_type=self.compute_type,
                                      cpu_threads=options.threads or 0,
                                      local_files_only=True)
        except (RuntimeError, ValueError, OSError) as exc:
            said = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EngineFailure(f"faster-whisper could not open {folder}: {said}") from None

    def transcribe(self, samples: Any, request: SpeechRequest) -> Iterator[Detected | Segment]:
        if not self.model.model.is_multilingual:
            english_only(request)
        segments, info = self.model.transcribe(
            samples, language=request.language, task=request.task,
            initial_prompt=request.initial_prompt, vad_filter=request.vad,
            temperature=FALLBACK if request.temperature is None else request.temperature,
            beam_size=request.beam_size, word_timestamps=request.word_timestamps)
        # An English-only model (tiny.en, ...) detects nothing: it is English by design.
        detected = request.language is None and self.model.model.is_multilingual
        yield Detected(info.language,
                       round(float(info.language_probability), 4) if detected else None,
                       only=not self.model.model.is_multilingual)
        try:
            for raw in segments:
                yield Segment(float(raw.start), float(raw.end), raw.text,
                              float(raw.avg_logprob), float(raw.no_speech_prob),
                              tuple(Word(float(w.start), float(w.end), w.word,
                                         float(w.probability)) for w in raw.words or ()))
        finally:
            segments.close()

    def close(self) -> None:
        self.model = None


def load(path: Path, options: SpeechLoadOptions) -> FasterWhisperEngine:
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if CT2_WEIGHTS not in names or not names & set(CT2_VOCABULARIES):
        raise EngineFailure(f"{path} is not a CTranslate2 Whisper folder (config.json, "
                            f"{CT2_WEIGHTS}, vocabulary.txt); the faster-whisper engine "
                            "opens those: llmctl pull whisper")
    return FasterWhisperEngine(path, options)
