"""Option types and helpers shared by the command modules.

Imported by every command at start-up: it must stay light (no engine, no store code at
import time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from llmctl.store.catalog import Catalog
    from llmctl.store.layout import StoreLayout


def complete_model(incomplete: str) -> list[str]:
    """Stored models first, then catalog models: what `llmctl run <TAB>` offers."""
    from llmctl.store import manifest
    from llmctl.store.catalog import Catalog
    from llmctl.store.layout import StoreLayout

    layout = StoreLayout.default()
    stored = [m.reference for m in manifest.iter_manifests(layout)]
    try:
        known = Catalog.default(layout.root).references()
    except Exception:  # a broken user catalog must not break completion
        known = []
    seen: dict[str, None] = dict.fromkeys(r for r in stored + known if r.startswith(incomplete))
    return list(seen)


def complete_stored_model(incomplete: str) -> list[str]:
    from llmctl.store import manifest
    from llmctl.store.layout import StoreLayout

    return [m.reference for m in manifest.iter_manifests(StoreLayout.default())
            if m.reference.startswith(incomplete)]


ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="A model: NAME[:TAG], a path to a .gguf file, or an ID prefix.",
    autocompletion=complete_model, show_default=False)]
StoredModelsArg = Annotated[list[str], typer.Argument(
    metavar="MODEL", help="Stored models: NAME[:TAG] or an ID prefix.",
    autocompletion=complete_stored_model, show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only names; no progress.")]


def open_store() -> tuple[StoreLayout, Catalog]:
    from llmctl.store.catalog import Catalog
    from llmctl.store.layout import StoreLayout

    layout = StoreLayout.default()
    return layout, Catalog.default(layout.root)
