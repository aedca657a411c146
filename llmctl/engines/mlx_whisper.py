"""Whisper on mlx-whisper: MLX conversions (config.json with the model's dimensions, and
weights.safetensors or weights.npz), on Apple silicon's GPU (Metal) or MLX's CPU backend.

mlx-whisper's `transcribe` returns every segment at the end and offers no callback, so this
module runs Whisper's window loop itself on mlx-whisper's public pieces (log_mel_spectrogram,
the model's detect_language and decode, get_tokenizer, add_word_timestamps): each 30-second
window is decoded, with Whisper's temperature fallback, and its segments are yielded before
the next one starts, so closing the generator stops the work at the next window. The loop
follows Whisper's rules (a window that looks silent is skipped; the next window starts at
the last complete segment; the text so far conditions the next window, unless a window
needed a temperature above 0.5), without mlx-whisper's clip and hallucination options,
which llmctl does not offer.

mlx-whisper has no beam search (its decoder raises NotImplementedError), so every request
decodes greedily at temperature 0, whatever --beam-size says (5 by default); no VAD either.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
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
from llmctl.formats.whisper import MLX_WEIGHTS

# Whisper's fallback: a window whose decoding looks wrong is decoded again at the next
# temperature. Wrong: compressed too well by gzip (a loop of repeats) or too unlikely.
FALLBACK = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MAX_COMPRESSION = 2.4
MIN_AVG_LOGPROB = -1.0
NO_SPEECH = 0.6  # above it (and unlikely text), a window is taken as silence
RESET_TEMPERATURE = 0.5  # text decoded hotter than this does not condition the next window
DEVICES = ("cpu", "gpu")


def build_backend() -> str:
    import mlx.core as mx

    return "Metal" if mx.metal.is_available() else "CPU"


def _use_device(asked: str | None) -> str:
    """Make `asked` MLX's default device ("gpu" is Metal); None keeps MLX's default."""
    import mlx.core as mx

    if asked is None:
        return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    if asked not in DEVICES:
        raise UsageError(f"--device {asked} is not one mlx-whisper runs on",
                         hint="use cpu or gpu (Metal, on Apple silicon)")
    if asked == "gpu" and not mx.is_available(mx.gpu):
        raise UsageError("--device gpu: this MLX has no GPU backend (Metal) here",
                         hint="leave out --device to run on the CPU")
    mx.set_default_device(mx.gpu if asked == "gpu" else mx.cpu)
    return asked


def _check_options(options: SpeechLoadOptions) -> None:
    if options.compute_type is not None:
        raise UsageError("--compute-type is not available on the mlx-whisper engine",
                         hint="it computes in the weights' own type (float16 in "
                              "mlx-community's conversions); leave out --compute-type")
    if options.threads is not None:
        raise UsageError("--threads is not available on the mlx-whisper engine",
                         hint="MLX chooses its own CPU threads; leave out --threads")


def _weights_file(folder: Path) -> Path | None:
    # mlx-whisper's own order: weights.safetensors first
    found = [folder / name for name in reversed(MLX_WEIGHTS) if (folder / name).is_file()]
    return found[0] if found else None


class MlxWhisperEngine:
    name = "mlx-whisper"

    def __init__(self, folder: Path, options: SpeechLoadOptions):
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_whisper.load_models import load_model

        _check_options(options)
        self.device = _use_device(options.device)
        weights = _weights_file(folder)
        try:
            # Lazy: only the header is read. The stored type decides the type the audio
            # features are computed in (mlx-whisper's `fp16` option must match it).
            stored = mx.load(str(weights))
            self.dtype = stored["encoder.conv1.weight"].dtype \
                if "encoder.conv1.weight" in stored else mx.float16
            # A path that exists: load_model never asks the Hugging Face Hub.
            self.model = load_model(str(folder), dtype=self.dtype)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            said = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EngineFailure(f"mlx-whisper could not open {folder}: {said}") from None
        # mlx's update takes a partial set of weights without a word, leaving the rest as
        # random as a new model's; alignment_heads has a default drawn from the dimensions.
        missing = sorted(name for name, _ in tree_flatten(self.model.parameters())
                         if name not in stored and name != "alignment_heads")
        if missing:
            raise EngineFailure(f"mlx-whisper could not open {folder}: {weights.name} lacks "
                                f"{len(missing)} of the model's tensors ({missing[0]}, ...)")
        wrong = _wrong_shapes(self.model.dims, stored)
        if wrong:
            raise EngineFailure(f"mlx-whisper could not open {folder}: {wrong[0]} in "
                                f"{weights.name} does not have the shape config.json implies")

    def transcribe(self, samples: Any, request: SpeechRequest) -> Iterator[Detected | Segment]:
        import mlx.core as mx
        from mlx_whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, log_mel_spectrogram
        from mlx_whisper.decoding import DecodingOptions
        from mlx_whisper.tokenizer import get_tokenizer

        if request.vad:
            raise UsageError("--vad is not available on the mlx-whisper engine",
                             hint="leave out --vad, or use a CTranslate2 model (its engine, "
                                  "faster-whisper, has VAD built in)")
        model, dims = self.model, self.model.dims
        if not model.is_multilingual:
            english_only(request)
        seconds = len(samples) / SAMPLE_RATE
        # 30 s of silence after the audio, so that the last window is whole
        mel = log_mel_spectrogram(samples, n_mels=dims.n_mels, padding=N_SAMPLES)
        frames = mel.shape[-2] - N_FRAMES
        detected = self._language(mel, request.language)
        yield detected
        tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages,
                                  language=detected.language, task=request.task)
        options = DecodingOptions(task=request.task, language=detected.language,
                                  fp16=self.dtype == mx.float16)
        temperatures = FALLBACK if request.temperature is None else (request.temperature,)
        # the text the next window continues (Whisper keeps the last n_text_ctx / 2)
        context = tokenizer.encode(" " + request.initial_prompt.strip()) \
            if request.initial_prompt else []
        stride = N_FRAMES // dims.n_audio_ctx  # mel frames per audio position: 2
        step = stride * HOP_LENGTH / SAMPLE_RATE  # seconds per timestamp token: 0.02
        last_speech = 0.0
        seek = 0
        while seek < frames:
            size = min(N_FRAMES, frames - seek)
            offset = seek * HOP_LENGTH / SAMPLE_RATE
            window = _pad_frames(mel[seek:seek + size], N_FRAMES).astype(self.dtype)
            result = self._decode(window, replace(options, prompt=context), temperatures)
            if result.no_speech_prob > NO_SPEECH and result.avg_logprob <= MIN_AVG_LOGPROB:
                seek += size  # silence
                continue
            pieces, consumed, finished = _split(result.tokens, tokenizer.timestamp_begin,
                                                size, stride)
            window_seconds = size * HOP_LENGTH / SAMPLE_RATE
            segments = [{"seek": seek, "start": offset + first * step,
                         "end": offset + (window_seconds if last is None else last * step),
                         "tokens": tokens} for first, last, tokens in pieces]
            # a window that ends where it began (timestamps stuck at 0) would repeat forever
            seek += consumed or size
            if request.word_timestamps and segments:
                from mlx_whisper.timing import add_word_timestamps

                add_word_timestamps(segments=segments, model=model, tokenizer=tokenizer,
                                    mel=window, num_frames=size, last_speech_timestamp=last_speech)
                ends = [w["end"] for s in segments for w in s["words"]]
                if ends:
                    last_speech = ends[-1]
                    if not finished and ends[-1] > offset:
                        # the next window starts after the last word, not the last timestamp
                        seek = max(round(ends[-1] * SAMPLE_RATE / HOP_LENGTH),
                                   segments[0]["seek"] + 1)
            for raw in segments:
                text = tokenizer.decode([t for t in raw["tokens"] if t < tokenizer.eot])
                start, end = (min(max(float(raw[k]), 0.0), seconds) for k in ("start", "end"))
                if not text.strip() or end <= start:
                    continue  # Whisper blanks these; they carry nothing
                context += raw["tokens"]
                yield Segment(start, end, text, float(result.avg_logprob),
                              float(result.no_speech_prob),
                              tuple(Word(min(max(float(w["start"]), 0.0), seconds),
                                         min(max(float(w["end"]), 0.0), seconds), w["word"],
                                         round(float(w["probability"]), 4))
                                    for w in raw.get("words", ())))
            if result.temperature > RESET_TEMPERATURE:
                context = []

    def _language(self, mel: Any, asked: str | None) -> Detected:
        """The language asked for, or the one the first 30 seconds sound like; English for a
        model that knows only English."""
        from mlx_whisper.audio import N_FRAMES

        if asked is not None:
            return Detected(asked)
        if not self.model.is_multilingual:
            return Detected("en", only=True)
        _, probabilities = self.model.detect_language(
            _pad_frames(mel[:N_FRAMES], N_FRAMES).astype(self.dtype))
        language = max(probabilities, key=probabilities.get)
        return Detected(language, round(float(probabilities[language]), 4))

    def _decode(self, window: Any, options: Any, temperatures: tuple[float, ...]) -> Any:
        """The window decoded at the first temperature whose text looks right (or at the
        last one). Greedy at 0, one sample above it."""
        for temperature in temperatures:
            result = self.model.decode(window, replace(options, temperature=temperature))
            if result.no_speech_prob > NO_SPEECH:
                break  # silence: decoding again would not help
            if result.compression_ratio <= MAX_COMPRESSION \
                    and result.avg_logprob >= MIN_AVG_LOGPROB:
                break
        return result

    def close(self) -> None:
        self.model = None


def _wrong_shapes(dims: Any, stored: dict[str, Any]) -> list[str]:
    """The stored tensors whose shapes differ from those of a model of `dims` (mlx's update
    takes them too, and the first window fails on them). A model built only to be measured:
    MLX computes nothing until asked, so its random weights cost nothing. Quantized weights
    are packed into other shapes: not checked."""
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import Whisper

    if any(name.endswith(".scales") for name in stored):
        return []
    return [name for name, array in tree_flatten(Whisper(dims).parameters())
            if name in stored and tuple(stored[name].shape) != tuple(array.shape)]


def _pad_frames(mel: Any, frames: int) -> Any:
    from mlx_whisper.audio import pad_or_trim

    return pad_or_trim(mel, frames, axis=-2)


def _split(tokens: list[int], timestamp_begin: int, size: int, stride: int
           ) -> tuple[list[tuple[int, int | None, list[int]]], int, bool]:
    """A window's tokens as segments: (first timestamp, last timestamp or None for the end
    of the window, the tokens), timestamps in steps from the window's start; the mel frames
    the window consumed; whether it was decoded to its end.

    Whisper closes a segment with two timestamps in a row (the end of one, the start of the
    next). A window that ends on one lone timestamp was decoded to its end; otherwise its
    last segment is unfinished: it is dropped, and the next window starts where it began.
    """
    stamp = [t >= timestamp_begin for t in tokens]
    cuts = [i for i in range(1, len(tokens)) if stamp[i - 1] and stamp[i]]
    finished = stamp[-2:] == [False, True]
    if not cuts:  # one segment: up to its last timestamp, or the whole window
        stamps = [t - timestamp_begin for t in tokens if t >= timestamp_begin]
        last = stamps[-1] if stamps and stamps[-1] > 0 else None
        return [(0, last, tokens)], size, finished
    bounds = [0, *cuts, *([len(tokens)] if finished else [])]
    pieces = [(tokens[a] - timestamp_begin, tokens[b - 1] - timestamp_begin, tokens[a:b])
              for a, b in itertools.pairwise(bounds)]
    consumed = size if finished else (tokens[cuts[-1] - 1] - timestamp_begin) * stride
    return pieces, consumed, finished


def load(path: Path, options: SpeechLoadOptions) -> MlxWhisperEngine:
    config = path / "config.json"
    if not path.is_dir() or not config.is_file() or _weights_file(path) is None:
        raise EngineFailure(f"{path} is not an mlx-whisper folder (config.json and "
                            f"{' or '.join(MLX_WEIGHTS)}); the mlx-whisper engine opens "
                            "those: llmctl pull whisper:tiny-mlx")
    try:
        dims = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineFailure(f"{config} is not readable JSON ({exc})") from None
    if not isinstance(dims, dict) or "n_mels" not in dims:
        raise EngineFailure(f"{config} states no Whisper dimensions (n_mels, n_audio_ctx, "
                            "...): it is not an mlx-whisper conversion")
    return MlxWhisperEngine(path, options)
