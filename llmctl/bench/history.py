"""The history of benchmark runs: one SQLite file (the CLI keeps it at
`<store>/bench/history.db`) that every `llmctl bench` adds its run to, so that a later run
can be compared with an earlier one on the same machine.

The schema is versioned with `PRAGMA user_version`: `MIGRATIONS[n]` takes a database from
version n to n + 1, in one transaction, so a database an older llmctl wrote is brought up to
date when it is opened, and a v3 is one more script at the end of the list.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

from llmctl.bench.results import Change, Machine, Result, Run
from llmctl.errors import UsageError

MIGRATIONS: list[str] = [
    # 1: the first design, text models only.
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        started TEXT,
        llmctl_version TEXT,
        machine_key TEXT,
        machine TEXT,  -- JSON of Machine.to_dict()
        argv TEXT      -- JSON list
    );
    CREATE TABLE results (
        id INTEGER PRIMARY KEY,
        run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE,
        model TEXT,
        model_digest TEXT,
        engine TEXT,
        backend TEXT,
        threads INTEGER,
        ctx INTEGER,
        test TEXT,
        kind TEXT,
        unit TEXT,
        n_prompt INTEGER,
        n_gen INTEGER,
        depth INTEGER,
        samples_ns TEXT,  -- JSON list
        samples TEXT,     -- JSON list
        mean REAL,
        stddev REAL
    );
    """,
    # 2: what the table shows of a model, load and image rows, memory; the index serves
    # --compare, which looks rows up by model and test.
    """
    ALTER TABLE results ADD COLUMN model_format TEXT DEFAULT '';
    ALTER TABLE results ADD COLUMN model_size INTEGER DEFAULT 0;
    ALTER TABLE results ADD COLUMN model_params INTEGER;
    ALTER TABLE results ADD COLUMN cache TEXT DEFAULT '';
    ALTER TABLE results ADD COLUMN steps INTEGER DEFAULT 0;
    ALTER TABLE results ADD COLUMN width INTEGER DEFAULT 0;
    ALTER TABLE results ADD COLUMN height INTEGER DEFAULT 0;
    ALTER TABLE results ADD COLUMN peak_memory_bytes INTEGER DEFAULT 0;
    CREATE INDEX results_by_model_test ON results(model_digest, test);
    """,
]

# A bench that saves while another saves waits for it: a save takes milliseconds, and
# failing a benchmark of minutes at its last step would be the worst moment to.
BUSY_TIMEOUT_MS = 30_000
_JSON_COLUMNS = ("samples_ns", "samples")
_ROW_COLUMNS = [f.name for f in fields(Result)]


@dataclass(frozen=True)
class RunSummary:
    """One line of `llmctl bench --history`."""

    id: int
    started: str
    llmctl_version: str
    machine_key: str
    cpu: str
    models: list[str]  # as the rows name them, in the order they ran
    rows: int


def _match_key(row: Result) -> tuple:
    """What makes two rows the same measurement. A model run from a path has no digest: its
    path stands in, so that two different files are not compared."""
    return (row.model_digest or "path:" + row.model, row.engine, row.backend, row.threads,
            row.ctx, row.test, row.kind, row.n_prompt, row.n_gen, row.depth, row.cache,
            row.steps, row.width, row.height)


