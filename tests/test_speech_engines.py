"""The speech engines against their libraries, through the one transcription loop: the real
CTranslate2 Whisper tiny on faster-whisper, and tiny random-weight models built here
(tests/whisper_models.py) on mlx-whisper and whisper.cpp, all on real speech made by
espeak-ng. Random weights say random words: for them only the events' structure is judged."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from speech import espeak, word_error_rate
from whisper_models import ENGLISH_ONLY, make_ggml_whisper, make_mlx_whisper

from llmctl.engines import registry
from llmctl.engines.audio import decode
from llmctl.engines.speech import (
    LANGUAGES,
    Audio,
    Detected,
    Segment,
    SpeechEngine,
    SpeechLoadOptions,
    SpeechRequest,
    Transcribed,
    transcribe,
)
from llmctl.errors import EngineFailure, UsageError

SENTENCE = "The capital of France is Paris."
MAX_WER = 0.3
SLACK = 0.5  # seconds a time may pass the end of the audio (the loop's rounding, not more)
RANDOM_ENGINES = ("mlx-whisper", "whisper.cpp")


@pytest.fixture(scope="session")
def paris(tmp_path_factory: pytest.TempPathFactory) -> Audio:
    return decode(str(espeak(tmp_path_factory.mktemp("speech") / "paris.wav", SENTENCE)))


@pytest.fixture(scope="session")
def mlx_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mlx_whisper(tmp_path_factory.mktemp("mlx-whisper") / "whisper-tiny-random")


@pytest.fixture(scope="session")
def ggml_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ggml_whisper(tmp_path_factory.mktemp("ggml") / "ggml-tiny-random.bin")


def load(engine: str, path: Path, options: SpeechLoadOptions | None = None) -> SpeechEngine:
    """Through the registry, as `llmctl transcribe` does."""
    return registry.load_speech_engine(registry.get_spec(engine), path,
                                       options or SpeechLoadOptions())


@pytest.fixture(scope="session")
def engines(mlx_folder: Path, ggml_file: Path, whisper_ct2: Path
            ) -> Iterator[dict[str, SpeechEngine]]:
    """Each engine loaded once for the session."""
    loaded = {"mlx-whisper": load("mlx-whisper", mlx_folder),
              "whisper.cpp": load("whisper.cpp", ggml_file),
              "faster-whisper": load("faster-whisper", whisper_ct2)}
    yield loaded
    for engine in loaded.values():
        engine.close()


def run(engine: SpeechEngine, audio: Audio, request: SpeechRequest
        ) -> tuple[Detected, list[Segment], Transcribed]:
    """The loop's events, checked for their order and structure."""
    events = list(transcribe(engine, audio, request))
    first, *segments, last = events
    assert isinstance(first, Detected), events
    assert first.language in LANGUAGES
    assert first.probability is None or 0.0 <= first.probability <= 1.0
    assert isinstance(last, Transcribed), events
    assert all(isinstance(s, Segment) for s in segments), events
    for segment in segments:
        assert isinstance(segment.text, str)
        assert isinstance(segment.start, float) and isinstance(segment.end, float)
        assert 0.0 <= segment.start <= segment.end <= audio.seconds + SLACK, segment
        for word in segment.words:
            assert isinstance(word.word, str) and isinstance(word.start, float)
            assert 0.0 <= word.start <= word.end <= audio.seconds + SLACK, word
            assert 0.0 <= word.probability <= 1.0
    stats = last.stats
    assert stats.audio_seconds == audio.seconds > 0
    assert stats.processing_seconds > 0
    assert stats.engine == engine.name and stats.device == engine.device
    assert stats.segments == len(segments) and last.segments == tuple(segments)
    assert stats.language == first.language
    return first, segments, last


# -- the random-weight engines: structure ---------------------------------------------------

