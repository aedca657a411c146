"""llmctl ls: the models in the store, or (--available) the ones the catalog knows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from llmctl.cli.common import JsonOpt, QuietOpt
from llmctl.cli.output import Output
from llmctl.units import format_age, format_bytes

if TYPE_CHECKING:
    from llmctl.store.catalog import AvailableModel
    from llmctl.store.layout import StoreLayout


def ls(
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    available: Annotated[bool, typer.Option(
        "--available", help="List the catalog's models (stored or not) instead.")] = False,
    engine: Annotated[str | None, typer.Option(
        help="Only models for this engine (llama, mlx, diffusers, coreml).")] = None,
    kind: Annotated[str | None, typer.Option(help="Only text or image models.")] = None,
    fits: Annotated[bool, typer.Option(
        "--fits", help="With --available: only models that fit this machine's memory "
                       "(LLMCTL_MEMORY_LIMIT overrides it).")] = False,
    partial: Annotated[bool, typer.Option(
        "--partial", help="List interrupted downloads instead (continued by the same "
                          "pull; deleted by llmctl rm --partial).")] = False,
    images: Annotated[bool, typer.Option(
        "--images", help="List the images llmctl imagine wrote to the gallery instead "
                         "(deleted by llmctl rm --image ID).")] = False,
) -> None:
    """List stored models.

    With --available, the catalog's models: size, engine, kind, format, whether they fit
    in memory, whether they are stored, and the quantizations to pull (NAME:TAG-QUANT).

    Examples:

    \b
        llmctl ls
        llmctl ls -q | xargs llmctl rm -y
        llmctl ls --json | jq '.[].name'
        llmctl ls --available --fits
        llmctl ls --available --kind text --engine llama --json
        llmctl ls --partial
        llmctl ls --images
    """
    from llmctl.store.layout import StoreLayout

    out = Output(json_mode=json, quiet=quiet)
    layout = StoreLayout.default()
    if available:
        _available(out, layout, engine, kind, fits)
        return
    if partial:
        _partial(out, layout)
        return
    if images:
        _images(out, layout)
        return
    if fits:
        from llmctl.errors import UsageError

        raise UsageError("--fits goes with --available", hint="try: llmctl ls --available --fits")
    from llmctl.store.manifest import list_models, store_size

    models = [m for m in list_models(layout)
              if (not engine or m.manifest.engine == engine)
              and (not kind or m.manifest.kind == kind)]
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


def _available(out: Output, layout: StoreLayout, engine: str | None, kind: str | None,
               fits: bool) -> None:
    from llmctl.store.catalog import Catalog, available

    found = available(Catalog.default(layout.root), layout, engine=engine, kind=kind,
                      fits=fits)
    if out.json_mode:
        out.json([m.to_dict() for m in found.models])
        return
    if out.quiet:
        for model in found.models:
            out.line(model.entry.reference)
        return
    out.table(("NAME", "SIZE", "ENGINE", "KIND", "FORMAT", "FITS", "STORED", "QUANTIZATIONS"),
              [_row(m) for m in found.models])
    memory = format_bytes(found.memory) if found.memory else "unknown"
    fitting = sum(1 for m in found.models if m.fits)
    out.info(f"{len(found.models)} model{'s' if len(found.models) != 1 else ''}, {fitting} "
             f"fit in {memory} of memory; pull one with: llmctl pull NAME:TAG")


def _row(model: AvailableModel) -> tuple[str, ...]:
    entry = model.entry
    fits = "?" if model.fits is None else "yes" if model.fits else "no"
    # "yes" for the entry itself; a stored variant by its quantization ("q8_0").
    stored = ["yes" if ref == entry.reference else ref.removeprefix(entry.reference + "-")
              for ref in model.stored]
    return (entry.reference, format_bytes(entry.size) if entry.size else "-",
            entry.engine or "?", entry.kind or "?", entry.format or "?", fits,
            ", ".join(stored) or "-", ",".join(entry.quantizations) or "-")


def _partial(out: Output, layout: StoreLayout) -> None:
    from llmctl.store.download import partials

    found = partials(layout)
    if out.json_mode:
        out.json([{"id": p.key, "model": p.model, "url": p.url, "done": p.done,
                   "size": p.size, "updated": p.updated} for p in found])
        return
    if out.quiet:
        for p in found:
            out.line(p.key)
        return
    rows = []
    for p in found:
        share = f"{100 * p.done / p.size:.0f}%" if p.size else "?"
        of = f"{format_bytes(p.done)}/{format_bytes(p.size) if p.size else '?'}"
        rows.append((p.key[:12], p.model or "-", f"{share} {of}", format_age(p.updated),
                     p.url))
    out.table(("ID", "MODEL", "PROGRESS", "UPDATED", "URL"), rows)
    out.info(f"{len(found)} interrupted download{'s' if len(found) != 1 else ''}; the same "
             "pull continues one, llmctl rm --partial deletes them")


def _images(out: Output, layout: StoreLayout) -> None:
    from datetime import datetime

    from llmctl.gallery import gallery_folder, list_images

    found = list_images(layout)
    if out.json_mode:
        out.json([{**image.meta, "id": image.id, "path": str(image.path)} for image in found])
        return
    if out.quiet:
        for image in found:
            out.line(image.id)
        return
    rows = []
    for image in found:
        meta = image.meta
        prompt = " ".join(str(meta.get("prompt", "")).split())
        try:
            created = format_age(datetime.fromisoformat(meta["created"]).timestamp())
        except (KeyError, TypeError, ValueError):
            created = "?"
        rows.append((image.id, f"{meta.get('width', '?')}x{meta.get('height', '?')}",
                     str(meta.get("seed", "?")), created,
                     prompt[:60] + ("..." if len(prompt) > 60 else "")))
    out.table(("ID", "SIZE", "SEED", "CREATED", "PROMPT"), rows)
    out.info(f"{len(found)} image{'s' if len(found) != 1 else ''} in {gallery_folder(layout)}")
