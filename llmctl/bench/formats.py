"""How `llmctl bench` writes its rows: a markdown table in llama-bench's shape, or CSV, JSON,
JSON lines and SQL with every sample and the machine, for other tools to read.

Every function returns the whole text (ending in a newline when there is any); the caller
writes it to stdout. CSV and SQL are flat: the fields of `Result` in their order, `mean` and
`stddev`, then the machine's fields and one `lib_<name>` column per library it lists.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any, get_type_hints

from llmctl.bench.results import Change, Machine, Result, Unit
from llmctl.errors import UsageError
from llmctl.units import format_count

_DECIMALS: dict[str, int] = {"t/s": 2, "ms": 2, "s": 3, "rtf": 4}
# The machine's columns after the row's own, with their SQL types.
_MACHINE_COLUMNS = (
    ("cpu", "TEXT"), ("cores", "INTEGER"), ("ram_bytes", "INTEGER"), ("os", "TEXT"),
    ("gpu", "TEXT"), ("machine_key", "TEXT"), ("llmctl_version", "TEXT"),
    ("python_version", "TEXT"),
)


# -- markdown --------------------------------------------------------------------------------

def markdown(results: list[Result], machine: Machine,
             compared: dict[int, Change] | None = None) -> str:
    """The table llama-bench prints, with an engine column, a unit in every result, and,
    given `compared` (row index -> Change), the earlier mean and the change; then one line
    naming the machine, as llama-bench ends with its build."""
    header = ["model", "size", "params", "engine", "backend", "threads", "test", "result"]
    # llama-bench right-aligns its numbers and the test ("pp512"), left-aligns names.
    right = {"size", "params", "threads", "test", "result", "before", "change"}
    if compared is not None:
        header += ["before", "change"]
    lines = []
    for index, row in enumerate(results):
        cells = [row.model, _binary_bytes(row.model_size) if row.model_size else "-",
                 format_count(row.model_params) if row.model_params is not None else "-",
                 row.engine, row.backend, "-" if row.threads is None else str(row.threads),
                 row.label, _measure(row.unit, row.mean, row.stddev)]
        if compared is not None:
            change = compared.get(index)
            cells += _change_cells(row.unit, change) if change else ["-", "-"]
        lines.append([cell.replace("|", "\\|") for cell in cells])
    widths = [max(len(text) for text in column) for column in zip(header, *lines, strict=True)]

    def line(cells: list[str]) -> str:
        padded = (cell.rjust(width) if name in right else cell.ljust(width)
                  for name, cell, width in zip(header, cells, widths, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (width + 1) + ":") if name in right else "-" * (width + 2)
                          for name, width in zip(header, widths, strict=True)) + "|"
    table = [line(header), rule, *(line(cells) for cells in lines)]
    return "\n".join(table) + "\n\n" + _machine_line(machine) + "\n"


def _measure(unit: Unit, mean: float, stddev: float | None = None) -> str:
    decimals = _DECIMALS[unit]
    spread = "" if stddev is None else f" ± {stddev:.{decimals}f}"
    return f"{mean:.{decimals}f}{spread} {unit}"


def _change_cells(unit: Unit, change: Change) -> list[str]:
    noise = " (noise)" if change.noise else ""
    return [_measure(unit, change.before_mean), f"{change.percent:+.1f}%{noise}"]


def _binary_bytes(size: float) -> str:
    """Binary units, as llama-bench shows model sizes (256.0 MiB), so that the two tables
    read alike; `units.format_bytes` is the decimal MB that `llmctl list` shows."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _machine_line(machine: Machine) -> str:
    parts = [machine.cpu, f"{machine.cores} threads", f"{_binary_bytes(machine.ram_bytes)} RAM"]
    if machine.gpu:
        parts.append(machine.gpu)
    parts.append(machine.os)
    libraries = ", ".join(f"{name} {version}" for name, version in machine.libraries.items())
    return "; ".join(filter(None, (", ".join(parts), libraries,
                                   f"llmctl {machine.llmctl_version}")))


# -- flat rows: csv and sql ------------------------------------------------------------------

def _sql_type(hint: Any) -> str:
    if hint in (int, int | None):
        return "INTEGER"
    return "REAL" if hint in (float, float | None) else "TEXT"  # str, Literal, lists


# Evaluated once: the annotations are strings (`from __future__ import annotations`).
_HINTS = get_type_hints(Result)
_RESULT_COLUMNS = [(f.name, _sql_type(_HINTS[f.name])) for f in fields(Result)]
_RESULT_COLUMNS += [("mean", "REAL"), ("stddev", "REAL")]


def library_column(name: str) -> str:
    """`lib_llama_cpp` for "llama.cpp": a name every SQL and CSV reader takes as is."""
    return "lib_" + re.sub(r"[^a-z0-9]", "_", name.lower())


