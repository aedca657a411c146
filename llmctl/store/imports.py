"""Register models that other tools already keep on this disk: Ollama's store and the
Hugging Face cache. Their files are linked into the store (hard links where the filesystem
allows), never copied, so an import costs no space and almost no time.

Each importer (`importers/ollama.py`, `importers/hf_cache.py`) reads its tool's folder
layout and returns `FoundModel`s; this module decides what to do with each. Files are
hashed as they are registered: the digests the other tool's layout states are checked,
never trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmctl.errors import LlmctlError, UsageError
from llmctl.store import importers
from llmctl.store import manifest as manifests
from llmctl.store.importers import FoundModel
from llmctl.store.layout import StoreLayout
from llmctl.store.manifest import Manifest
from llmctl.store.sources import LocalFiles

if TYPE_CHECKING:
    from llmctl.store.register import OnEvent

SOURCES = tuple(importers.IMPORTERS)


Status = Literal["imported", "exists", "would import", "skipped", "failed"]


@dataclass(frozen=True)
class ImportResult:
    found: FoundModel
    status: Status
    reason: str = ""
    manifest: Manifest | None = None
    error: Exception | None = None  # what made it fail, for the CLI's error table

    def to_dict(self) -> dict[str, Any]:
        found = self.found
        fmt = found.format
        return {
            "reference": found.reference, "name": found.name, "tag": found.tag,
            "status": self.status, "reason": self.reason,
            "kind": fmt.kind if fmt else None, "engine": fmt.engine if fmt else None,
            "format": fmt.format if fmt else None,
            "size": found.size if not found.problem else None,
            "files": len(found.paths), "source": found.origin,
            "id": self.manifest.id if self.manifest else None,
        }


def scan(source: str, folder: Path | None) -> tuple[Path, list[FoundModel]]:
    """The folder read (the default one when `folder` is None) and what it holds."""
    return importers.read(source, folder)


def select(found: list[FoundModel], wanted: list[str]) -> list[FoundModel]:
    """The found models `wanted` names (NAME or NAME:TAG, as they would be stored)."""
    if not wanted:
        return found
    chosen: dict[str, FoundModel] = {}
    for text in wanted:
        text = text.lower()
        matches = [f for f in found if text in (f.reference, f.name)]
        if not matches:
            known = ", ".join(sorted({f.reference for f in found})[:8]) or "nothing"
            raise UsageError(f"'{text}' is not among the models found",
                             hint=f"found: {known}")
        chosen.update((f.reference, f) for f in matches)
    return list(chosen.values())


def _same_model(stored: Manifest, found: FoundModel) -> bool:
    """True when the stored model has the found one's files (by digest where it is known,
    else by name and size), i.e. it was imported before."""
    if [f.name for f in stored.files] != found.names:
        return False
    for file, path, digest in zip(stored.files, found.paths, found.digests, strict=True):
        if (digest and file.digest != digest) or file.size != path.stat().st_size:
            return False
    return True


def import_models(
    layout: StoreLayout,
    found: list[FoundModel],
    *,
    dry_run: bool = False,
    on_event: OnEvent | None = None,
) -> list[ImportResult]:
    """Register each found model unless it is stored already; with `dry_run`, only say
    what would be done (nothing is written, not even the store's folders).

    A model that fails (a corrupt file, say) is reported as failed and the others go on:
    one bad model in a big Ollama store must not stop the import of the rest."""
    results = []
    for model in found:
        if model.problem:
            results.append(ImportResult(model, "skipped", model.problem))
            continue
        stored = manifests.load(layout, model.name, model.tag)
        if stored is not None:
            if _same_model(stored, model):
                results.append(ImportResult(model, "exists", "already in the store", stored))
            else:
                results.append(ImportResult(
                    model, "skipped", f"another model is stored as {model.reference}; "
                    f"remove it first (llmctl rm {model.reference})", stored))
            continue
        if dry_run:
            results.append(ImportResult(model, "would import"))
            continue
        # Here, not at the top: a dry run (a scan) needs none of pull's machinery.
        from llmctl.store.register import register

        try:
            result = register(layout, _local_files(model), name=model.name, tag=model.tag,
                              expected_sha256=None, on_event=on_event or (lambda _: None),
                              model_format=model.format)
        except (LlmctlError, OSError) as exc:
            results.append(ImportResult(model, "failed", str(exc), error=exc))
            continue
        results.append(ImportResult(model, "imported", result.how, result.manifest))
    return results


def _local_files(model: FoundModel) -> LocalFiles:
    # Every file is hashed on the way in. The digests the other tool's layout states are
    # only claims: a blob named after SmolLM2's sha256 may hold anything (issue 10), and
    # the store would then hand it to every later model of that digest. Hashing runs at
    # disk speed (about 1.5 GB/s here) and is shown as progress.
    return LocalFiles(model.paths, names=model.names, claimed=model.digests,
                      origin=model.origin)
