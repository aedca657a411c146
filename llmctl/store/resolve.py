"""What an engine opens for a reference: a stored model (its file, or its folder of
links), a catalog model (pulled first, as Ollama does), or a file or folder given by
path (run in place, not stored)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import ModelNotFound
from llmctl.formats import detect_format
from llmctl.formats.gguf import GGUFHeader, read_header
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout
from llmctl.store.lookup import find_by_digest, find_stored, suggestions
from llmctl.store.manifest import Manifest
from llmctl.store.model_files import check_file, model_folder
from llmctl.store.names import HubRef, PathRef, Reference, UrlRef, parse_reference
from llmctl.store.pull import pull
from llmctl.store.register import OnEvent, PullEvent, no_events
from llmctl.store.sources import local


@dataclass(frozen=True)
class Runnable:
    """What an engine needs to open a model: where it is and what it is. `path` is the
    file of a GGUF model and a folder for every other format (mlx-lm, diffusers and Core ML
    open folders)."""

    path: Path
    name: str
    kind: str
    format: str
    engine: str
    manifest: Manifest | None  # None for a model run straight from a path
    header: GGUFHeader | None = None  # GGUF models only


def runnable(
    ref: Reference | str,
    layout: StoreLayout,
    catalog: Catalog,
    *,
    on_event: OnEvent = no_events,
) -> Runnable:
    """The model to run for `text`: a stored model, a catalog model (pulled first, as
    Ollama does), or a file or folder given by path (run in place, not stored). The
    reference is parsed once, by the caller or here, and handed on as it is."""
    if isinstance(ref, str):
        ref = parse_reference(ref)
    if isinstance(ref, PathRef):
        files = local.locate(ref.path)
        name = local.model_name(files)
        if files.names is not None:  # a folder model: the engine opens the folder itself
            folder = Path(files.origin["path"])
            found = detect_format(files.names, folder / "config.json")
            assert found is not None  # local.locate returns only folders it recognises
            return Runnable(folder, name, found.kind, found.format, found.engine, None)
        path = files.paths[0]
        found = detect_format([path.name])
        if found is not None and found.format == "ggml":  # whisper.cpp's one-file models
            return Runnable(path, name, found.kind, found.format, found.engine, None)
        return Runnable(path, name, "text", "gguf", "llama", None, read_header(path))
    if isinstance(ref, HubRef | UrlRef):
        # As Ollama does for hf.co/... names: pull first (nothing if stored), then run.
        return _stored_runnable(layout, pull(ref, layout, catalog, on_event=on_event).manifest)
    manifest = find_stored(layout, catalog, ref)
    if manifest is None and ref.tag is None:
        manifest = find_by_digest(layout, ref.name)
    if manifest is None:
        match = catalog.find(ref.name, ref.tag)
        if match is None:
            raise ModelNotFound(str(ref), suggestions(str(ref), layout, catalog))
        on_event(PullEvent(match.reference, "pulling (not in the store yet)"))
        manifest = pull(ref, layout, catalog, on_event=on_event).manifest
    return _stored_runnable(layout, manifest)


def _stored_runnable(layout: StoreLayout, manifest: Manifest) -> Runnable:
    if manifest.format == "gguf":
        path, header = check_file(layout, manifest)
    else:
        path, header = model_folder(layout, manifest), None
    return Runnable(path, manifest.reference, manifest.kind, manifest.format,
                    manifest.engine_here, manifest, header)