def flat_columns(machine: Machine) -> list[tuple[str, str]]:
    """(name, SQL type) of every flat column, in order, for rows measured on `machine`."""
    libraries = [(library_column(name), "TEXT") for name in machine.libraries]
    return [*_RESULT_COLUMNS, *_MACHINE_COLUMNS, *libraries]


def flat_row(row: Result, machine: Machine) -> dict[str, Any]:
    """The row's values by flat column; lists as space-separated text, None kept."""
    data = row.to_dict()
    for name, value in data.items():
        if isinstance(value, list):
            data[name] = " ".join(str(item) for item in value)
    data.update(cpu=machine.cpu, cores=machine.cores, ram_bytes=machine.ram_bytes,
                os=machine.os, gpu=machine.gpu, machine_key=machine.key,
                llmctl_version=machine.llmctl_version, python_version=machine.python_version)
    data.update((library_column(name), version) for name, version in machine.libraries.items())
    return data


def csv_text(results: list[Result], machine: Machine) -> str:
    columns = [name for name, _ in flat_columns(machine)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in results:
        data = flat_row(row, machine)
        writer.writerow(["" if data[name] is None else data[name] for name in columns])
    return out.getvalue()


def sql_text(results: list[Result], machine: Machine, run_id: int | None = None) -> str:
    """A script that creates the table `bench` when it is missing and inserts the rows, as
    llama-bench's `-o sql`: `llmctl bench -o sql | sqlite3 bench.db` collects runs. Its
    columns are the flat ones plus `run_id`, the history's id of the run (NULL if unsaved).
    Rows from a machine with other libraries need a table with their lib_ columns."""
    columns = [*flat_columns(machine), ("run_id", "INTEGER")]
    names = ", ".join(name for name, _ in columns)
    typed = ",\n".join(f"  {name} {kind}" for name, kind in columns)
    lines = [f"CREATE TABLE IF NOT EXISTS bench (\n{typed}\n);"]
    for row in results:
        data = {**flat_row(row, machine), "run_id": run_id}
        values = ", ".join(_sql_literal(data[name]) for name, _ in columns)
        lines.append(f"INSERT INTO bench ({names}) VALUES ({values});")
    return "\n".join(lines) + "\n"


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        if math.isnan(value):
            return "NULL"
        if math.isinf(value):  # SQLite reads an out-of-range literal as infinity
            return "9e999" if value > 0 else "-9e999"
        return repr(value)  # repr round-trips the float exactly
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


# -- json ------------------------------------------------------------------------------------

def _objects(results: list[Result], machine: Machine, run_id: int | None,
             compared: dict[int, Change] | None) -> list[dict]:
    machine_data = machine.to_dict()
    objects = [{**row.to_dict(), "machine": machine_data, "run_id": run_id}
               for row in results]
    if compared is not None:  # --compare: the earlier run's figure, or null
        for index, data in enumerate(objects):
            change = compared.get(index)
            data["change"] = asdict(change) if change else None
    return objects


def json_text(results: list[Result], machine: Machine, run_id: int | None = None,
              compared: dict[int, Change] | None = None) -> str:
    """One JSON document: a list of rows, each with its machine and run id (and with
    `compared`, its "change")."""
    return json.dumps(_objects(results, machine, run_id, compared), indent=2,
                      ensure_ascii=False) + "\n"


def jsonl_text(results: list[Result], machine: Machine, run_id: int | None = None,
               compared: dict[int, Change] | None = None) -> str:
    """The same objects as `json_text`, one per line, for appending to a log."""
    return "".join(json.dumps(data, ensure_ascii=False) + "\n"
                   for data in _objects(results, machine, run_id, compared))


# -- the table of formats --------------------------------------------------------------------

Renderer = Callable[[list[Result], Machine, "int | None", "dict[int, Change] | None"], str]

_RENDERERS: dict[str, Renderer] = {
    "md": lambda results, machine, run_id, compared: markdown(results, machine, compared),
    "csv": lambda results, machine, run_id, compared: csv_text(results, machine),
    "json": json_text,
    "jsonl": jsonl_text,
    "sql": lambda results, machine, run_id, compared: sql_text(results, machine, run_id),
}
FORMATS = tuple(_RENDERERS)  # ("md", "csv", "json", "jsonl", "sql")


def render(fmt: str, results: list[Result], machine: Machine, run_id: int | None = None,
           compared: dict[int, Change] | None = None) -> str:
    """The rows in format `fmt`; markdown and JSON show `compared`, CSV and SQL (one
    row per measurement, for other tools) do not."""
    renderer = _RENDERERS.get(fmt)
    if renderer is None:
        raise UsageError(f"unknown output format '{fmt}'",
                         hint=f"use one of: {', '.join(FORMATS)}")
    return renderer(results, machine, run_id, compared)
