"""How benchmark rows are written (formats) and kept (history), on real rows and real
SQLite files in a temporary folder."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import statistics
import threading
from dataclasses import fields, replace
from pathlib import Path

import pytest

from llmctl.bench import formats
from llmctl.bench.history import MIGRATIONS, Change, History
from llmctl.bench.results import Machine, Result, Run
from llmctl.errors import UsageError

DIGEST = "sha256:" + "ab12cd34" * 8
OTHER_DIGEST = "sha256:" + "ef56" * 16


def machine(cpu: str = "Apple M2") -> Machine:
    return Machine(cpu=cpu, cores=8, ram_bytes=16 * 2**30, os="macOS 14.5",
                   gpu="Apple M2 GPU", libraries={"llama.cpp": "b4500", "mlx": "0.20.0"},
                   llmctl_version="0.3.0", python_version="3.11.7")


def text_row(test: str = "tg128", samples: tuple[float, ...] = (100.0, 102.0, 104.0),
             model: str = "smollm2:135m", digest: str = DIGEST, **changes) -> Result:
    kind = "".join(c for c in test if c.isalpha())
    n = int("".join(c for c in test if c.isdigit()))
    row = Result(model=model, model_digest=digest, model_format="gguf",
                 model_size=256 * 2**20, model_params=134_515_008, engine="llama",
                 backend="Metal", threads=None, ctx=2048, test=test, kind=kind, unit="t/s",
                 n_prompt=n if kind == "pp" else 0, n_gen=n if kind == "tg" else 0,
                 samples_ns=[int(n / value * 1e9) for value in samples],
                 samples=list(samples), peak_memory_bytes=300_000_000)
    return replace(row, **changes)


def rows() -> list[Result]:
    """A pp, a tg, a ttft in ms and a cold load in s, with a quote in a name."""
    return [
        text_row("pp512", (1000.0, 1100.0, 1200.0)),
        text_row("tg128", (100.0, 102.0, 104.0)),
        text_row("ttft512", (100.0, 110.0, 120.0), kind="ttft", unit="ms", n_prompt=512),
        Result(model="it's-a-path.gguf", model_digest="", model_format="gguf", model_size=0,
               model_params=None, engine="llama", backend="CPU", threads=4, ctx=None,
               test="load", kind="load", unit="s", cache="cold", samples_ns=[500_000_000],
               samples=[0.5]),
    ]


def run(results: list[Result], started: str = "2025-01-01T10:00:00Z",
        on: Machine | None = None) -> Run:
    return Run(machine=on or machine(), results=results, started=started,
               argv=["bench", "smollm2:135m"])


# -- formats ---------------------------------------------------------------------------------

def test_csv_has_every_column_and_reads_back():
    results = rows()
    text = formats.csv_text(results, machine())
    reader = csv.DictReader(io.StringIO(text))
    expected = [f.name for f in fields(Result)] + [
        "mean", "stddev", "cpu", "cores", "ram_bytes", "os", "gpu", "machine_key",
        "llmctl_version", "python_version", "lib_llama_cpp", "lib_mlx"]
    assert reader.fieldnames == expected
    read = list(reader)
    assert len(read) == len(results)
    pp, load = read[0], read[3]
    assert pp["model"] == "smollm2:135m" and pp["test"] == "pp512"
    assert pp["threads"] == "" and load["threads"] == "4"
    assert [float(v) for v in pp["samples"].split()] == [1000.0, 1100.0, 1200.0]
    assert [int(v) for v in pp["samples_ns"].split()] == results[0].samples_ns
    assert float(pp["mean"]) == 1100.0 and float(pp["stddev"]) == 100.0
    assert load["model"] == "it's-a-path.gguf" and load["model_params"] == ""
    assert load["cache"] == "cold"
    assert pp["machine_key"] == machine().key and pp["lib_llama_cpp"] == "b4500"
    assert int(pp["ram_bytes"]) == 16 * 2**30


def test_sql_loads_into_sqlite():
    results = rows()
    text = formats.sql_text(results, machine(), run_id=7)
    db = sqlite3.connect(":memory:")
    db.executescript(text)
    assert db.execute("SELECT count(*) FROM bench").fetchone()[0] == len(results)
    mean, threads, run_id = db.execute(
        "SELECT mean, threads, run_id FROM bench WHERE test = 'pp512'").fetchone()
    assert mean == pytest.approx(results[0].mean, rel=1e-12)
    assert threads is None and run_id == 7
    assert db.execute("SELECT model FROM bench WHERE kind = 'load'").fetchone() == (
        "it's-a-path.gguf",)
    types = {name: kind for _, name, kind, *_ in db.execute("PRAGMA table_info(bench)")}
    assert types["mean"] == "REAL" and types["n_prompt"] == "INTEGER"
    assert types["model"] == "TEXT" and types["model_params"] == "INTEGER"
    db.executescript(text)  # a second run adds to the table that is there
    assert db.execute("SELECT count(*) FROM bench").fetchone()[0] == 2 * len(results)


def test_json_and_jsonl_carry_samples_machine_and_statistics():
    results = rows()
    documents = {
        "json": json.loads(formats.json_text(results, machine(), run_id=3)),
        "jsonl": [json.loads(line) for line in
                  formats.jsonl_text(results, machine(), run_id=3).splitlines()],
    }
    for name, objects in documents.items():
        assert len(objects) == len(results), name
        for data, row in zip(objects, results, strict=True):
            assert data["samples"] == row.samples and data["samples_ns"] == row.samples_ns
            assert data["mean"] == pytest.approx(statistics.mean(data["samples"]))
            spread = statistics.stdev(data["samples"]) if len(data["samples"]) > 1 else 0.0
            assert data["stddev"] == pytest.approx(spread)
            assert data["machine"]["key"] == machine().key
            assert data["machine"]["libraries"] == {"llama.cpp": "b4500", "mlx": "0.20.0"}
            assert data["run_id"] == 3 and data["test"] == row.test
    assert formats.json_text(results, machine()).startswith("[\n  {")
    assert json.loads(formats.jsonl_text(results[:1], machine()))["run_id"] is None


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_markdown_is_llama_bench_shaped():
    results = rows()
    lines = formats.markdown(results, machine()).splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert cells(table[0]) == ["model", "size", "params", "engine", "backend", "threads",
                               "test", "result"]
    rule = cells(table[1])
    assert all(set(cell) == {"-"} for cell in (rule[0], rule[3], rule[4]))
    assert all(cell.endswith(":") for cell in (rule[1], rule[2], rule[5], rule[6], rule[7]))
    assert len(table) == 2 + len(results)
    assert cells(table[2]) == ["smollm2:135m", "256.0 MiB", "134.5M", "llama", "Metal", "-",
                               "pp512", "1100.00 ± 100.00 t/s"]
    assert cells(table[4])[6:] == ["ttft512", "110.00 ± 10.00 ms"]
    assert cells(table[5])[1:] == ["-", "-", "llama", "CPU", "4", "load cold", "0.500 ± 0.000 s"]
    assert "Apple M2" in lines[-1] and "llama.cpp b4500" in lines[-1]


def test_markdown_compare_columns():
    results = rows()[:2]
    compared = {0: Change(before_mean=1000.0, before_stddev=5.0, before_run=1, percent=10.0,
                          noise=False, machine_key=machine().key),
                1: Change(before_mean=103.0, before_stddev=2.0, before_run=1,
                          percent=-0.970873786, noise=True, machine_key=machine().key)}
    table = [line for line in formats.markdown(results, machine(), compared).splitlines()
             if line.startswith("|")]
    assert cells(table[0])[-2:] == ["before", "change"]
    assert cells(table[2])[-2:] == ["1000.00 t/s", "+10.0%"]
    assert cells(table[3])[-2:] == ["103.00 t/s", "-1.0% (noise)"]
    only_first = formats.markdown(results, machine(), {0: compared[0]}).splitlines()
    assert cells(only_first[3])[-2:] == ["-", "-"]


def test_render_dispatches_every_format():
    results = rows()
    for fmt in formats.FORMATS:
        assert formats.render(fmt, results, machine(), run_id=1) == {
            "md": formats.markdown(results, machine()),
            "csv": formats.csv_text(results, machine()),
            "json": formats.json_text(results, machine(), 1),
            "jsonl": formats.jsonl_text(results, machine(), 1),
            "sql": formats.sql_text(results, machine(), 1),
        }[fmt]
    with pytest.raises(UsageError) as error:
        formats.render("xml", results, machine())
    assert "md, csv, json, jsonl, sql" in (error.value.hint or "")


# -- history ---------------------------------------------------------------------------------

@pytest.fixture
def history(tmp_path: Path):
    with History(tmp_path / "bench" / "history.db") as history:
        yield history


def test_save_and_load_round_trip(history: History, tmp_path: Path):
    saved = run(rows())
    run_id = history.save(saved)
    assert saved.id == run_id and isinstance(run_id, int)
    loaded = history.load(run_id)
    assert loaded is not None
    assert loaded.results == saved.results
    assert loaded.machine == saved.machine
    assert (loaded.started, loaded.argv, loaded.id) == (saved.started, saved.argv, run_id)
    assert history.load(run_id + 1) is None
    assert (tmp_path / "bench" / "history.db").is_file()


def test_a_failed_save_writes_nothing(history: History):
    broken = run([text_row(), replace(text_row("pp512"), samples=[object()])])
    with pytest.raises(TypeError):
        history.save(broken)
    assert history.runs() == [] and broken.id is None


def test_runs_newest_first_and_filtered_by_model(history: History):
    first = history.save(run([text_row(), text_row("pp512")]))
    second = history.save(run([text_row(model="qwen:0.5b", digest=OTHER_DIGEST)],
                              started="2025-01-02T10:00:00Z"))
    third = history.save(run([text_row(), text_row(model="qwen:0.5b", digest=OTHER_DIGEST)],
                             started="2025-01-03T10:00:00Z"))
    summaries = history.runs()
    assert [s.id for s in summaries] == [third, second, first]
    assert summaries[0].models == ["smollm2:135m", "qwen:0.5b"] and summaries[0].rows == 2
    assert summaries[2].models == ["smollm2:135m"] and summaries[2].rows == 2
    assert summaries[2].cpu == "Apple M2" and summaries[2].machine_key == machine().key
    assert summaries[1].started == "2025-01-02T10:00:00Z"
    assert summaries[1].llmctl_version == "0.3.0"
    assert [s.id for s in history.runs(model="smollm2:135m")] == [third, first]
    assert [s.id for s in history.runs(model="qwen:0.5b")] == [third, second]
    assert [s.id for s in history.runs(model=OTHER_DIGEST[:15])] == [third, second]
    assert [s.id for s in history.runs(model=OTHER_DIGEST[7:15])] == [third, second]
    assert history.runs(model="smollm2") == []
    assert [s.id for s in history.runs(limit=2)] == [third, second]
    assert [s.id for s in history.runs(model="smollm2:135m", limit=1)] == [third]


def test_last_run_id(history: History):
    first = history.save(run([text_row()]))
    history.save(run([text_row()], on=machine("Intel i7")))
    history.save(run([text_row(model="qwen:0.5b", digest=OTHER_DIGEST)]))
    assert history.last_run_id(DIGEST, machine().key) == first
    last = history.save(run([text_row()]))
    assert history.last_run_id(DIGEST, machine().key) == last
    assert history.last_run_id(DIGEST, machine().key, exclude=last) == first
    assert history.last_run_id(DIGEST, "no-such-machine") is None


def test_compare_with_the_last_run_on_this_machine(history: History):
    before = [text_row("pp512", (1000.0, 1010.0, 1020.0)), text_row("tg128", (100.0, 102.0))]
    before_id = history.save(run(before))
    # Faster on another machine, which a comparison without --compare N never looks at.
    history.save(run([text_row("pp512", (5000.0,))], on=machine("Intel i7")))
    now = [
        text_row("pp512", (1200.0, 1210.0, 1220.0)),  # 20 % faster, far outside the spread
        text_row("tg128", (102.0, 104.0)),  # 2 % faster, within the two spreads added
        text_row("tg128", (50.0,), threads=4),  # other settings: no counterpart
        text_row("pp512", (900.0,), model="qwen:0.5b", digest=OTHER_DIGEST),  # never run
    ]
    changes = history.compare(now, machine().key)
    assert set(changes) == {0, 1}
    for index in (0, 1):
        change, earlier = changes[index], before[index]
        assert change.before_run == before_id and change.machine_key == machine().key
        assert change.before_mean == pytest.approx(earlier.mean)
        assert change.before_stddev == pytest.approx(earlier.stddev)
        assert change.percent == pytest.approx(
            (now[index].mean - earlier.mean) / earlier.mean * 100)
    assert changes[0].percent == pytest.approx(1210 / 1010 * 100 - 100)
    assert changes[0].noise is False
    assert changes[1].noise is True  # |103 - 101| = 2 <= 1.41 + 1.41, more than one of them


def test_compare_picks_the_newest_and_can_exclude(history: History):
    history.save(run([text_row(samples=(100.0,))]))
    newer = history.save(run([text_row(samples=(200.0,))]))
    now = [text_row(samples=(300.0,))]
    assert history.compare(now, machine().key)[0].before_run == newer
    saved = run(now)
    history.save(saved)
    assert history.compare(now, machine().key)[0].before_run == saved.id
    change = history.compare(now, machine().key, exclude=saved.id)[0]
    assert change.before_run == newer and change.percent == pytest.approx(50.0)


def test_compare_against_a_given_run(history: History):
    elsewhere = history.save(run([text_row(samples=(80.0, 82.0))], on=machine("Intel i7")))
    history.save(run([text_row(samples=(120.0,))]))
    changes = history.compare([text_row(samples=(100.0, 102.0))], machine().key,
                              against=elsewhere)
    assert changes[0].before_run == elsewhere
    assert changes[0].machine_key == machine("Intel i7").key != machine().key
    assert changes[0].percent == pytest.approx((101 - 81) / 81 * 100)
    with pytest.raises(UsageError) as error:
        history.compare([text_row()], machine().key, against=99)
    assert "no benchmark run 99" in str(error.value)
    assert error.value.hint == "list them: llmctl bench --history"


def test_compare_does_not_match_two_files_run_from_paths(history: History):
    history.save(run([text_row(model="/models/a.gguf", digest="")]))
    now = [text_row(model="/models/b.gguf", digest=""),
           text_row(model="/models/a.gguf", digest="")]
    assert set(history.compare(now, machine().key)) == {1}


def test_a_version_1_database_is_migrated(tmp_path: Path):
    path = tmp_path / "history.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO runs (id, started, llmctl_version, machine_key, machine, argv) "
               "VALUES (5, '2024-06-01T08:00:00Z', '0.1.0', ?, ?, '[\"bench\"]')",
               (machine().key, json.dumps({"cpu": "Apple M2", "cores": 8})))
    db.execute("INSERT INTO results (run_id, model, model_digest, engine, backend, threads, "
               "ctx, test, kind, unit, n_prompt, n_gen, depth, samples_ns, samples, mean, "
               "stddev) VALUES (5, 'smollm2:135m', ?, 'llama', 'CPU', 4, 2048, 'tg128', "
               "'tg', 't/s', 0, 128, 0, '[1280000000, 1230769230]', '[100.0, 104.0]', "
               "102.0, 2.8284271247461903)", (DIGEST,))
    db.commit()
    db.close()

    with History(path) as history:
        loaded = history.load(5)
        summaries = history.runs(model=DIGEST)
        changes = history.compare([text_row(samples=(110.0,), backend="CPU", threads=4)],
                                  machine().key)
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == len(MIGRATIONS)
    assert loaded is not None and loaded.started == "2024-06-01T08:00:00Z"
    assert loaded.argv == ["bench"]
    assert loaded.machine.cpu == "Apple M2" and loaded.machine.libraries == {}
    assert loaded.results == [Result(
        model="smollm2:135m", model_digest=DIGEST, model_format="", model_size=0,
        model_params=None, engine="llama", backend="CPU", threads=4, ctx=2048, test="tg128",
        kind="tg", unit="t/s", n_gen=128, cache="", steps=0, width=0, height=0,
        samples_ns=[1280000000, 1230769230], samples=[100.0, 104.0], peak_memory_bytes=0)]
    assert [s.id for s in summaries] == [5] and summaries[0].llmctl_version == "0.1.0"
    assert changes[0].before_run == 5
    assert changes[0].percent == pytest.approx((110 - 102) / 102 * 100)
    db = sqlite3.connect(path)
    # The new columns' defaults are in the table, for whoever reads it with SQL.
    assert db.execute("SELECT model_format, model_size, model_params, cache, steps, width, "
                      "height, peak_memory_bytes FROM results").fetchall() == [
        ("", 0, None, "", 0, 0, 0, 0)]
    indexes = {row[1] for row in db.execute("PRAGMA index_list(results)")}
    assert "results_by_model_test" in indexes


def test_a_new_database_is_at_the_current_version(tmp_path: Path):
    path = tmp_path / "new" / "history.db"
    History(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
    assert {f.name for f in fields(Result)} <= columns
    History(path).close()  # opening again changes nothing
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_a_newer_database_is_refused(tmp_path: Path):
    path = tmp_path / "history.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(UsageError) as error:
        History(path)
    message = str(error.value)
    assert str(path) in message and "schema 99" in message
    assert f"reads up to {len(MIGRATIONS)}" in message
    assert error.value.hint == "upgrade llmctl, or use --no-save"
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 99


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path):
    path = tmp_path / "history.db"
    path.write_text("these are my notes, not a database\n" * 50)
    with pytest.raises(UsageError) as error:
        History(path)
    assert str(path) in str(error.value)
    assert "move it away" in (error.value.hint or "")
    assert path.read_text().startswith("these are my notes")


def test_a_save_waits_for_another_writer(tmp_path: Path):
    path = tmp_path / "history.db"
    with History(path) as history:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another bench in the middle of its save
        release = threading.Timer(0.5, other.execute, ("COMMIT",))
        release.start()
        try:
            run_id = history.save(run([text_row()]))
        finally:
            release.join()
            other.close()
        assert history.load(run_id) is not None
