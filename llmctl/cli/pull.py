"""llmctl pull: bring models into the store."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.cli.common import JsonOpt, QuietOpt, complete_model
from llmctl.cli.output import Output, format_bytes


def pull(
    models: Annotated[list[str], typer.Argument(
        metavar="MODEL", help="Catalog names (NAME[:TAG]) or paths to .gguf files.",
        autocompletion=complete_model, show_default=False)],
    name: Annotated[str | None, typer.Option(
        "--name", help="Store a file pulled from a path as NAME[:TAG].")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Pull again even if the model is stored.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Store models from the catalog, an installed package or a local file.

    Files already on this machine are linked into the store, never copied. stdout gets
    the name of each stored model (--json: its manifest, one JSON line per model).

    Examples:

    \b
        llmctl pull smollm2
        llmctl pull ./models/mistral-7b-instruct.Q4_K_M.gguf --name mistral:7b
        llmctl pull -q smollm2 gemma3
    """
    from llmctl.cli.common import open_store
    from llmctl.store.pull import pull as pull_model

    if name and len(models) > 1:
        raise typer.BadParameter("--name needs exactly one MODEL", param_hint="--name")
    out = Output(json_mode=json, quiet=quiet)
    layout, catalog = open_store()
    with out.progress() as report:
        for text in models:
            result = pull_model(
                text, layout, catalog, name=name, force=force,
                on_event=lambda e: report(e.model, e.status, e.completed, e.total),
            )
            manifest = result.manifest
            if result.status == "exists":
                out.info(f"{manifest.reference}: already in the store")
            else:
                how = {"hardlink": "linked", "symlink": "linked (symbolic link)",
                       "copy": "written", "existing": "reused a stored file"}[result.how]
                out.info(f"{manifest.reference}: {format_bytes(manifest.size)}, {how}")
            if json:
                out.json_line(manifest.to_dict())
            else:
                out.line(manifest.reference)
