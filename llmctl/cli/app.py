"""The llmctl command: attaches one module per command and maps errors to exit codes."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Annotated

import typer
import typer.main
from typer._click import Command, Context, HelpFormatter
from typer.core import TyperCommand, TyperGroup

from llmctl import __version__

# Command name -> the one line `llmctl --help` shows (a test keeps it equal to the first
# line of the command's docstring). Modules are imported only when their command runs.
COMMANDS = {
    "pull": "Store models from the catalog, Hugging Face, a URL or a local file.",
    "ls": "List stored models.",
    "rm": "Remove models from the store.",
    "show": "Show a stored model: its files, source and the metadata in its GGUF header.",
    "run": "Run a model on one prompt and stream the reply to stdout.",
    "chat": "Chat with a model, in the terminal or through a pipe.",
    "imagine": "Generate images from a text prompt and print the paths of the PNG files.",
    "transcribe": "Transcribe speech to text with a Whisper model.",
    "batch": "Run a model over a file of prompts, several at once; results as JSON Lines.",
    "convert": "Convert a model to another engine's format and store the result.",
    "bench": "Measure models: tokens/s, time to first token, load time, seconds per image.",
    "import": "Register models already on disk (Ollama's store, the Hugging Face cache).",
    "catalog": "Manage the catalog: add your own models, list, export and import entries.",
    "completion": "Print the tab-completion script for bash, zsh or fish.",
}
# A command whose name is a Python keyword lives in a module (and function) named with a
# trailing underscore.
MODULES = {"import": "import_"}
# Plain help, as git and Ollama print it: no rich import on start-up (it costs more than
# the rest of `llmctl --help` together), nothing to strip when piped into a pager or a file.
MARKUP = None


class LazyCommands(TyperGroup):
    """A command group that builds only the command being run.

    typer builds every command's parameters up front; with lazy commands `llmctl --help`
    lists the summaries above without importing a command module, and `llmctl ls` builds
    `ls` alone, which keeps start-up at a bare typer app's cost (README, performance).
    """

    _listing = False

    def list_commands(self, ctx: Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if cmd_name not in COMMANDS:
            return None
        if self._listing:  # the help listing needs names and summaries only
            return TyperCommand(cmd_name, short_help=COMMANDS[cmd_name])
        return _build(cmd_name)

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def command_function(name: str) -> Callable[..., None]:
    """The function behind a command (a group's: the one whose docstring is its help)."""
    module = MODULES.get(name, name)
    return getattr(importlib.import_module(f"llmctl.cli.{module}"), module)


class OptionalValues(TyperCommand):
    """A command with options whose value may be left out (`convert --to mlx -q`, `convert
    --to onnx -q int8`), which typer's parser does not offer: given bare (last, or before
    another option), such an option gets its module's stand-in value before parsing."""

    optional_values: dict[str, str] = {}

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, with_values(args, self.optional_values))


def with_values(args: list[str], optional: dict[str, str]) -> list[str]:
    """`args` with the stand-in value after each option of `optional` given without one."""
    done: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            return done + args[index:]
        done.append(arg)
        following = args[index + 1] if index + 1 < len(args) else None
        if arg in optional and (following is None or following.startswith("-")):
            done.append(optional[arg])
    return done


@functools.cache
def _build(name: str) -> Command:
    function = command_function(name)
    module = sys.modules[function.__module__]
    # A command group (`catalog add|rm|...`) lists its subcommands beside its function.
    subcommands = getattr(module, "SUBCOMMANDS", None)
    single = typer.Typer(rich_markup_mode=MARKUP, pretty_exceptions_enable=False,
                         add_completion=False, no_args_is_help=bool(subcommands))
    if subcommands:
        single.callback()(function)
        for sub, sub_function in subcommands.items():
            single.command(sub)(sub_function)
    elif optional := getattr(module, "OPTIONAL_VALUES", None):
        single.command(name, cls=type("Command", (OptionalValues,),
                                      {"optional_values": optional}))(function)
    else:
        single.command(name)(function)
    return typer.main.get_command(single)


