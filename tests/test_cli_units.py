"""The error table, the output helpers and the engine registry."""

from __future__ import annotations

import errno
import io

import pytest

from llmctl import errors
from llmctl.cli import errors as table
from llmctl.cli.output import Output
from llmctl.engines import registry
from llmctl.store.register import PullEvent
from llmctl.units import format_age, format_bytes, format_count


@pytest.mark.parametrize("exc, code, words", [
    (errors.UsageError("bad", hint="do this"), 2, "bad; do this"),
    (errors.ModelNotFound("x", ["y"]), 3, "did you mean y?"),
    (errors.ModelNotFound("x", in_catalog=True), 3, "try: llmctl pull x"),
    (errors.ModelNotFound("x"), 3, "try: llmctl ls"),
    (errors.AmbiguousReference("ab", ["a:1", "b:1"]), 2, "a:1, b:1"),
    (errors.SourceUnavailable("m:1", ["r1", "r2"]), 3, "r1; r2"),
    (errors.VerificationFailed("f.gguf", "truncated"), 4, "f.gguf: truncated"),
    (errors.EngineUnavailable("llama", "missing", "pip install x"), 1, "install it: pip install x"),
    (OSError(errno.ENOSPC, "No space left on device", "/s"), 5, "not enough disk space"),
    (PermissionError(errno.EACCES, "Permission denied", "/s"), 1, "permission denied"),
])
def test_known_errors_become_one_line_and_an_exit_code(exc: Exception, code: int,
                                                      words: str) -> None:
    got_code, message = table.describe(exc)
    assert got_code == code
    assert words in message and "\n" not in message


def test_unknown_errors_are_bugs() -> None:
    assert table.describe(ValueError("oops")) is None


def test_formatters() -> None:
    assert format_bytes(98_362_432) == "98.4 MB"
    assert format_bytes(4_700_000_000) == "4.7 GB"
    assert format_bytes(512) == "512 B"
    assert format_count(134_515_008) == "134.5M"
    assert format_age(1000, now=1000 + 7200) == "2 hours ago"
    assert format_age(1000, now=1001) == "just now"


def test_table_aligns_columns_without_trailing_spaces() -> None:
    out = Output(stdout=io.StringIO())
    out.table(("NAME", "SIZE"), [("a:long-tag", "1 B"), ("b", "22 MB")])
    assert out.stdout.getvalue().splitlines() == [
        "NAME          SIZE", "a:long-tag    1 B", "b             22 MB"]


def test_progress_outside_a_terminal_prints_each_status_once() -> None:
    err = io.StringIO()
    out = Output(stdout=io.StringIO(), stderr=err)
    with out.progress() as report:
        for done in range(5):
            report(PullEvent("m:1", "verifying", done, 4))
        report(PullEvent("m:1", "success"))
    assert err.getvalue() == "m:1: verifying\nm:1: success\n"


def test_quiet_and_json_modes_print_no_progress() -> None:
    for out in (Output(quiet=True, stderr=io.StringIO()), Output(json_mode=True,
                                                                   stderr=io.StringIO())):
        with out.progress() as report:
            report(PullEvent("m", "s", 1, 2))
        assert out.stderr.getvalue() == ""


def test_registry_chooses_by_format_and_checks_overrides() -> None:
    assert registry.choose("gguf", "text").name == "llama"
    with pytest.raises(errors.UsageError, match="unknown engine"):
        registry.choose("gguf", "text", "nope")
    with pytest.raises(errors.UsageError, match="no engine"):
        registry.choose("tflite", "text")


def test_a_missing_engine_library_names_the_install_command() -> None:
    spec = registry.EngineSpec("ghost", "llmctl.engines.ghost", "text",
                               "no_such_module_for_llmctl", "pip install 'llmctl[ghost]'")
    with pytest.raises(errors.EngineUnavailable) as caught:
        registry.check_available(spec)
    assert "pip install 'llmctl[ghost]'" in table.describe(caught.value)[1]


def test_help_summaries_match_the_commands_docstrings() -> None:
    from llmctl.cli.app import COMMANDS, command_function

    for name, summary in COMMANDS.items():
        command = command_function(name)
        assert command.__doc__.strip().splitlines()[0] == summary, name
