"""`llmctl batch` end to end on the real SmolLM2: parallel sequences equal to `run`, per-line
errors, resuming after kill -9, JSON schemas, progress."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import PARIS, Runner, error_line, llmctl_executable

from llmctl.batch.lines import LineError, Prompt, read_prompts
from llmctl.engines.llama import LlamaEngine
from llmctl.engines.parallel import Failed, Request, generate_many
from llmctl.engines.text import Done, GenerationOptions, LoadOptions, Message, Token

SUBJECTS = ["France", "Japan", "Italy", "Spain", "Germany", "Egypt", "Canada", "Peru",
            "Kenya", "Norway"]
QUESTIONS = ["What is the capital of {}? Answer in one sentence.",
             "Name one famous food from {}.",
             "Write a four-word slogan about {}.",
             "Which ocean or sea is nearest to {}? One word."]
PROMPTS = [q.format(s) for q in QUESTIONS for s in SUBJECTS]  # 40, of varied lengths
GREEDY = GenerationOptions(temperature=0, max_tokens=32)
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def _jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def _results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def single(smollm2_gguf: Path) -> dict[str, str]:
    """Each prompt's reply from one lone sequence: the loop `llmctl run` runs."""
    engine = LlamaEngine(smollm2_gguf, LoadOptions())
    try:
        replies = {}
        for prompt in PROMPTS:
            events = list(engine.generate([Message("user", prompt)], GREEDY))
            replies[prompt] = "".join(e.text for e in events if isinstance(e, Token))
        return replies
    finally:
        engine.close()


def test_parallel_sequences_give_each_prompt_what_one_sequence_gives(
        smollm2_gguf: Path, single: dict[str, str]) -> None:
    engine = LlamaEngine(smollm2_gguf, LoadOptions(sequences=4))
    try:
        requests = [Request(p, engine.prompt_tokens([Message("user", p)]), GREEDY)
                    for p in PROMPTS]
        texts: dict[str, list[str]] = {}
        order, done = [], []
        for key, event in generate_many(engine, requests, 4):
            order.append(key)
            if isinstance(event, Token):
                texts.setdefault(key, []).append(event.text)
            else:
                assert isinstance(event, Done), event
                done.append(key)
    finally:
        engine.close()
    assert sorted(done) == sorted(PROMPTS)
    assert {key: "".join(parts) for key, parts in texts.items()} == single
    # The replies interleave: several sequences advance in the same steps.
    assert len({order.index(p) for p in PROMPTS[:4]}) == 4 and order[:4] != [PROMPTS[0]] * 4


def test_batch_command_equals_run_for_every_prompt(
        llmctl: Runner, tmp_path: Path, single: dict[str, str]) -> None:
    prompts = _jsonl(tmp_path / "prompts.jsonl",
                     [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    out = tmp_path / "results.jsonl"
    result = llmctl("batch", "smollm2", str(prompts), "-o", str(out), "--parallel", "4",
                    "--temperature", "0", "--max-tokens", "32")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # results go to the file
    records = _results(out)
    assert sorted(r["id"] for r in records) == list(range(40))
    for record in records:
        assert set(record) == {"id", "text", "stop_reason", "prompt_tokens",
                               "generated_tokens", "seconds"}
        assert record["text"] == single[PROMPTS[record["id"]]], record
        assert record["stop_reason"] in ("stop", "length") and record["seconds"] > 0
    # And `llmctl run` itself, for a few of them.
    for i in (0, 13, 27):
        run = llmctl("run", "smollm2", "--temperature", "0", "--max-tokens", "32", PROMPTS[i])
        assert run.returncode == 0, run.stderr
        assert run.stdout == next(r["text"] for r in records if r["id"] == i) + "\n"
    assert "40/40 prompts" in result.stderr and "tokens/s" in result.stderr


def test_bad_lines_are_reported_per_line_and_the_rest_run(llmctl: Runner,
                                                          tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"id": "a", "prompt": PARIS}),
        "{not json",
        json.dumps({"id": "b"}),
        json.dumps({"id": "a", "prompt": "again"}),
        json.dumps({"id": "c", "prompt": PARIS, "max_tokens": "many"}),
        json.dumps({"id": "d", "prompt": PARIS, "temperature": -1}),
        json.dumps({"id": "e", "messages": [{"role": "user", "content": PARIS}]}),
    ]) + "\n")
    result = llmctl("batch", "smollm2", str(prompts), "--temperature", "0",
                    "--max-tokens", "16")
    assert result.returncode == 1, result.stderr
    assert error_line(result) == "error: 5 of 7 prompts failed"
    records = _results_from(result.stdout)
    by_line = {r["line"]: r for r in records if "line" in r}
    assert set(by_line) == {2, 3, 4, 5}
    assert "not JSON" in by_line[2]["error"]
    assert "prompt" in by_line[3]["error"] and by_line[3]["id"] == "b"
    assert "given twice (first on line 1)" in by_line[4]["error"]
    assert "max_tokens must be an integer" in by_line[5]["error"]
    by_id = {r["id"]: r for r in records if "line" not in r}
    assert "temperature" in by_id["d"]["error"] and "text" not in by_id["d"]
    assert "Paris" in by_id["a"]["text"] and by_id["e"]["text"] == by_id["a"]["text"]


