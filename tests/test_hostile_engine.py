"""Hostile input to the engines (issue 10, items 7, 12 and 13): numbers that crashed llama.cpp
or the machine, binary and closed stdin, and the default thread count under contention.

End-to-end cases run the installed `llmctl` on the real SmolLM2 model inside the sandbox
(tests/hostile.py); the free-core computation is tested with its inputs passed in. No test
here times anything: the contention figures live in benchmarks/contention.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PARIS, Runner, llmctl_executable
from hostile import Sandbox, one_line_error

from llmctl import host
from llmctl.engines.text import (
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    GenerationOptions,
    LoadOptions,
)
from llmctl.errors import UsageError
from llmctl.host import CpuSample

TRAINED = 8192  # SmolLM2-135M's llama.context_length


def run_bytes(*args: str, stdin: bytes, cwd: Path) -> subprocess.CompletedProcess:
    """The installed llmctl with raw bytes on stdin (the `llmctl` fixture sends text)."""
    result = subprocess.run([llmctl_executable(), *args], input=stdin, capture_output=True,
                            timeout=300, cwd=cwd)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode("utf-8", errors="replace"),
                                       result.stderr.decode("utf-8", errors="replace"))


def run_stdin_closed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`llmctl ARGS <&-`, as a shell runs it: file descriptor 0 closed."""
    return subprocess.run(["sh", "-c", 'exec "$0" "$@" <&-', llmctl_executable(), *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def done_event(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


# -- --ctx ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ctx", ["4294967312", str(TRAINED + 1)])
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_context_beyond_the_trained_one_is_refused(llmctl: Runner, sandbox: Sandbox,
                                                     gguf_copy: Path, ctx: str,
                                                     force: list[str]) -> None:
    # 4294967312 is 2^32 + 16: it wrapped round to 16 in ctypes and llama.cpp aborted
    # (exit 134). Refused before the memory estimate, so --force changes nothing.
    result = llmctl("run", str(gguf_copy), "--ctx", ctx, *force, "hi")
    line = one_line_error(result, 2)
    assert f"--ctx {ctx}" in line and f"{TRAINED} tokens the model was trained for" in line
    assert f"use --ctx {TRAINED} or less" in line
    assert result.stdout == ""


def test_the_trained_context_itself_is_accepted(llmctl: Runner, sandbox: Sandbox,
                                                gguf_copy: Path) -> None:
    result = llmctl("run", str(gguf_copy), "--ctx", str(TRAINED), "--temperature", "0", PARIS)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_a_folder_models_context_is_bounded_by_its_config(llmctl: Runner, sandbox: Sandbox,
                                                          tmp_path: Path) -> None:
    # The MLX engine's models (config.json folders) get the same bound, checked before
    # anything loads: here a folder no engine could even run.
    folder = tmp_path / "folder-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "max_position_embeddings": 2048, "num_hidden_layers": 2,
        "num_attention_heads": 4, "hidden_size": 64, "vocab_size": 100}))
    (folder / "model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")
    line = one_line_error(llmctl("run", str(folder), "--ctx", "4096", "hi"), 2)
    assert "2048 tokens the model was trained for" in line and "--ctx 2048" in line


def test_a_small_context_is_honoured_not_padded(llmctl: Runner, sandbox: Sandbox,
                                                gguf_copy: Path) -> None:
    # llama.cpp pads its context to 256 cells; --ctx 48 still means 48 tokens in all.
    done = done_event(llmctl("run", str(gguf_copy), "--ctx", "48", "--temperature", "0",
                             "--json", PARIS))
    assert done["prompt_tokens"] + done["generated_tokens"] == 48
    assert done["stop_reason"] == "length"
    line = one_line_error(llmctl("run", str(gguf_copy), "--ctx", "16", PARIS), 2)
    assert "the context holds 16" in line and "raise --ctx" in line


def test_the_engine_refuses_a_wrapping_context_from_a_library_caller(smollm2_gguf: Path
                                                                     ) -> None:
    from llmctl.engines import llama

    with pytest.raises(UsageError, match=f"{TRAINED} tokens"):
        llama.load(smollm2_gguf, LoadOptions(context_length=2**32 + 16))
    engine = llama.load(smollm2_gguf, LoadOptions(context_length=16, threads=10_000))
    try:
        assert engine.context_length == 16
        assert engine.threads == host.cpu_limit()
    finally:
        engine.close()