class History:
    """The benchmark history in the SQLite file at `path` (created with its folder)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are the ones this class begins, no implicit ones.
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as error:
            self._db.close()
            if error.sqlite_errorcode in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
                raise UsageError(f"{self.path} is not a SQLite database, so it cannot hold "
                                 "the benchmark history",
                                 hint="move it away (llmctl bench then starts a new history "
                                      "there), or use --no-save") from error
            raise
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # -- schema ------------------------------------------------------------------------------

    def _version(self) -> int:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise UsageError(f"the benchmark history at {self.path} was written by a newer "
                             f"llmctl (schema {version}; this one reads up to "
                             f"{len(MIGRATIONS)})", hint="upgrade llmctl, or use --no-save")
        return version

    def _migrate(self) -> None:
        if self._version() == len(MIGRATIONS):  # the usual case: no write lock to take
            return
        while True:
            with self._transaction():
                # Read again under the lock: another llmctl may have migrated meanwhile.
                version = self._version()
                if version == len(MIGRATIONS):
                    return
                for statement in _statements(MIGRATIONS[version]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {version + 1}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """A write transaction: IMMEDIATE takes the write lock at once, so a second writer
        waits (busy_timeout) rather than failing when it upgrades a read lock."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- writing -----------------------------------------------------------------------------

    def save(self, run: Run) -> int:
        """Add the run and its rows, all or nothing; sets `run.id` and returns it."""
        columns = [*_ROW_COLUMNS, "mean", "stddev"]
        insert = (f"INSERT INTO results (run_id, {', '.join(columns)}) "
                  f"VALUES ({', '.join('?' * (len(columns) + 1))})")
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO runs (started, llmctl_version, machine_key, machine, argv) "
                "VALUES (?, ?, ?, ?, ?)",
                (run.started, run.machine.llmctl_version, run.machine.key,
                 json.dumps(run.machine.to_dict()), json.dumps(run.argv)))
            run_id = cursor.lastrowid
            assert run_id is not None
            for row in run.results:
                data = row.to_dict()
                for name in _JSON_COLUMNS:
                    data[name] = json.dumps(data[name])
                self._db.execute(insert, (run_id, *(data[name] for name in columns)))
        run.id = run_id
        return run_id

    # -- reading -----------------------------------------------------------------------------

    def runs(self, model: str | None = None, limit: int | None = None) -> list[RunSummary]:
        """Saved runs, the last saved first; with `model`, those that measured it: a row's
        model as named (smollm2:135m) or the start of its digest, with or without sha256:."""
        where, params = "", []
        if model:
            digest = model if model.startswith("sha256:") else "sha256:" + model
            where = ("WHERE id IN (SELECT run_id FROM results WHERE model = ? "
                     "OR substr(model_digest, 1, ?) = ?)")
            params = [model, len(digest), digest]
        rows = self._db.execute(
            "SELECT runs.id, runs.started, runs.llmctl_version, runs.machine_key, "
            "runs.machine, results.model FROM runs "
            "LEFT JOIN results ON results.run_id = runs.id "
            f"WHERE runs.id IN (SELECT id FROM runs {where} ORDER BY id DESC LIMIT ?) "
            "ORDER BY runs.id DESC, results.id",
            [*params, -1 if limit is None else limit])
        summaries: dict[int, tuple[sqlite3.Row, list[str]]] = {}
        for row in rows:
            _, models = summaries.setdefault(row["id"], (row, []))
            if row["model"] is not None:
                models.append(row["model"])
        return [RunSummary(id=run_id, started=row["started"] or "",
                           llmctl_version=row["llmctl_version"] or "",
                           machine_key=row["machine_key"] or "",
                           cpu=str(_json(row["machine"], {}).get("cpu", "")),
                           models=list(dict.fromkeys(models)), rows=len(models))
                for run_id, (row, models) in summaries.items()]

    def load(self, run_id: int) -> Run | None:
        """The run as it was saved, or None when there is no run `run_id`."""
        run = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if run is None:
            return None
        rows = self._db.execute("SELECT * FROM results WHERE run_id = ? ORDER BY id",
                                (run_id,))
        argv = _json(run["argv"], [])
        return Run(machine=_machine(_json(run["machine"], {})),
                   results=[_result(row) for row in rows], started=run["started"] or "",
                   argv=[str(arg) for arg in argv] if isinstance(argv, list) else [],
                   id=run["id"])

    def last_run_id(self, model_digest: str, machine_key: str,
                    exclude: int | None = None) -> int | None:
        """The last saved run on this machine with a row of this model."""
        row = self._db.execute(
            "SELECT runs.id FROM runs JOIN results ON results.run_id = runs.id "
            "WHERE results.model_digest = ? AND runs.machine_key = ? "
            "AND (? IS NULL OR runs.id != ?) ORDER BY runs.id DESC LIMIT 1",
            (model_digest, machine_key, exclude, exclude)).fetchone()
        return None if row is None else row["id"]

    def compare(self, results: list[Result], machine_key: str, against: int | None = None,
                exclude: int | None = None) -> dict[int, Change]:
        """Each row (by index in `results`) against the same measurement in run `against`,
        or, without one, in the last saved run on this machine that has it. `exclude` is
        the id these rows were saved as, if they were. Rows with no counterpart, or whose
        counterpart measured 0 (no percentage to give), are left out."""
        select = ("SELECT results.*, runs.machine_key AS run_machine FROM results "
                  "JOIN runs ON runs.id = results.run_id ")
        if against is not None:
            if self._db.execute("SELECT 1 FROM runs WHERE id = ?", (against,)).fetchone() is None:
                raise UsageError(f"no benchmark run {against} in the history",
                                 hint="list them: llmctl bench --history")
            rows = self._db.execute(select + "WHERE run_id = ? ORDER BY results.id", (against,))
            # A run that repeated a measurement: the last of its rows, as below.
            earlier = {_match_key(_result(row)): row for row in rows}
        changes = {}
        for index, now in enumerate(results):
            key = _match_key(now)
            if against is not None:
                before = earlier.get(key)
            else:
                rows = self._db.execute(
                    select + "WHERE runs.machine_key = ? AND model_digest = ? AND test = ? "
                    "AND (? IS NULL OR run_id != ?) ORDER BY run_id DESC, results.id DESC",
                    (machine_key, now.model_digest, now.test, exclude, exclude))
                before = next((row for row in rows if _match_key(_result(row)) == key), None)
            if before is not None and (change := _change(now, before)) is not None:
                changes[index] = change
        return changes


