"""The llmctl command: attaches one module per command and maps errors to exit codes."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from llmctl import __version__
from llmctl.cli import ls, pull, rm, run, show

app = typer.Typer(
    name="llmctl",
    help="Run AI models on your own machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 ok, 1 failure, 2 usage, 3 model not found, 4 verification failed, "
           "5 not enough disk or memory, 130 interrupted. Store: $LLMCTL_HOME.",
)
app.command("pull")(pull.pull)
app.command("ls")(ls.ls)
app.command("rm")(rm.rm)
app.command("show")(show.show)
app.command("run")(run.run)


def _version(value: bool) -> None:
    if value:
        print(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Run AI models on your own machine: pull, ls, rm, show, run."""


def main() -> None:
    from llmctl.cli import errors
    from llmctl.cli.output import Output

    try:
        # standalone_mode=False: errors come back here, to be told in one line. A fixed
        # prog_name keeps `python -m llmctl` and `llmctl` alike, completion variable included.
        code = app(standalone_mode=False, prog_name="llmctl")
    except typer.Abort:  # Ctrl-C at a prompt
        sys.stderr.write("\n")
        code = errors.INTERRUPTED
    except KeyboardInterrupt:
        code = errors.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`llmctl ls | head -1`): stop quietly, and keep Python from
        # complaining while it flushes stdout on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = errors.FAILURE
    except Exception as exc:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError

        if isinstance(exc, NoArgsIsHelpError):  # `llmctl` alone: the help was shown
            code = errors.OK
        elif isinstance(exc, ClickException):  # usage errors: bad options, missing arguments
            hint = ""
            if ctx := getattr(exc, "ctx", None):
                hint = f" (see: {ctx.command_path} --help)"
            Output().error(exc.format_message() + hint)
            code = exc.exit_code
        elif known := errors.describe(exc):
            code, message = known
            Output().error(message)
        else:
            if os.environ.get("LLMCTL_DEBUG"):
                raise
            Output().error(f"unexpected {type(exc).__name__}: {exc} (this is a bug; "
                           "run again with LLMCTL_DEBUG=1 to see where, and report it)")
            code = errors.FAILURE
        if os.environ.get("LLMCTL_DEBUG"):
            import traceback

            traceback.print_exception(exc)
    sys.exit(code if isinstance(code, int) else 0)
