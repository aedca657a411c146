"""`llmctl bench` end to end on the real SmolLM2 (llama.cpp), its MLX conversion and the
tiny random Stable Diffusion pipeline. Sizes stay small (a few tokens, two repetitions):
what is checked is the measuring and the writing, never a speed."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import statistics
from pathlib import Path

import pytest
from conftest import Converted, Runner, error_line
from hostile import one_line_error

from llmctl.bench import history
from llmctl.bench.history import History

pytestmark = pytest.mark.e2e

SMALL = ("-p", "32", "-n", "4", "-r", "2", "--no-load")


def rows_of(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def by_test(rows: list[dict]) -> dict[str, dict]:
    return {(r["test"], r["kind"], r["cache"], r["depth"], r["engine"]): r for r in rows}


def check_statistics(row: dict, repetitions: int) -> None:
    """The samples are all there, and the mean and stddev are theirs."""
    samples = row["samples"]
    assert len(samples) == len(row["samples_ns"]) == repetitions
    assert row["mean"] == pytest.approx(statistics.mean(samples))
    expected = statistics.stdev(samples) if repetitions > 1 else 0.0
    assert row["stddev"] == pytest.approx(expected, abs=1e-9)
    for value, ns in zip(samples, row["samples_ns"], strict=True):
        seconds = ns / 1e9
        if row["unit"] == "t/s":
            tokens = {"pp": row["n_prompt"], "tg": row["n_gen"],
                      "pg": row["n_prompt"] + row["n_gen"]}.get(row["kind"])
            if tokens is not None:
                assert value == pytest.approx(tokens / seconds, rel=1e-3)
        elif row["unit"] == "ms":
            assert value == pytest.approx(seconds * 1000, rel=1e-3)
        elif row["unit"] == "s":
            assert value == pytest.approx(seconds, rel=1e-3)


def test_json_rows_carry_every_sample_the_machine_and_the_model(llmctl: Runner) -> None:
    result = llmctl("bench", "smollm2", "-p", "64", "-n", "8", "-r", "3", "-o", "json")
    rows = rows_of(result)
    tests = [(r["test"], r["cache"]) for r in rows]
    assert tests == [("pp64", ""), ("ttft64", ""), ("tg8", ""), ("load", "cold"),
                     ("load", "warm")]
    for row in rows:
        check_statistics(row, 3)
        assert row["engine"] == "llama" and row["backend"] == "CPU"
        assert row["threads"] >= 1 and row["ctx"] == 4096
        assert row["model"] == "smollm2:135m" and row["model_params"] > 100_000_000
        assert row["peak_memory_bytes"] > 50_000_000
        assert row["mean"] > 0
        machine = row["machine"]
        assert machine["cores"] >= 1 and machine["ram_bytes"] > 0 and machine["cpu"]
        assert machine["os"] and machine["llmctl_version"]
        assert "llama-cpp-python" in machine["libraries"]
        assert "llama.cpp" in machine["libraries"]  # the build's CPU features
    shown = json.loads(llmctl("show", "smollm2", "--json").stdout)
    assert rows[0]["model_digest"] == shown["digest"]
    assert rows[0]["model_size"] == shown["size"]
    # Progress on stderr, one line per test with its running mean; saved to the history.
    assert "pp64: 3/3" in result.stderr and "t/s" in result.stderr
    assert "saved as run 1" in result.stderr


def test_quiet_prints_nothing_on_stderr(llmctl: Runner) -> None:
    result = llmctl("bench", "smollm2", *SMALL, "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("| model")


def test_markdown_has_llama_bench_columns(llmctl: Runner) -> None:
    result = llmctl("bench", "smollm2", *SMALL, "--no-save")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "size", "params", "engine", "backend", "threads", "test",
                      "result"]
    assert set(lines[1]) <= set("|-: ")
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[6] for row in body] == ["pp32", "ttft32", "tg4"]
    assert all(row[7].endswith(("t/s", "ms")) and "±" in row[7] for row in body)
    assert "saved" not in result.stderr


def test_csv_and_sql_have_every_column(llmctl: Runner) -> None:
    table = list(csv.DictReader(io.StringIO(
        llmctl("bench", "smollm2", *SMALL, "--no-save", "-o", "csv").stdout)))
    assert [row["test"] for row in table] == ["pp32", "ttft32", "tg4"]
    for column in ("model", "model_digest", "engine", "threads", "n_prompt", "n_gen", "depth",
                   "samples_ns", "samples", "mean", "stddev", "cpu", "machine_key"):
        assert column in table[0]
    assert len(table[0]["samples_ns"].split()) == 2
    result = llmctl("bench", "smollm2", *SMALL, "--no-save", "-o", "sql")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CREATE TABLE")
    db = sqlite3.connect(":memory:")
    db.executescript(result.stdout)
    tests = [row[0] for row in db.execute("SELECT test FROM bench ORDER BY rowid")]
    assert tests == ["pp32", "ttft32", "tg4"]
    (mean,) = db.execute("SELECT mean FROM bench WHERE test = 'tg4'").fetchone()
    assert mean > 0


def test_depth_rows_report_the_depth(llmctl: Runner) -> None:
    rows = rows_of(llmctl("bench", "smollm2", "-p", "16", "-n", "4", "-d", "0,64", "-r", "2",
                          "--no-load", "--no-save", "-o", "json"))
    assert [(r["test"], r["depth"]) for r in rows] == [
        ("pp16", 0), ("ttft16", 0), ("tg4", 0), ("pp16", 64), ("ttft16", 64), ("tg4", 64)]
    for row in rows:
        check_statistics(row, 2)
    md = llmctl("bench", "smollm2", "-p", "0", "-n", "4", "-d", "64", "-r", "1", "--no-load",
                "--no-save")
    assert "tg4 @ d64" in md.stdout


def test_pg_and_thread_lists_run_every_combination(llmctl: Runner) -> None:
    rows = rows_of(llmctl("bench", "smollm2", "-p", "0", "-n", "0", "-pg", "16,4", "-t", "1,2",
                          "-r", "2", "--no-load", "--no-save", "-o", "json"))
    assert [(r["test"], r["threads"]) for r in rows] == [("pg16,4", 1), ("pg16,4", 2)]
    for row in rows:
        check_statistics(row, 2)


def test_several_models_in_one_run_as_json_lines(llmctl: Runner, smollm2_gguf: Path) -> None:
    result = llmctl("bench", "smollm2", str(smollm2_gguf), *SMALL, "--no-save", "-o", "jsonl")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["test"] for r in rows] == ["pp32", "ttft32", "tg4"] * 2
    assert rows[0]["model"] == "smollm2:135m" and rows[0]["model_digest"]
    # The same file run from its path: no digest, its size read from the file.
    assert rows[3]["model_digest"] == ""
    assert rows[3]["model_size"] == smollm2_gguf.stat().st_size == rows[0]["model_size"]


def test_prompt_set_runs_the_shipped_prompts_through_the_template(llmctl: Runner) -> None:
    rows = rows_of(llmctl("bench", "smollm2", "--prompt-set", "short,medium", "-n", "4",
                          "-r", "2", "--no-load", "--no-save", "-o", "json"))
    assert [(r["test"], r["kind"]) for r in rows] == [
        ("short", "prompt-ttft"), ("short", "prompt-tg"), ("medium", "prompt-ttft"),
        ("medium", "prompt-tg")]
    short, medium = rows[0]["n_prompt"], rows[2]["n_prompt"]
    assert 20 < short < medium  # the template's tokens and the prompt's
    for row in rows:
        check_statistics(row, 2)
        assert row["n_gen"] == 4


def test_compare_gives_the_change_against_a_saved_run(llmctl: Runner, llmctl_home: Path
                                                      ) -> None:
    first = rows_of(llmctl("bench", "smollm2", *SMALL, "-o", "json"))
    second = rows_of(llmctl("bench", "smollm2", *SMALL, "-o", "json", "--compare", "last"))
    for before, now in zip(first, second, strict=True):
        change = now["change"]
        assert change["before_run"] == 1
        assert change["before_mean"] == pytest.approx(before["mean"])
        assert change["percent"] == pytest.approx(
            (now["mean"] - before["mean"]) / before["mean"] * 100)
        within = abs(now["mean"] - before["mean"]) <= now["stddev"] + before["stddev"]
        assert change["noise"] == within
    md = llmctl("bench", "smollm2", *SMALL, "--compare", "2")
    assert md.returncode == 0, md.stderr
    header = [c.strip() for c in md.stdout.splitlines()[0].strip("|").split("|")]
    assert header[-2:] == ["before", "change"]
    assert "%" in md.stdout.splitlines()[2]
    listed = llmctl("bench", "--history", "--json")
    runs = json.loads(listed.stdout)
    assert [r["id"] for r in runs] == [3, 2, 1]
    assert runs[0]["models"] == ["smollm2:135m"]
    assert llmctl("bench", "--history").stdout.startswith("RUN")
    missing = llmctl("bench", "smollm2", *SMALL, "--compare", "99")
    assert missing.returncode == 2
    assert "no benchmark run 99" in error_line(missing)


def test_an_older_history_database_is_migrated(llmctl: Runner, llmctl_home: Path) -> None:
    path = llmctl_home / "bench" / "history.db"
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.executescript(history.MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO runs (id, started, llmctl_version, machine_key, machine, argv) "
               "VALUES (7, '2026-01-01T00:00:00+00:00', '0.0.1', 'k', '{\"cpu\": \"old\"}', "
               "'[]')")
    db.execute("INSERT INTO results (run_id, model, model_digest, engine, backend, threads, "
               "ctx, test, kind, unit, n_prompt, n_gen, depth, samples_ns, samples, mean, "
               "stddev) VALUES (7, 'smollm2:135m', 'sha256:00', 'llama', 'CPU', 2, 4096, "
               "'pp512', 'pp', 't/s', 512, 0, 0, '[1]', '[2.0]', 2.0, 0.0)")
    db.commit()
    db.close()
    listed = json.loads(llmctl("bench", "--history", "--json").stdout)
    assert [(r["id"], r["cpu"]) for r in listed] == [(7, "old")]
    assert llmctl("bench", "smollm2", *SMALL).returncode == 0
    with History(path) as migrated:
        assert [r.id for r in migrated.runs()] == [8, 7]
        old = migrated.load(7)
        assert old is not None and old.results[0].test == "pp512"
        assert old.results[0].model_format == ""  # a column the older schema lacked
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == len(history.MIGRATIONS)


@pytest.mark.parametrize("args, code, words", [
    (("nosuchmodel",), 3, "nosuchmodel"),
    (("smollm2", "-p", "0", "-n", "0"), 2, "nothing to measure"),
    (("smollm2", "-d", "5000", "-r", "1", "--no-load"), 2, "4096"),
    (("smollm2", "--steps", "4"), 2, "image models"),
    (("smollm2", "--size", "512"), 2, "image models"),
    (("smollm2", "-t", "two"), 2, "whole numbers"),
    (("smollm2", "-o", "xml"), 2, "unknown output format"),
    (("smollm2", "--prompt-set", "huge"), 2, "no prompt 'huge'"),
    (("smollm2", "--engine", "coreml"), 2, "coreml"),
    ((), 2, "no model given"),
])
def test_bad_input_is_one_line_and_an_exit_code(llmctl: Runner, args: tuple[str, ...],
                                                code: int, words: str) -> None:
    result = llmctl("bench", *args)
    assert words in one_line_error(result, code)
    assert result.stdout == ""


def test_llama_and_mlx_in_one_table(llmctl: Runner, stored_mlx: str,
                                    converted: Converted) -> None:
    rows = rows_of(llmctl("bench", "smollm2", "--engine", "llama,mlx", "-p", "16", "-n", "4",
                          "-r", "2", "--no-load", "--no-save", "-o", "json"))
    assert [(r["model"], r["engine"], r["test"]) for r in rows] == [
        ("smollm2:135m", "llama", "pp16"), ("smollm2:135m", "llama", "ttft16"),
        ("smollm2:135m", "llama", "tg4"), (stored_mlx, "mlx", "pp16"),
        (stored_mlx, "mlx", "ttft16"), (stored_mlx, "mlx", "tg4")]
    mlx = rows[3]
    assert mlx["threads"] is None and mlx["model_format"] == "mlx"
    assert mlx["backend"] == "CPU" and mlx["model_params"] > 100_000_000
    for row in rows:
        check_statistics(row, 2)
    assert "mlx" in rows[0]["machine"]["libraries"]
    md = llmctl("bench", stored_mlx, "-p", "16", "-n", "0", "-d", "16", "-r", "1",
                "--no-save", "-o", "md")
    assert md.returncode == 0, md.stderr
    assert "pp16 @ d16" in md.stdout and "load cold" in md.stdout


def test_image_bench_reports_steps_images_and_loads(llmctl: Runner, tiny_folder: Path
                                                    ) -> None:
    assert llmctl("pull", str(tiny_folder), "--name", "tiny").returncode == 0
    rows = rows_of(llmctl("bench", "tiny", "--steps", "2", "--size", "64", "-r", "2",
                          "--no-save", "-o", "json"))
    assert [(r["test"], r["cache"]) for r in rows] == [
        ("step", ""), ("image", ""), ("load", "cold"), ("load", "warm")]
    for row in rows:
        check_statistics(row, 2)
        assert row["engine"] == "diffusers" and row["backend"] == "CPU"
        assert row["unit"] == "s" and row["ctx"] is None
    assert (rows[0]["steps"], rows[0]["width"], rows[0]["height"]) == (2, 64, 64)
    # A step is a part of an image.
    assert rows[0]["mean"] < rows[1]["mean"]
    text_only = llmctl("bench", "tiny", "-d", "16")
    assert text_only.returncode == 2
    assert "for text models" in error_line(text_only)
