"""Pulling: a reference (catalog name, hf://, URL, path) to its files, through the sources
in turn, then into the store (llmctl.store.register). Pulling never copies what is
already on disk: files from a path, a pip package or the Hugging Face cache are linked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from llmctl.errors import ModelNotFound, SourceUnavailable, UsageError
from llmctl.formats import ModelFormat
from llmctl.store import manifest as manifests
from llmctl.store import sources
from llmctl.store.catalog import Catalog, CatalogMatch
from llmctl.store.credentials import public_url
from llmctl.store.layout import StoreLayout, reference_part
from llmctl.store.lookup import find_stored, suggestions
from llmctl.store.manifest import Manifest
from llmctl.store.names import (
    HubRef,
    PathRef,
    Reference,
    UrlRef,
    parse_reference,
    sanitize_name,
)
from llmctl.store.register import (
    OnEvent,
    PullEvent,
    PullResult,
    describe_source,
    no_events,
    register,
    resolve_name,
)
from llmctl.store.sources import PullOptions, SourceMissing, local


def _file_progress(reference: str, on_event: OnEvent) -> Callable[[str, int, int], None]:
    """Sources report (file name, bytes done, bytes total) per file being fetched."""
    return lambda file, done, total: on_event(
        PullEvent(reference, f"pulling {file}", done, total))


def _from_catalog(layout: StoreLayout, match: CatalogMatch, on_event: OnEvent,
                  options: PullOptions, overwrite: bool = False) -> PullResult:
    """The entry's sources in turn (llmctl.store.sources' contract), until one can."""
    reasons = []
    entry = match.entry
    quantization = match.quantization
    for source in entry.sources:
        if not source.offers(quantization):
            continue  # this source does not publish that quantization
        try:
            # Held while the files are stored: a download stays locked until then.
            with sources.catalog_files(source.type, layout, source.options, quantization,
                                       options, on_progress=_file_progress(match.reference,
                                                                            on_event),
                                       model=match.reference) as files:
                files = replace(files, origin=dict(files.origin, quantization=quantization))
                return register(
                    layout, files, name=entry.name, tag=match.tag,
                    expected_sha256=source.sha256(quantization or ""), on_event=on_event,
                    overwrite=overwrite,
                    # An entry may leave the format to the files (an archive).
                    model_format=ModelFormat(entry.kind, entry.engine, entry.format)
                    if entry.format else None)
        except SourceMissing as exc:
            reasons.append(str(exc))
    raise SourceUnavailable(match.reference, reasons)


def _waiting(reference: str, on_event: OnEvent) -> Callable[[], None]:
    return lambda: on_event(PullEvent(reference, "waiting for another llmctl pulling it"))


def pull(
    ref: Reference | str,
    layout: StoreLayout,
    catalog: Catalog,
    *,
    name: str | None = None,
    force: bool = False,
    options: PullOptions | None = None,
    on_event: OnEvent = no_events,
) -> PullResult:
    """Store the model `ref` names. A model already stored is left alone unless `force`.

    Two processes pulling the same model take turns (a lock per model): the second finds
    the model stored by the first and downloads nothing."""
    options = options or PullOptions()
    if isinstance(ref, str):
        ref = parse_reference(ref)
    text = str(ref)  # credentials left out (llmctl.store.names.UrlRef)
    if isinstance(ref, PathRef):
        files = local.locate(ref.path)
        target_name, tag = resolve_name(name, sanitize_name(local.model_name(files)))
        return register(layout, files, name=target_name, tag=tag, expected_sha256=None,
                         on_event=on_event, overwrite=force)
    if isinstance(ref, HubRef):
        from llmctl.store.sources import hf

        target_name, tag = resolve_name(name, *hf.model_name(ref))
    elif isinstance(ref, UrlRef):
        from llmctl.store.sources import url

        target_name, tag = resolve_name(name, url.model_name(ref))
    else:
        if name:
            raise UsageError("--name applies only to pulls from a path, hf:// or a URL")
        match = None
        if force or not (stored := find_stored(layout, catalog, ref)):
            match = catalog.find(ref.name, ref.tag)
            if match is None:
                raise ModelNotFound(text, suggestions(text, layout, catalog))
            target_name, tag = match.entry.name, match.tag
        else:
            return PullResult(stored, "exists")
    reference = f"{target_name}:{tag}"
    if isinstance(ref, HubRef | UrlRef) and sources.offline() and not force and (
            manifests.load(layout, target_name, tag) is None):
        raise SourceUnavailable(reference, [sources.OFFLINE_REASON])
    with layout.work_lock(f"pull-{reference_part(reference)}", _waiting(reference, on_event)):
        if not force and (stored := manifests.load(layout, target_name, tag)):
            if isinstance(ref, HubRef | UrlRef) and not _same_source(stored, ref):
                # Another file under the name this one would get (two URLs ending in
                # model.gguf): say which, rather than "already in the store".
                shown = text
                if isinstance(ref, UrlRef) and ref.sha256:
                    shown += f"#sha256={ref.sha256}"
                raise UsageError(
                    f"{reference} is already stored ({describe_source(stored)})",
                    hint=f"store this one beside it: llmctl pull {shown} --name NAME[:TAG]"
                         ", or replace it with --force")
            return PullResult(stored, "exists")
        if isinstance(ref, HubRef):
            files = hf.fetch(ref, on_progress=_file_progress(reference, on_event))
            return register(layout, files, name=target_name, tag=tag, expected_sha256=None,
                             on_event=on_event, overwrite=force)
        if isinstance(ref, UrlRef):
            with url.fetching(layout, ref, options,
                              on_progress=_file_progress(reference, on_event)) as files:
                return register(layout, files, name=target_name, tag=tag,
                                expected_sha256=None, on_event=on_event, overwrite=force)
        assert match is not None
        return _from_catalog(layout, match, on_event, options, overwrite=force)


def _same_source(stored: Manifest, ref: HubRef | UrlRef) -> bool:
    """Whether the stored model came from where `ref` points (its repository, its URL)."""
    source = stored.source
    if isinstance(ref, HubRef):
        return source.get("type") == "hf" and source.get("repo") == ref.repo
    # Stored URLs carry no credentials: compare without them (a re-signed URL is the same).
    return source.get("type") == "url" and source.get("url") == public_url(ref.url)