@pytest.mark.parametrize("name", RANDOM_ENGINES)
def test_detected_comes_first_then_segments_then_the_stats(
        name: str, engines: dict[str, SpeechEngine], paris: Audio) -> None:
    detected, segments, _ = run(engines[name], paris, SpeechRequest())
    assert detected.language  # detected (random weights: any language)
    assert segments, "the model built for the tests decodes one segment per window"
    assert engines[name].device == "cpu"


@pytest.mark.parametrize("name", RANDOM_ENGINES)
def test_every_option_is_taken(name: str, engines: dict[str, SpeechEngine],
                               paris: Audio) -> None:
    detected, _, _ = run(engines[name], paris, SpeechRequest(
        language="fr", task="translate", initial_prompt="Paris, France.", temperature=0.4,
        beam_size=1))
    assert detected == Detected("fr")  # given: not detected, so no probability
    # mlx-whisper has no beam search: the default beam of 5 decodes greedily there
    _, segments, _ = run(engines[name], paris, SpeechRequest(word_timestamps=True, beam_size=5))
    assert any(s.words for s in segments)


@pytest.mark.parametrize("name", RANDOM_ENGINES)
def test_closing_the_stream_early_stops_the_work(
        name: str, engines: dict[str, SpeechEngine], paris: Audio) -> None:
    engine = engines[name]
    samples = np.tile(paris.samples, 250)  # about 10 minutes: 20 windows
    long = Audio("long", samples, samples.size / 16_000)
    events = transcribe(engine, long, SpeechRequest())
    assert isinstance(next(events), Detected)
    assert isinstance(next(events), Segment)
    started = time.perf_counter()
    events.close()
    assert time.perf_counter() - started < 2.0
    assert not [t for t in threading.enumerate() if t.name == name]
    if name == "whisper.cpp":  # whisper.cpp stopped where it was, not at the end
        import _pywhispercpp as pw

        assert pw.whisper_full_n_segments(engine.ctx) < 10
    run(engine, paris, SpeechRequest())  # and the engine is as good as before


@pytest.mark.parametrize("name", RANDOM_ENGINES)
def test_the_library_writes_nothing_to_stderr(
        name: str, mlx_folder: Path, ggml_file: Path, paris: Audio,
        capfd: pytest.CaptureFixture[str]) -> None:
    engine = load(name, mlx_folder if name == "mlx-whisper" else ggml_file)
    try:
        run(engine, paris, SpeechRequest(word_timestamps=True))
    finally:
        engine.close()
    assert capfd.readouterr().err == ""  # whisper.cpp's C log included (file descriptor 2)


def test_engine_modules_import_their_libraries_only_when_used() -> None:
    code = ("import sys, llmctl.engines.mlx_whisper, llmctl.engines.whisper_cpp; "
            "print(' '.join(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    loaded = {name.split(".")[0] for name in result.stdout.split()}
    assert not loaded & {"mlx", "mlx_whisper", "pywhispercpp", "_pywhispercpp", "numpy"}


@pytest.mark.parametrize("name", RANDOM_ENGINES)
def test_build_backend_names_where_it_computes(name: str) -> None:
    assert registry.backend(registry.get_spec(name)) == "CPU"  # no Metal on this machine


# -- models the libraries refuse, options the engines cannot honour ---------------------------

def test_a_bin_that_is_not_ggml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_weights.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(200))  # a zip (PyTorch's pickle archive)
    with pytest.raises(EngineFailure, match="is not a whisper.cpp ggml model"):
        load("whisper.cpp", path)


@pytest.mark.parametrize("cut", [200, 3_000_000], ids=["in-the-header", "in-the-tensors"])
def test_a_truncated_ggml_file_is_refused(cut: int, ggml_file: Path, tmp_path: Path) -> None:
    # Cut before its first tensor, whisper.cpp would load it as an empty test model.
    path = tmp_path / "ggml-truncated.bin"
    path.write_bytes(ggml_file.read_bytes()[:cut])
    with pytest.raises(EngineFailure, match="whisper.cpp could not open"):
        load("whisper.cpp", path)