# -- --threads -----------------------------------------------------------------------------

def test_too_many_threads_are_clamped_with_a_note(llmctl: Runner, sandbox: Sandbox,
                                                  gguf_copy: Path) -> None:
    result = llmctl("run", str(gguf_copy), "--threads", "10000", "--temperature", "0",
                    "--verbose", PARIS)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    limit = host.cpu_limit()
    assert (f"note: --threads 10000 is more than the {limit} CPUs this process may use; "
            f"using {limit}") in result.stderr
    assert f"threads:           {limit}\n" in result.stderr


def test_the_default_thread_count_is_reported(llmctl: Runner, sandbox: Sandbox,
                                              gguf_copy: Path) -> None:
    result = llmctl("run", str(gguf_copy), "--temperature", "0", "--verbose", PARIS)
    assert result.returncode == 0, result.stderr
    used = [line for line in result.stderr.splitlines() if line.startswith("threads:")]
    assert len(used) == 1 and 1 <= int(used[0].split()[-1]) <= host.usable_cpu_count()
    assert "note:" not in result.stderr


# -- sampling options ----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "chat"])
@pytest.mark.parametrize(("option", "value", "bound"), [
    ("--temperature", "nan", "from 0 to 100"),
    ("--temperature", "inf", "from 0 to 100"),
    ("--temperature", "1e39", "from 0 to 100"),  # infinity once in float32
    ("--top-p", "nan", "from 0 to 1"),
    ("--seed", "4294967295", "from 0 to 4294967294"),  # LLAMA_DEFAULT_SEED: "random"
    ("--seed", str(2**32 + 42), "from 0 to 4294967294"),  # was masked to 42
    ("--top-k", str(2**40), "from 0 to 2147483647"),
])
def test_values_no_engine_can_sample_with_are_refused_before_loading(
        llmctl: Runner, sandbox: Sandbox, command: str, option: str, value: str,
        bound: str) -> None:
    result = llmctl(command, "smollm2", option, value, input=f"{PARIS}\n")
    line = one_line_error(result, 2)
    assert f"{option} {value}" in line or f"{option} {float(value)}" in line
    assert bound in line
    assert sandbox.stored(llmctl) == []  # refused before the model was even pulled


