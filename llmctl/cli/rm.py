"""llmctl rm: delete models and the files only they use."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.cli.common import StoredModelsArg
from llmctl.cli.output import Output, format_bytes, is_terminal


def rm(
    models: StoredModelsArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go; delete nothing."
                                          )] = False,
) -> None:
    """Remove models from the store.

    Files another stored model still uses are kept. Files linked from elsewhere (a pip
    package, your own folder) stay where they are; only the store's link goes.

    Examples:

    \b
        llmctl rm smollm2 --dry-run
        llmctl rm -y smollm2:135m gemma3:270m
    """
    import sys

    from llmctl.cli.common import open_store
    from llmctl.cli.errors import USAGE
    from llmctl.store.models import plan_removal, remove

    out = Output()
    layout, catalog = open_store()
    plan = plan_removal(layout, catalog, models)
    names = ", ".join(m.reference for m in plan.models)
    if dry_run:
        for manifest in plan.models:
            out.line(manifest.reference)
        out.info(f"would delete {names} and {len(plan.blobs)} file(s), "
                 f"freeing {format_bytes(plan.reclaimable)}")
        return
    if not yes:
        if not is_terminal(sys.stdin):
            out.error("refusing to delete without confirmation; pass -y to delete "
                      "from a script")
            raise typer.Exit(USAGE)
        if not out.confirm(f"Delete {names} ({format_bytes(plan.reclaimable)})?"):
            out.info("nothing deleted")
            return
    done = remove(layout, plan)
    for manifest in done.models:
        out.line(manifest.reference)
    kept = f"; {done.linked} linked file(s) kept at their source" if done.linked else ""
    out.info(f"deleted {len(done.models)} model(s), freed {format_bytes(done.reclaimable)}"
             f"{kept}")
