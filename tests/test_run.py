"""`llmctl run` end to end: the installed command on the real SmolLM2 model."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from conftest import PARIS, Runner, error_line, llmctl_executable


def test_answers_paris_at_temperature_zero(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--temperature", "0", PARIS)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The capital of France is Paris.\n"
    # The model was not stored yet: it is pulled first, with a note on stderr only.
    assert "pulling" in result.stderr
    assert "\x1b" not in result.stdout + result.stderr  # no escape codes into pipes


def test_stdin_comes_before_the_argument(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--temperature", "0",
                    "What is the cat's name? Answer with the name only.",
                    input="My cat is called Whiskers and she is three years old.\n")
    assert result.returncode == 0, result.stderr
    assert "Whiskers" in result.stdout


def test_prompt_from_stdin_alone(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--temperature", "0", input=PARIS)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_system_prompt_is_used(llmctl: Runner) -> None:
    question = "What is your name?"
    plain = llmctl("run", "smollm2", "--temperature", "0", "--max-tokens", "20", question)
    pirate = llmctl("run", "smollm2", "--temperature", "0", "--max-tokens", "20",
                    "--system", "You are a pirate called Captain Flint.", question)
    assert plain.returncode == pirate.returncode == 0
    assert "Flint" in pirate.stdout and "Flint" not in plain.stdout


def test_json_events_parse_and_add_up(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--temperature", "0", "--json", PARIS)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    tokens = [e for e in events if e["type"] == "token"]
    done = events[-1]
    assert done["type"] == "done" and events.count(done) == 1
    assert "".join(t["text"] for t in tokens) == "The capital of France is Paris."
    assert done["generated_tokens"] == len(tokens)
    assert done["stop_reason"] == "stop"
    assert done["prompt_tokens"] > 10
    assert done["prompt_tokens_per_second"] > 0 and done["generate_tokens_per_second"] > 0
    assert done["model"] == "smollm2:135m" and done["engine"] == "llama"
    assert done["peak_memory_bytes"] > 50_000_000


def test_max_tokens_stops_with_length(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--temperature", "0", "--max-tokens", "5", "--json",
                    "Write a long story about a dragon.")
    done = json.loads(result.stdout.splitlines()[-1])
    assert done["generated_tokens"] == 5 and done["stop_reason"] == "length"


def test_same_seed_same_output(llmctl: Runner) -> None:
    args = ("run", "smollm2", "--temperature", "0.9", "--max-tokens", "40", "Tell me a story")
    first = llmctl(*args, "--seed", "42")
    second = llmctl(*args, "--seed", "42")
    others = {llmctl(*args, "--seed", str(seed)).stdout for seed in (1, 2)}
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert len(first.stdout.split()) > 10
    assert first.stdout not in others  # the seed really drives sampling


def test_verbose_prints_statistics_on_stderr(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--temperature", "0", "--verbose", PARIS)
    assert result.stdout == "The capital of France is Paris.\n"
    for label in ("load duration", "prompt eval rate", "eval rate", "peak memory"):
        assert label in result.stderr


def test_runs_a_gguf_file_by_path_without_storing_it(llmctl: Runner, gguf_copy: Path) -> None:
    result = llmctl("run", str(gguf_copy), "--temperature", "0", PARIS)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert llmctl("ls", "-q").stdout == ""


def test_context_too_small_for_the_prompt(llmctl: Runner) -> None:
    # llama.cpp rounds small contexts up to 256 tokens; this prompt is longer than that.
    result = llmctl("run", "smollm2", "--ctx", "256", "Repeat these words: " + "apple " * 400)
    assert result.returncode == 2
    assert "435 tokens" in error_line(result) and "--ctx" in error_line(result)


def test_no_prompt_is_a_usage_error(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2")
    assert result.returncode == 2
    assert "no prompt" in error_line(result)


def test_ctrl_c_exits_130_and_leaves_no_traceback(llmctl: Runner) -> None:
    assert llmctl("pull", "smollm2").returncode == 0
    process = subprocess.Popen(
        [llmctl_executable(), "run", "smollm2", "--temperature", "0", "--max-tokens", "3000",
         "Write a very long story about a dragon."],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Wait until text streams, then interrupt as a terminal's Ctrl-C would.
    first = process.stdout.read(20)
    assert first
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err
    assert (first + out).endswith("\n")  # the shell prompt starts on a clean line


def json_reply(result: subprocess.CompletedProcess) -> tuple[str, dict]:
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    return "".join(e["text"] for e in events if e["type"] == "token"), events[-1]


def test_stop_sequence_spanning_tokens_ends_the_reply_unprinted(llmctl: Runner) -> None:
    full, _ = json_reply(llmctl("run", "smollm2", "--temperature", "0", "--json", PARIS))
    assert full == "The capital of France is Paris."
    # "l of Fr" spans the tokens of "capital", " of" and " France".
    text, done = json_reply(llmctl("run", "smollm2", "--temperature", "0", "--json",
                                   "--stop", "l of Fr", "--stop", "never", PARIS))
    assert text == "The capita"
    assert done["stop_reason"] == "stop_sequence"
    plain = llmctl("run", "smollm2", "--temperature", "0", "--stop", "Paris", PARIS)
    assert plain.stdout == "The capital of France is \n"
    refused = llmctl("run", "smollm2", "--stop", "", PARIS)
    assert refused.returncode == 2 and "--stop" in error_line(refused)


def test_prompt_and_system_prompt_from_files(llmctl: Runner, tmp_path: Path) -> None:
    (tmp_path / "question.txt").write_text(PARIS + "\n")
    (tmp_path / "pirate.txt").write_text("You are a pirate called Captain Flint.\n")
    answer = llmctl("run", "smollm2", "--temperature", "0", "-f", str(tmp_path / "question.txt"))
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == "The capital of France is Paris.\n"
    pirate = llmctl("run", "smollm2", "--temperature", "0", "--max-tokens", "20",
                    "--system-file", str(tmp_path / "pirate.txt"), "What is your name?")
    assert pirate.returncode == 0 and "Flint" in pirate.stdout
    missing = llmctl("run", "smollm2", "-f", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "nope.txt" in error_line(missing)
    both = llmctl("run", "smollm2", "--system", "x", "--system-file",
                  str(tmp_path / "pirate.txt"), "hi")
    assert both.returncode == 2 and "--system-file" in error_line(both)


def test_stdin_then_files_then_the_argument(llmctl: Runner, tmp_path: Path) -> None:
    # The model repeats the three parts back in the order it was given them.
    (tmp_path / "b.txt").write_text("banana")
    text, _ = json_reply(llmctl(
        "run", "smollm2", "--temperature", "0", "--json", "--max-tokens", "30", "--raw",
        "-f", str(tmp_path / "b.txt"), "cherry\nThe three words above, in order, are:",
        input="apple\n"))
    words = [w for w in ("apple", "banana", "cherry") if w in text]
    assert words == sorted(words, key=text.index) and len(words) >= 2, text


def test_raw_sends_the_prompt_without_the_template(llmctl: Runner) -> None:
    _, templated = json_reply(llmctl("run", "smollm2", "--temperature", "0", "--json",
                                     "--max-tokens", "4", "The capital of France is"))
    text, raw = json_reply(llmctl("run", "smollm2", "--temperature", "0", "--json",
                                  "--max-tokens", "4", "--raw", "The capital of France is"))
    assert raw["prompt_tokens"] < 10 < templated["prompt_tokens"]
    assert "Paris" in text  # a continuation, not an answer
    refused = llmctl("run", "smollm2", "--raw", "--system", "x", "hi")
    assert refused.returncode == 2 and "--raw" in error_line(refused)


def test_verbose_gives_the_time_to_first_token(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--temperature", "0", "--verbose", PARIS)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if "first token after" in line)
    assert float(line.split(":")[1].strip().rstrip("s")) > 0


def test_offline_pulls_nothing_from_the_network(llmctl: Runner, tmp_path: Path) -> None:
    # Every proxy points at a closed port: a connection attempt would fail with another
    # error, after retries; --offline must refuse before any.
    closed = "http://127.0.0.1:9"
    env = {"HTTP_PROXY": closed, "HTTPS_PROXY": closed, "ALL_PROXY": closed,
           "HF_HOME": str(tmp_path / "empty-hf")}
    for model in ("qwen2.5", "hf://org/repo:Q4_K_M", "https://example.com/m.gguf"):
        result = llmctl("--offline", "run", model, "hi", env=env)
        assert result.returncode == 3, result.stderr
        assert "--offline: nothing is downloaded" in error_line(result)
    # A model a local source provides (the pip package) is still pulled: no network.
    local = llmctl("--offline", "run", "smollm2", "--temperature", "0", PARIS, env=env)
    assert local.returncode == 0, local.stderr
    assert local.stdout == "The capital of France is Paris.\n"


def test_gpu_layers_and_the_backend_that_ran(llmctl: Runner) -> None:
    # This llama.cpp build is CPU-only: whatever --gpu-layers asks, nothing is offloaded,
    # and every report says so.
    for layers in ("all", "4"):
        _, done = json_reply(llmctl("run", "smollm2", "--temperature", "0", "--json",
                                    "--gpu-layers", layers, PARIS))
        assert (done["backend"], done["gpu_layers"]) == ("CPU", 0)
    verbose = llmctl("run", "smollm2", "--temperature", "0", "--verbose", PARIS)
    assert "backend:           CPU" in verbose.stderr
    shown = json.loads(llmctl("show", "smollm2", "--json").stdout)
    assert shown["backend"] == "CPU"
    for bad in ("-1", "some"):
        refused = llmctl("run", "smollm2", "--gpu-layers", bad, PARIS)
        assert refused.returncode == 2 and "--gpu-layers" in error_line(refused)
