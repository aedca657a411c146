"""llmctl rm: delete models and the files only they use."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.cli.options import complete_stored_model
from llmctl.cli.output import Output, is_terminal
from llmctl.errors import UsageError
from llmctl.units import format_bytes


def rm(
    models: Annotated[list[str] | None, typer.Argument(
        metavar="MODEL", help="Stored models: NAME[:TAG] or an ID prefix (with --partial: "
        "IDs of interrupted downloads; none means all).",
        autocompletion=complete_stored_model, show_default=False)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go; delete nothing."
                                          )] = False,
    partial: Annotated[bool, typer.Option(
        "--partial", help="Delete interrupted downloads (see: llmctl ls --partial).")] = False,
    image: Annotated[bool, typer.Option(
        "--image", help="Delete gallery images by ID, with their sidecars and previews "
                        "(see: llmctl ls --images).")] = False,
    broken: Annotated[bool, typer.Option(
        "--broken", help="Delete unreadable manifests (the ones llmctl warns about) and "
                         "stored files no model uses.")] = False,
    caches: Annotated[bool, typer.Option(
        "--caches", help="Delete the prompt caches saved with conversations (of MODEL, or "
                         "all); the models stay.")] = False,
) -> None:
    """Remove models from the store.

    Files another stored model still uses are kept. Files linked from elsewhere (a pip
    package, your own folder) stay where they are; only the store's link goes. A model's
    saved prompt caches go with it.

    Examples:

    \b
        llmctl rm smollm2 --dry-run
        llmctl rm -y smollm2:135m gemma3:270m
        llmctl rm --partial -y
        llmctl rm --image -y 3f2a9c1e
        llmctl rm --broken --dry-run
        llmctl rm --caches -y
    """

    from llmctl.cli.options import open_store

    out = Output()
    if partial:
        _rm_partial(out, models or [], yes=yes, dry_run=dry_run)
        return
    if image:
        _rm_images(out, models or [], yes=yes, dry_run=dry_run)
        return
    if caches:
        _rm_caches(out, models, yes=yes, dry_run=dry_run)
        return
    if broken:
        if models:
            raise UsageError("--broken takes no MODEL", hint="llmctl rm --broken [-y]")
        _rm_broken(out, yes=yes, dry_run=dry_run)
        return
    if not models:
        raise UsageError("name at least one MODEL", hint="see: llmctl ls")
    from llmctl.store.removal import plan_removal, remove

    layout, catalog = open_store()
    plan = plan_removal(layout, catalog, models)
    names = ", ".join(m.reference for m in plan.models)
    if dry_run:
        for manifest in plan.models:
            out.line(manifest.reference)
        out.info(f"would delete {names} and {len(plan.blobs)} file(s), "
                 f"freeing {format_bytes(plan.reclaimable)}")
        return
    if not yes and not _confirmed(out, f"Delete {names} ({format_bytes(plan.reclaimable)})?"):
        return
    done = remove(layout, plan)
    for manifest in done.models:
        out.line(manifest.reference)
    kept = f"; {done.linked} linked file(s) kept at their source" if done.linked else ""
    out.info(f"deleted {len(done.models)} model(s), freed {format_bytes(done.reclaimable)}"
             f"{kept}")


def _confirmed(out: Output, question: str) -> bool:
    """Ask on a terminal; refuse (exit 2) in a script, where nobody can answer."""
    import sys

    if not is_terminal(sys.stdin):
        raise UsageError("refusing to delete without confirmation",
                         hint="pass -y to delete from a script")
    if out.confirm(question):
        return True
    out.info("nothing deleted")
    return False


def _rm_caches(out: Output, models: list[str] | None, *, yes: bool, dry_run: bool) -> None:
    from llmctl.cli.options import open_store
    from llmctl.store.caches import find_caches, remove_caches
    from llmctl.store.lookup import resolve_stored

    layout, catalog = open_store()
    ids = [resolve_stored(layout, catalog, m).id for m in models] if models else None
    found = find_caches(layout, ids)
    what = f"{len(found.files)} prompt cache(s), {format_bytes(found.size)}"
    if dry_run or not found.files:
        out.info(f"would delete {what}")
        return
    if not yes and not _confirmed(out, f"Delete {what}?"):
        return
    remove_caches(layout, ids)
    out.info(f"deleted {what}")


def _rm_partial(out: Output, keys: list[str], *, yes: bool, dry_run: bool) -> None:

    from llmctl.store import download
    from llmctl.store.layout import StoreLayout

    layout = StoreLayout.default()
    found = download.partials(layout)
    chosen = [p for p in found if not keys or any(p.key.startswith(k) for k in keys)]
    if keys and (missing := [k for k in keys if not any(p.key.startswith(k) for p in found)]):
        raise UsageError(f"no interrupted download {', '.join(missing)}",
                         hint="see: llmctl ls --partial")
    size = sum(p.path.stat().st_size for p in chosen if p.path.exists())
    if dry_run or not chosen:
        for p in chosen:
            out.line(p.key)
        out.info(f"would delete {len(chosen)} download(s), {format_bytes(size)}")
        return
    question = f"Delete {len(chosen)} interrupted download(s) ({format_bytes(size)})?"
    if not yes and not _confirmed(out, question):
        return
    deleted = 0
    for p in chosen:
        if download.remove_partial(layout, p.key):
            out.line(p.key)
            deleted += 1
        else:
            out.warn(f"{p.key} ({p.model or p.url}) is being downloaded right now; kept")
    out.info(f"deleted {deleted} download(s)")


def _rm_images(out: Output, ids: list[str], *, yes: bool, dry_run: bool) -> None:
    from llmctl.gallery import delete_images, find_images
    from llmctl.store.layout import StoreLayout

    if not ids:
        raise UsageError("name at least one image ID", hint="see: llmctl ls --images")
    chosen = find_images(StoreLayout.default(), ids)
    if dry_run:
        for found in chosen:
            out.line(found.id)
        out.info(f"would delete {len(chosen)} image(s)")
        return
    if not yes and not _confirmed(out, f"Delete {len(chosen)} image(s)?"):
        return
    delete_images(chosen)
    for found in chosen:
        out.line(found.id)
    out.info(f"deleted {len(chosen)} image(s)")


def _rm_broken(out: Output, *, yes: bool, dry_run: bool) -> None:
    from llmctl.store.layout import StoreLayout
    from llmctl.store.removal import clean_up, plan_cleanup

    layout = StoreLayout.default()
    plan = plan_cleanup(layout)
    what = (f"{len(plan.broken)} unreadable manifest(s) and {len(plan.blobs)} unused "
            f"file(s), {format_bytes(plan.reclaimable)}")
    if dry_run or not (plan.broken or plan.blobs):
        for broken in plan.broken:
            out.line(str(broken.path))
        out.info(f"would delete {what}" if dry_run else "nothing to delete")
        return
    if not yes and not _confirmed(out, f"Delete {what}?"):
        return
    done = clean_up(layout)
    for broken in done.broken:
        out.line(str(broken.path))
    out.info(f"deleted {len(done.broken)} unreadable manifest(s) and {len(done.blobs)} "
             f"unused file(s), freed {format_bytes(done.reclaimable)}")