app = typer.Typer(
    name="llmctl",
    cls=LazyCommands,
    add_completion=False,  # llmctl's own, which completes name:tag (cli/completion.py)
    help="Run AI models on your own machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=MARKUP,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 ok, 1 failure, 2 usage, 3 model not found, 4 verification failed, "
           "5 not enough disk or memory, 130 interrupted. Store: $LLMCTL_HOME.",
)


def _version(value: bool) -> None:
    if value:
        print(f"llmctl {__version__}")
        raise typer.Exit()


def _offline(value: bool) -> None:
    if value:  # for this process and every one it starts
        from llmctl.store.sources import OFFLINE_ENV

        os.environ[OFFLINE_ENV] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"


def _install_completion(value: bool) -> None:
    if value:
        from pathlib import Path

        from llmctl.cli import completion

        shell = completion.detected_shell()
        path = completion.install(shell, Path.home())
        print(f"installed {shell} completion in {path}; it works in new shells",
              file=sys.stderr)
        raise typer.Exit()


def _show_completion(value: bool) -> None:
    if value:
        from llmctl.cli import completion

        sys.stdout.write(completion.script(completion.detected_shell()))
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    offline: Annotated[bool, typer.Option(
        "--offline", callback=_offline, is_eager=True,
        help="No network at all: a model that is not stored is not pulled (exit 3).")
    ] = False,
    install_completion: Annotated[bool, typer.Option(
        "--install-completion", callback=_install_completion, is_eager=True,
        help="Install tab completion for the current shell ($SHELL).")] = False,
    show_completion: Annotated[bool, typer.Option(
        "--show-completion", callback=_show_completion, is_eager=True,
        help="Print the current shell's completion script.")] = False,
) -> None:
    """Run AI models on your own machine: pull, ls, rm, show, run, import, catalog."""


def _show_store_warnings() -> None:
    """The library reports what it skipped (an unreadable manifest, a bad catalog entry)
    with `warnings.warn(StoreWarning(...))`; here each is shown once, as llmctl's own
    warning line on stderr. Other warnings keep Python's handling."""
    import warnings

    from llmctl.errors import StoreWarning

    shown: set[str] = set()
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if not issubclass(category, StoreWarning):
            return default(message, category, filename, lineno, file, line)
        text = str(message)
        if text not in shown:
            from llmctl.cli.output import Output

            shown.add(text)
            Output().warn(text)
        return None

    warnings.showwarning = show
    warnings.simplefilter("always", StoreWarning)


def main() -> None:
    _show_store_warnings()
    try:
        # standalone_mode=False: errors come back here, to be told in one line. A fixed
        # prog_name keeps `python -m llmctl` and `llmctl` alike, completion variable included.
        code = app(standalone_mode=False, prog_name="llmctl")
    except (Exception, KeyboardInterrupt) as exc:
        code = _report(exc)
    sys.exit(code if isinstance(code, int) else 0)


def _report(exc: BaseException) -> int:
    """Say what went wrong in one line on stderr and return the exit code. Its imports
    happen only on failure: the error table is not start-up's business."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    from llmctl.cli import errors
    from llmctl.cli.output import Output

    debug = bool(os.environ.get("LLMCTL_DEBUG"))
    if isinstance(exc, KeyboardInterrupt | typer.Abort):  # Ctrl-C, at work or at a prompt
        if isinstance(exc, typer.Abort):
            sys.stderr.write("\n")
        return errors.INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        # The reader went away (`llmctl ls | head -1`): stop quietly, and keep Python from
        # complaining while it flushes stdout on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return errors.FAILURE
    if isinstance(exc, NoArgsIsHelpError):  # `llmctl` or `llmctl catalog` alone: the help
        sys.stdout.write(exc.format_message() + "\n")  # (outside standalone mode, unshown)
        return errors.OK
    if isinstance(exc, ClickException):  # usage errors: bad options, missing arguments
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx else ""
        Output().error(exc.format_message() + hint)
        return exc.exit_code
    known = errors.describe(exc)
    if known is None:
        if debug:
            raise exc
        Output().error(f"unexpected {type(exc).__name__}: {exc} (this is a bug; "
                       "run again with LLMCTL_DEBUG=1 to see where, and report it)")
        return errors.FAILURE
    if debug:
        import traceback

        traceback.print_exception(exc)
    code, message = known
    Output().error(message)
    return code
