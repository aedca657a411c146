"""llmctl ls: the models in the store."""

from __future__ import annotations

from llmctl.cli.common import JsonOpt, QuietOpt
from llmctl.cli.output import Output, format_age, format_bytes


def ls(json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """List stored models.

    Examples:

    \b
        llmctl ls
        llmctl ls -q | xargs llmctl rm -y
        llmctl ls --json | jq '.[].name'
    """
    from llmctl.store.layout import StoreLayout
    from llmctl.store.manifest import list_models, store_size

    out = Output(json_mode=json, quiet=quiet)
    layout = StoreLayout.default()
    models = list_models(layout)
    if json:
        out.json([dict(m.manifest.to_dict(), modified=m.modified) for m in models])
        return
    if quiet:
        for model in models:
            out.line(model.manifest.reference)
        return
    rows = [
        (m.manifest.reference, m.manifest.id, format_bytes(m.manifest.size),
         format_age(m.modified), m.manifest.engine, m.manifest.format)
        for m in models
    ]
    out.table(("NAME", "ID", "SIZE", "MODIFIED", "ENGINE", "FORMAT"), rows)
    total = store_size(models)
    out.info(f"{len(models)} model{'s' if len(models) != 1 else ''}, {format_bytes(total)}"
             f" in {layout.root}")