def _results_from(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_json_schema_line_gives_a_valid_object(llmctl: Runner, tmp_path: Path) -> None:
    from jsonschema import validate

    prompts = _jsonl(tmp_path / "prompts.jsonl", [
        {"id": 1, "prompt": "Invent a person.", "json_schema": PERSON, "max_tokens": 64},
        {"id": 2, "prompt": PARIS, "max_tokens": 16}])
    result = llmctl("batch", "smollm2", str(prompts), "--temperature", "0", "-p", "2")
    assert result.returncode == 0, result.stderr
    records = {r["id"]: r for r in _results_from(result.stdout)}
    validate(records[1]["object"], PERSON)
    assert json.loads(records[1]["text"]) == records[1]["object"]
    assert "object" not in records[2] and "Paris" in records[2]["text"]


def test_resume_after_kill_9_gives_every_id_exactly_once(llmctl: Runner,
                                                         tmp_path: Path) -> None:
    # Half the prompts, 16 tokens each: enough to kill it midway, in half the time.
    prompts = _jsonl(tmp_path / "prompts.jsonl",
                     [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS[:20])])
    out = tmp_path / "results.jsonl"
    process = subprocess.Popen(
        [llmctl_executable(), "batch", "smollm2", str(prompts), "-o", str(out), "-p", "2",
         "--temperature", "0", "--max-tokens", "16"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the batch ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = out.read_text().count("\n")  # whole lines: what the second run keeps
    assert 4 <= first < 20
    again = llmctl("batch", "smollm2", str(prompts), "-o", str(out), "-p", "2",
                   "--temperature", "0", "--max-tokens", "16")
    assert again.returncode == 0, again.stderr
    assert f"resuming: {first} results" in again.stderr
    counts = Counter(r["id"] for r in _results(out))
    assert set(counts) == {f"q{i}" for i in range(20)} and set(counts.values()) == {1}
    # Nothing left to do: a third run writes nothing.
    size = out.stat().st_size
    third = llmctl("batch", "smollm2", str(prompts), "-o", str(out))
    assert third.returncode == 0, third.stderr
    assert out.stat().st_size == size and "0 prompts to go" in third.stderr
    # --overwrite starts over.
    fresh = llmctl("batch", "smollm2", str(prompts), "-o", str(out), "--overwrite",
                   "--temperature", "0", "--max-tokens", "4")
    assert fresh.returncode == 0, fresh.stderr
    assert len(_results(out)) == 20 and all(r["generated_tokens"] <= 4 for r in _results(out))


def test_an_unfinished_last_line_is_run_again(llmctl: Runner, tmp_path: Path) -> None:
    prompts = _jsonl(tmp_path / "prompts.jsonl",
                     [{"id": 1, "prompt": PARIS}, {"id": 2, "prompt": "Say hello."}])
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps({"id": 1, "text": "x", "stop_reason": "stop"}) + "\n"
                   + '{"id": 2, "text": "cut sho')
    result = llmctl("batch", "smollm2", str(prompts), "-o", str(out), "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    records = _results(out)
    assert [r["id"] for r in records] == [1, 2] and records[1]["text"] != "cut sho"


def test_text_input_from_stdin_to_stdout_with_json_progress(llmctl: Runner) -> None:
    result = llmctl("batch", "smollm2", "--text", "-", "--temperature", "0",
                    "--max-tokens", "12", "--json", input=f"{PARIS}\n\nSay hello.\n")
    assert result.returncode == 0, result.stderr
    records = {r["id"]: r for r in _results_from(result.stdout)}
    assert set(records) == {1, 3}  # ids are line numbers; the blank line is skipped
    assert "Paris" in records[1]["text"]
    events = [json.loads(line) for line in result.stderr.splitlines()
              if line.startswith("{")]
    assert [e["done"] for e in events] == [1, 2] and events[-1]["total"] == 2
    assert events[-1]["generated_tokens"] == sum(r["generated_tokens"]
                                                 for r in records.values())


def test_ctrl_c_exits_130_and_keeps_whole_lines(tmp_path: Path) -> None:
    prompts = _jsonl(tmp_path / "prompts.jsonl",
                     [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    out = tmp_path / "results.jsonl"
    process = subprocess.Popen(
        [llmctl_executable(), "batch", "smollm2", str(prompts), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out.exists() and out.read_text()):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    text = out.read_text()
    assert text.endswith("\n") and all(json.loads(line)["text"] is not None
                                       for line in text.splitlines())


def test_the_memory_guard_counts_every_sequence(llmctl: Runner, tmp_path: Path) -> None:
    prompts = _jsonl(tmp_path / "prompts.jsonl",
                     [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:8])])
    # SmolLM2's 4096-token KV cache is 94 MB a sequence: 8 do not fit in 500 MB, 2 do.
    limit = {"LLMCTL_MEMORY_LIMIT": "560M"}
    refused = llmctl("batch", "smollm2", str(prompts), "-p", "8", env=limit)
    assert refused.returncode == 5, refused.stderr
    assert "fewer --parallel sequences (now 8)" in error_line(refused)
    chosen = llmctl("batch", "smollm2", str(prompts), "-v", "--max-tokens", "4", env=limit)
    assert chosen.returncode == 0, chosen.stderr
    line = next(x for x in chosen.stderr.splitlines() if "sequences at once" in x)
    assert 1 < int(line.split(": ")[1].split()[0]) < 8


def test_reading_lines() -> None:
    items = list(read_prompts([
        '{"id": 7, "messages": [{"role": "system", "content": "Be brief."}, '
        '{"role": "user", "content": "Hi"}], "stop": "END", "seed": 3}',
        '{"prompt": "no id"}',
        '["a list"]',
        '{"id": true, "prompt": "x"}',
        '{"id": 9, "prompt": "x", "max_token": 5}',
        '{"id": 10, "messages": [{"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "Hello"}]}',
    ]))
    first = items[0]
    assert isinstance(first, Prompt) and first.id == 7
    assert first.messages == (Message("system", "Be brief."), Message("user", "Hi"))
    assert first.overrides == {"stop": ["END"], "seed": 3}
    assert isinstance(items[1], Prompt) and items[1].id == 2  # no id: the line number
    assert isinstance(items[2], LineError) and "list" in items[2].message
    assert isinstance(items[3], LineError) and "id must be" in items[3].message
    assert isinstance(items[4], LineError) and "unknown field 'max_token'" in items[4].message
    assert isinstance(items[5], LineError) and "last message" in items[5].message


def test_a_prompt_too_long_for_its_context_fails_alone(smollm2_gguf: Path) -> None:
    engine = LlamaEngine(smollm2_gguf, LoadOptions(context_length=64, sequences=2))
    try:
        short = engine.prompt_tokens([Message("user", "Say hi.")])
        requests = [Request("long", engine.text_tokens("word " * 100), GREEDY),
                    Request("short", short, GenerationOptions(temperature=0, max_tokens=8))]
        events = list(generate_many(engine, requests, 2))
    finally:
        engine.close()
    failed = [e for k, e in events if k == "long"]
    assert len(failed) == 1 and isinstance(failed[0], Failed)
    assert "context holds 64" in str(failed[0].error)
    assert isinstance(events[-1][1], Done) and events[-1][0] == "short"