def test_the_largest_seed_reproduces(llmctl: Runner, sandbox: Sandbox, gguf_copy: Path
                                     ) -> None:
    args = ("run", str(gguf_copy), "--temperature", "0.9", "--max-tokens", "30",
            "--seed", "4294967294", "Tell me a story")
    first, second = llmctl(*args), llmctl(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and len(first.stdout.split()) > 5


@pytest.mark.parametrize("options", [
    {"temperature": math.nan}, {"temperature": math.inf}, {"top_p": math.nan},
    {"min_p": math.nan}, {"seed": MAX_SEED + 1}, {"seed": -1}, {"top_k": -1},
    {"max_tokens": 0},
])
def test_generation_options_validate(options: dict) -> None:
    with pytest.raises(UsageError):
        GenerationOptions(**options).validate()


def test_generation_options_at_their_bounds_are_kept() -> None:
    kept = GenerationOptions(temperature=MAX_TEMPERATURE, top_p=1.0, top_k=MAX_TOP_K,
                             seed=MAX_SEED, max_tokens=1)
    assert kept.validate() is kept


@pytest.mark.parametrize("engine_module", ["llmctl.engines.llama", "llmctl.engines.mlx"])
def test_both_engines_validate_before_each_reply(engine_module: str) -> None:
    """A library caller handing an engine NaN gets the same UsageError as the command line,
    before anything reaches llama.cpp or MLX (here: before the engine's library is used)."""
    import importlib

    module = importlib.import_module(engine_module)
    cls = module.LlamaEngine if engine_module.endswith("llama") else module.MlxEngine
    engine = cls.__new__(cls)
    engine.lib, engine.n_ctx = SimpleNamespace(mx=None), 100
    with pytest.raises(UsageError, match="--temperature nan"):
        next(engine.generate_from_tokens([1, 2], GenerationOptions(temperature=math.nan)))


def test_mlx_turns_a_top_k_past_the_vocabulary_off() -> None:
    """mlx-lm raises for top_k >= the vocabulary; keeping that many tokens keeps them all."""
    from llmctl.engines import mlx
    from llmctl.formats import hf

    asked = {}

    def make_sampler(**kwargs: object) -> None:
        asked.update(kwargs)

    fake_mx = SimpleNamespace(random=SimpleNamespace(seed=lambda s: None),
                              array=lambda tokens: tokens, get_peak_memory=lambda: 0)
    engine = mlx.MlxEngine.__new__(mlx.MlxEngine)
    engine.lib = SimpleNamespace(mx=fake_mx, make_sampler=make_sampler,
                                 generate_step=lambda *a, **k: (s for s in ()),
                                 cache=SimpleNamespace(make_prompt_cache=lambda model: []))
    engine._prompt_cache = None
    engine.n_ctx, engine.vocabulary, engine.eos_ids, engine.load_seconds = 100, 50, {0}, 0.0
    engine.model = None
    engine.tokenizer = SimpleNamespace(detokenizer=SimpleNamespace(
        add_token=lambda t: None, finalize=lambda: None, last_segment=""))
    for top_k, passed in ((50, 0), (10**6, 0), (49, 49), (0, 0)):
        list(engine.generate_from_tokens([1], GenerationOptions(temperature=0.7, top_k=top_k)))
        assert asked["top_k"] == passed
    assert hf.vocabulary({"vocab_size": 49152}) == 49152  # what the engine reads it with
    assert hf.vocabulary({"text_config": {"vocab_size": 7}}) == 7


# -- LLMCTL_MEMORY_LIMIT -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "0G", "0.0001"])
def test_a_zero_memory_limit_is_an_error_not_unset(llmctl: Runner, sandbox: Sandbox,
                                                   gguf_copy: Path, value: str) -> None:
    result = llmctl("run", str(gguf_copy), "hi", env={"LLMCTL_MEMORY_LIMIT": value})
    line = one_line_error(result, 2)
    assert f"LLMCTL_MEMORY_LIMIT={value!r}" in line and "above zero" in line
    assert "unset LLMCTL_MEMORY_LIMIT" in line


def test_memory_limit_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCTL_MEMORY_LIMIT", "0")
    with pytest.raises(UsageError, match="leaves no memory"):
        host.usable_memory_bytes()
    monkeypatch.setenv("LLMCTL_MEMORY_LIMIT", "1")  # one byte is a limit: everything refused
    assert host.usable_memory_bytes() == 1
    monkeypatch.setenv("LLMCTL_MEMORY_LIMIT", "")  # empty is unset, as for any variable
    assert host.usable_memory_bytes() != 0


# -- stdin ---------------------------------------------------------------------------------

def test_binary_stdin_to_run_is_read_with_replacements(sandbox: Sandbox, gguf_copy: Path,
                                                       tmp_path: Path) -> None:
    # `head -c 1000 /dev/urandom | llmctl run smollm2 hi` was a UnicodeEncodeError.
    noise = random.Random(0).randbytes(1000)
    result = run_bytes("run", str(gguf_copy), "--max-tokens", "5", "hi", stdin=noise,
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr
    text = b"My cat is called Whiskers\xff\xfe and she is three years old.\n"
    result = run_bytes("run", str(gguf_copy), "--temperature", "0",
                       "What is the cat's name? Answer with the name only.", stdin=text,
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Whiskers" in result.stdout


def test_binary_stdin_to_chat_is_read_with_replacements(sandbox: Sandbox, gguf_copy: Path,
                                                        tmp_path: Path) -> None:
    lines = PARIS.encode() + b"\xff\xc3\n" + random.Random(1).randbytes(200) + b"\n"
    result = run_bytes("chat", str(gguf_copy), "--temperature", "0", "--max-tokens", "20",
                       stdin=lines, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout.splitlines()[0]


def test_chat_with_stdin_closed_is_a_usage_error(sandbox: Sandbox, gguf_copy: Path,
                                                 tmp_path: Path) -> None:
    line = one_line_error(run_stdin_closed("chat", str(gguf_copy), cwd=tmp_path), 2)
    assert "stdin is closed" in line and "llmctl chat MODEL" in line


def test_run_with_stdin_closed_answers_its_argument(sandbox: Sandbox, gguf_copy: Path,
                                                    tmp_path: Path) -> None:
    result = run_stdin_closed("run", str(gguf_copy), "--temperature", "0", PARIS,
                              cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


# -- free cores: the default thread count --------------------------------------------------

def test_cpu_max_parsing() -> None:
    assert host.parse_cpu_max("max 100000\n") is None
    assert host.parse_cpu_max("150000 100000\n") == 1.5
    assert host.parse_cpu_max("200000") == 2.0  # the period defaults to 100000
    assert host.parse_cpu_max("") is None
    assert host.parse_cpu_max("lots 100000") is None
    assert host.parse_cpu_max("0 100000") is None
    assert host.parse_cfs_quota("-1\n", "100000\n") is None
    assert host.parse_cfs_quota("50000\n", "100000\n") == 0.5


def test_cpu_quota_is_the_tightest_along_the_cgroup_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    leaf, parent, v1 = tmp_path / "leaf", tmp_path / "parent", tmp_path / "v1"
    for folder in (leaf, parent, v1):
        folder.mkdir()
    (leaf / "cpu.max").write_text("max 100000\n")
    (parent / "cpu.max").write_text("300000 100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    monkeypatch.setattr(host, "_cgroup_folders",
                        lambda controller: [(leaf, 2), (parent, 2), (v1, 1),
                                            (tmp_path / "missing", 2)])
    assert host.cpu_quota() == 2.5
    monkeypatch.setattr(host, "_cgroup_folders", lambda controller: [(leaf, 2)])
    assert host.cpu_quota() is None


def test_affinity_and_quota_bound_the_thread_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "allowed_cpus", lambda: set(range(8)))
    monkeypatch.setattr(host, "physical_cores", lambda cpus: len(cpus) // 2)
    monkeypatch.setattr(host, "cpu_quota", lambda: None)
    assert (host.cpu_limit(), host.usable_cpu_count()) == (8, 4)
    monkeypatch.setattr(host, "cpu_quota", lambda: 1.5)  # rounded up: 2 CPUs' worth
    assert (host.cpu_limit(), host.usable_cpu_count()) == (2, 2)
    monkeypatch.setattr(host, "cpu_quota", lambda: 0.2)
    assert (host.cpu_limit(), host.usable_cpu_count()) == (1, 1)
    monkeypatch.setattr(host, "cpu_quota", lambda: None)
    monkeypatch.setattr(host, "allowed_cpus", lambda: set(range(1000)))
    assert host.cpu_limit() == host.MAX_THREADS  # ggml's own maximum


def test_load_options_clamp_threads_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "cpu_limit", lambda: 3)
    options, notes = LoadOptions(threads=10_000).validate(TRAINED)
    assert options.threads == 3 and notes == [
        "--threads 10000 is more than the 3 CPUs this process may use; using 3"]
    assert LoadOptions(threads=3).validate(TRAINED) == (LoadOptions(threads=3), [])
    assert LoadOptions().validate(None) == (LoadOptions(), [])
    with pytest.raises(UsageError, match="llmctl's limit of 16777216 tokens"):
        LoadOptions(context_length=2**32 + 16).validate(None)
    with pytest.raises(UsageError, match="smallest context"):
        LoadOptions(context_length=8).validate(TRAINED)


PROC_STAT = """cpu  300 0 60 340 10 0 0 0 0 0
cpu0 100 0 20 70 5 0 0 5 0 0
cpu1 200 0 40 270 5 0 0 0 0 0
cpu2 0 0 0 0 0 0 0 0 0 0
intr 1 2 3
"""


def test_proc_stat_counts_only_the_allowed_cpus() -> None:
    # busy = user + nice + system + irq + softirq + steal; idle and iowait are not busy.
    assert host.parse_proc_stat(PROC_STAT, {0}) == (125, 200, 1)
    assert host.parse_proc_stat(PROC_STAT, {0, 1}) == (365, 715, 2)
    assert host.parse_proc_stat(PROC_STAT, None) == (365, 715, 3)
    assert host.parse_proc_stat(PROC_STAT, {7}) is None
    assert host.parse_proc_stat("", None) is None


def sample(busy: int, total: int, own: float, at: float, cpus: int = 2) -> CpuSample:
    return CpuSample(busy=busy, total=total, own=own, at=at, cpus=cpus)


def test_busy_elsewhere_subtracts_this_process() -> None:
    # 1 s on 2 CPUs (200 ticks), 150 of them busy, 0.5 s of it ours: others kept 1 CPU.
    before, after = sample(0, 0, 0.0, 10.0), sample(150, 200, 0.5, 11.0)
    assert host.busy_elsewhere(before, after) == pytest.approx(1.0)
    assert host.busy_elsewhere(before, sample(150, 200, 2.0, 11.0)) == 0.0  # never < 0
    assert host.busy_elsewhere(before, sample(1, 2, 0.0, 10.01)) is None  # too short


@pytest.mark.parametrize(("cores", "cpus", "busy", "threads"), [
    (2, 2, None, 2),  # unknown: every physical core
    (2, 2, 0.0, 2),
    (2, 2, 0.3, 2),  # a little noise takes nothing
    (2, 2, 0.5, 1),  # half a CPU's worth counts as a CPU taken
    (2, 2, 1.0, 1),  # the case of the issue: one core busy elsewhere
    (2, 2, 7.5, 1),  # never below one
    (4, 8, 2.0, 4),  # hardware threads left: the physical cores all run
    (4, 8, 6.0, 2),
])
def test_free_threads(cores: int, cpus: int, busy: float | None, threads: int) -> None:
    assert host.free_threads(cores, cpus, busy) == threads


def test_default_threads_from_cpu_counters_or_the_load_average(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "usable_cpu_count", lambda: 2)
    monkeypatch.setattr(host, "cpu_limit", lambda: 2)
    clock = {"now": 100.0}
    slept = []
    monkeypatch.setattr(host.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(host.time, "sleep", slept.append)
    # A window as long as the load: others kept one CPU busy.
    monkeypatch.setattr(host, "sample_cpu", lambda: sample(150, 200, 0.5, 101.0))
    clock["now"] = 101.0
    assert host.default_threads(sample(0, 0, 0.0, 100.0)) == (1, pytest.approx(1.0))
    assert slept == []
    # A model that loaded in 20 ms: the rest of the shortest window is waited out.
    clock["now"] = 100.02
    host.default_threads(sample(0, 0, 0.0, 100.0))
    assert slept == [pytest.approx(host.MIN_WINDOW - 0.02)]
    # Without CPU counters (macOS): the 1-minute load average.
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.5, 0.1))
    assert host.default_threads(None) == (1, 1.2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.5, 0.1))
    assert host.default_threads(None) == (2, 0.1)


def test_a_real_sample_of_this_machine() -> None:
    first = host.sample_cpu()
    if first is None:
        pytest.skip("no /proc/stat here")
    assert 1 <= first.cpus <= (os.cpu_count() or 1) and 0 <= first.busy <= first.total
    threads, busy = host.default_threads(first)
    assert 1 <= threads <= host.usable_cpu_count() and busy is not None and busy >= 0


def test_the_default_follows_other_processes_between_replies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`chat` with the default thread count looks again before a reply that follows a
    pause: a process started meanwhile takes a core, one that ended gives it back."""
    from llmctl.engines import llama

    calls = []
    engine = llama.LlamaEngine.__new__(llama.LlamaEngine)
    engine.lib = SimpleNamespace(llama_set_n_threads=lambda ctx, n, nb: calls.append((n, nb)),
                                 llama_free=lambda ctx: None)
    engine.ctx, engine.threads, engine.auto_threads = "ctx", 2, True
    now = 1000.0
    monkeypatch.setattr(llama.time, "monotonic", lambda: now)
    monkeypatch.setattr(llama, "sample_cpu", lambda: sample(0, 0, 0.0, now))
    chosen = {"threads": 1}
    monkeypatch.setattr(llama, "default_threads", lambda since: (chosen["threads"], None))
    engine._idle_since = sample(0, 0, 0.0, now - 0.5)  # replies back to back: kept
    engine._recheck_threads()
    assert calls == [] and engine.threads == 2
    engine._idle_since = sample(0, 0, 0.0, now - 3)  # after a pause: one core taken
    engine._recheck_threads()
    assert calls == [(1, 1)] and engine.threads == 1
    chosen["threads"] = 2
    engine._idle_since = sample(0, 0, 0.0, now - 60)  # given back after a long pause
    engine._recheck_threads()
    assert calls == [(1, 1), (2, 2)] and engine.threads == 2
    engine.auto_threads, engine._idle_since = False, None  # --threads given: never changed
    engine._recheck_threads()
    assert len(calls) == 2
