"""llmctl ls: the models in the store, or (--available) the ones the catalog knows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from llmctl.cli.options import JsonOpt, QuietOpt
from llmctl.cli.output import Output
from llmctl.units import format_age, format_bytes

if TYPE_CHECKING:
    from llmctl.gallery import GalleryImage
    from llmctl.store.catalog import AvailableModel
    from llmctl.store.download import Partial
    from llmctl.store.layout import StoreLayout


def ls(
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    available: Annotated[bool, typer.Option(
        "--available", help="List the catalog's models (stored or not) instead.")] = False,
    engine: Annotated[str | None, typer.Option(
        help="Only models for this engine (llama, mlx, transformers, onnx, diffusers, "
        "coreml, faster-whisper, mlx-whisper, whisper.cpp): the one each runs on here."
    )] = None,
    kind: Annotated[str | None, typer.Option(
        help="Only text, image or speech models.")] = None,
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
        llmctl ls --kind speech
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
    from llmctl.store.caches import find_caches
    from llmctl.store.manifest import list_models, store_size

    caches = find_caches(layout).size if not (engine or kind) else 0
    models = [m for m in list_models(layout)
              if (not engine or m.manifest.engine_here == engine)
              and (not kind or m.manifest.kind == kind)]
    out.records(
        models, record=lambda m: dict(m.manifest.to_dict(), modified=m.modified,
                                      engine=m.manifest.engine_here),
        name=lambda m: m.manifest.reference,
        columns=("NAME", "ID", "SIZE", "MODIFIED", "ENGINE", "FORMAT"),
        row=lambda m: (m.manifest.reference, m.manifest.id, format_bytes(m.manifest.size),
                       format_age(m.modified), m.manifest.engine_here, m.manifest.format),
        summary=f"{len(models)} model{'s' if len(models) != 1 else ''}, "
                f"{format_bytes(store_size(models) + caches)}"
                + (f" ({format_bytes(caches)} of prompt caches)" if caches else "")
                + f" in {layout.root}")


def _available(out: Output, layout: StoreLayout, engine: str | None, kind: str | None,
               fits: bool) -> None:
    from llmctl.store.catalog import Catalog, available

    found = available(Catalog.default(layout.root), layout, engine=engine, kind=kind,
                      fits=fits)
    memory = format_bytes(found.memory) if found.memory else "unknown"
    fitting = sum(1 for m in found.models if m.fits)
    out.records(
        found.models, record=lambda m: m.to_dict(), name=lambda m: m.entry.reference,
        columns=("NAME", "SIZE", "ENGINE", "KIND", "FORMAT", "FITS", "STORED",
                 "QUANTIZATIONS"), row=_row,
        summary=f"{len(found.models)} model{'s' if len(found.models) != 1 else ''}, "
                f"{fitting} fit in {memory} of memory; pull one with: llmctl pull NAME:TAG")


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
    out.records(
        found, record=lambda p: {"id": p.key, "model": p.model, "url": p.url, "done": p.done,
                                 "size": p.size, "updated": p.updated},
        name=lambda p: p.key, columns=("ID", "MODEL", "PROGRESS", "UPDATED", "URL"),
        row=_partial_row,
        summary=f"{len(found)} interrupted download{'s' if len(found) != 1 else ''}; the "
                "same pull continues one, llmctl rm --partial deletes them")


def _partial_row(p: Partial) -> tuple[str, ...]:
    share = f"{100 * p.done / p.size:.0f}%" if p.size else "?"
    of = f"{format_bytes(p.done)}/{format_bytes(p.size) if p.size else '?'}"
    return p.key[:12], p.model or "-", f"{share} {of}", format_age(p.updated), p.url


def _images(out: Output, layout: StoreLayout) -> None:
    from llmctl.gallery import gallery_folder, list_images

    found = list_images(layout)
    out.records(
        found, record=lambda image: {**image.meta, "id": image.id, "path": str(image.path)},
        name=lambda image: image.id, columns=("ID", "SIZE", "SEED", "CREATED", "PROMPT"),
        row=_image_row,
        summary=f"{len(found)} image{'s' if len(found) != 1 else ''} in "
                f"{gallery_folder(layout)}")


def _image_row(image: GalleryImage) -> tuple[str, ...]:
    from datetime import datetime

    meta = image.meta
    prompt = " ".join(str(meta.get("prompt", "")).split())
    try:
        created = format_age(datetime.fromisoformat(meta["created"]).timestamp())
    except (KeyError, TypeError, ValueError):
        created = "?"
    return (image.id, f"{meta.get('width', '?')}x{meta.get('height', '?')}",
            str(meta.get("seed", "?")), created,
            prompt[:60] + ("..." if len(prompt) > 60 else ""))