def _change(now: Result, before: sqlite3.Row) -> Change | None:
    earlier = _result(before)
    if earlier.mean == 0:
        return None
    return Change(before_mean=earlier.mean, before_stddev=earlier.stddev,
                  before_run=before["run_id"],
                  percent=(now.mean - earlier.mean) / earlier.mean * 100,
                  noise=abs(now.mean - earlier.mean) <= now.stddev + earlier.stddev,
                  machine_key=before["run_machine"] or "")


def _result(row: sqlite3.Row) -> Result:
    """A saved row as a Result; a column that is NULL (a row an older llmctl wrote, or one
    added by hand) takes the field's default."""
    values: dict[str, Any] = {}
    for field in fields(Result):
        value = row[field.name]
        if field.name in _JSON_COLUMNS:
            value = _json(value, [])
        elif value is None and field.default is not MISSING:
            value = field.default
        values[field.name] = value
    return Result(**values)


def _machine(data: dict[str, Any]) -> Machine:
    """A Machine from its saved JSON, with what is missing left empty."""
    libraries = data.get("libraries")
    return Machine(cpu=str(data.get("cpu", "")), cores=int(data.get("cores") or 0),
                   ram_bytes=int(data.get("ram_bytes") or 0), os=str(data.get("os", "")),
                   gpu=str(data.get("gpu", "")),
                   libraries=dict(libraries) if isinstance(libraries, dict) else {},
                   llmctl_version=str(data.get("llmctl_version", "")),
                   python_version=str(data.get("python_version", "")))


def _json(text: str | None, default: Any) -> Any:
    """Saved JSON, or `default` for NULL or text that is not JSON (a hand-edited row)."""
    if text is None:
        return default
    try:
        value = json.loads(text)
    except ValueError:
        return default
    return value if isinstance(value, type(default)) else default


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration, to run one at a time inside its transaction:
    `executescript` would commit the transaction first (Python 3.11)."""
    pieces = script.split(";")
    statement = ""
    for piece in pieces[:-1]:
        statement += piece + ";"
        if sqlite3.complete_statement(statement):  # not a ";" inside a string or trigger
            yield statement
            statement = ""
    if (statement + pieces[-1]).strip():
        yield statement + pieces[-1]
