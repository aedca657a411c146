"""The batch output: JSON Lines, one result per prompt, appended and flushed as each
prompt ends, so that a run killed at any point loses only the prompts in flight.

An output file that already holds results makes the run resumable: the prompts it records
are skipped (the ids of results, the line numbers of input errors), and an unfinished last
line (the process was killed while writing it) is cut off first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO, Any

from llmctl.batch.lines import Id, LineError, Prompt
from llmctl.errors import UsageError


class Results:
    """Where results go: a file (resumable) or stdout (`-`)."""

    def __init__(self, path: Path | None, *, overwrite: bool = False):
        self.path = path
        self.done_ids: set[Id] = set()
        self.done_lines: set[int] = set()
        self.earlier = 0  # results an earlier run wrote
        if path is None:
            self.stream: IO[str] = sys.stdout
            return
        if path.is_dir():
            raise UsageError(f"-o {path} is a folder", hint="give a file name for the results")
        if path.exists() and not overwrite:
            self._resume(path)
        try:
            self.stream = path.open("w" if overwrite else "a", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"-o {path}: {exc.strerror or exc}", hint="check the path") from None

    def _resume(self, path: Path) -> None:
        data = path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # cut off while written: that prompt runs again
            with path.open("r+b") as file:
                file.truncate(len(complete))
        for number, line in enumerate(complete.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                raise UsageError(f"-o {path}: line {number} is not a result llmctl batch "
                                 "wrote", hint="give another file, or --overwrite to start "
                                 "over") from None
            if "line" in record:
                self.done_lines.add(record["line"])
            elif "id" in record:
                self.done_ids.add(record["id"])
            self.earlier += 1

    def done(self, item: Prompt | LineError) -> bool:
        """Whether an earlier run has written this prompt's result."""
        if isinstance(item, LineError):
            return item.line in self.done_lines
        return item.id in self.done_ids

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not sys.stdout:
            self.stream.close()
        else:
            self.stream.flush()

    def sync(self) -> None:
        """To disk as well (at the end of a run)."""
        if self.stream is not sys.stdout:
            self.stream.flush()
            os.fsync(self.stream.fileno())


def input_error(error: LineError) -> dict[str, Any]:
    record: dict[str, Any] = {"line": error.line}
    if error.id is not None:
        record["id"] = error.id
    record["error"] = error.message
    return record
