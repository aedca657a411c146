"""The `llmctl` command (and `python -m llmctl`): tab completion's fast path, which must not
pay for typer and the command modules, else the app."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["__complete"]:
        from llmctl.cli.complete import main as complete

        sys.exit(complete(sys.argv[2:]))
    from llmctl.cli.app import main as app

    app()


if __name__ == "__main__":
    main()