def test_an_mlx_folder_without_weights_is_refused(mlx_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((mlx_folder / "config.json").read_bytes())
    with pytest.raises(EngineFailure, match="is not an mlx-whisper folder"):
        load("mlx-whisper", tmp_path)


def test_mlx_weights_lacking_tensors_are_refused(mlx_folder: Path, tmp_path: Path) -> None:
    import mlx.core as mx

    stored = mx.load(str(mlx_folder / "weights.safetensors"))
    mx.save_safetensors(str(tmp_path / "weights.safetensors"),
                        {k: v for k, v in stored.items() if not k.startswith("decoder.")})
    (tmp_path / "config.json").write_bytes((mlx_folder / "config.json").read_bytes())
    with pytest.raises(EngineFailure, match="lacks .* of the model's tensors"):
        load("mlx-whisper", tmp_path)


@pytest.mark.parametrize("name", RANDOM_ENGINES)
def test_vad_is_a_usage_error(name: str, engines: dict[str, SpeechEngine],
                              paris: Audio) -> None:
    with pytest.raises(UsageError, match=f"--vad is not available on the {name} engine") as info:
        list(transcribe(engines[name], paris, SpeechRequest(vad=True)))
    assert info.value.hint


@pytest.mark.parametrize(("name", "options", "message"), [
    ("mlx-whisper", SpeechLoadOptions(device="cuda"), "--device cuda is not one"),
    ("mlx-whisper", SpeechLoadOptions(device="gpu"), "no GPU backend"),
    ("mlx-whisper", SpeechLoadOptions(compute_type="int8"), "--compute-type is not available"),
    ("mlx-whisper", SpeechLoadOptions(threads=2), "--threads is not available"),
    ("whisper.cpp", SpeechLoadOptions(device="cuda"), "on the CPU"),
    ("whisper.cpp", SpeechLoadOptions(compute_type="int8"), "--compute-type is not available"),
])
def test_options_an_engine_cannot_honour_are_usage_errors(
        name: str, options: SpeechLoadOptions, message: str, mlx_folder: Path,
        ggml_file: Path) -> None:
    with pytest.raises(UsageError, match=message) as info:
        load(name, mlx_folder if name == "mlx-whisper" else ggml_file, options)
    assert info.value.hint


def test_whisper_cpp_takes_threads(ggml_file: Path, paris: Audio) -> None:
    engine = load("whisper.cpp", ggml_file, SpeechLoadOptions(device="cpu", threads=1))
    try:
        run(engine, paris, SpeechRequest(beam_size=1))
    finally:
        engine.close()


# -- faster-whisper on the real model: the words -------------------------------------------

def test_faster_whisper_hears_the_sentence(engines: dict[str, SpeechEngine],
                                           paris: Audio) -> None:
    detected, segments, _ = run(engines["faster-whisper"], paris, SpeechRequest())
    assert detected.language == "en"
    heard = " ".join(s.text for s in segments)
    assert word_error_rate(SENTENCE, heard) <= MAX_WER, heard


@pytest.mark.parametrize("name", RANDOM_ENGINES)
def test_an_english_only_model_is_english_and_only_that(
        name: str, paris: Audio, tmp_path: Path) -> None:
    if name == "mlx-whisper":
        engine = load(name, make_mlx_whisper(tmp_path / "tiny.en", dims=ENGLISH_ONLY))
    else:
        engine = load(name, make_ggml_whisper(tmp_path / "ggml-tiny.en.bin", dims=ENGLISH_ONLY))
    try:
        detected, _, _ = run(engine, paris, SpeechRequest())
        assert detected == Detected("en", only=True)  # nothing detected: no probability
        for request in (SpeechRequest(language="fr"), SpeechRequest(task="translate")):
            with pytest.raises(UsageError, match="English only"):
                list(transcribe(engine, paris, request))
    finally:
        engine.close()
