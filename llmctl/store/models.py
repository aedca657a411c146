"""Stored models as `rm` and `show` see them: removal plans, checked files, details.

Name resolution and GGUF reading are imported by the functions that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.errors import VerificationFailed
from llmctl.store import manifest as manifests
from llmctl.store.blobs import BlobStore, BlobUsage
from llmctl.store.layout import StoreLayout
from llmctl.store.manifest import Manifest

if TYPE_CHECKING:
    from llmctl.store.catalog import Catalog
    from llmctl.store.gguf_header import GGUFHeader


@dataclass(frozen=True)
class RemovalPlan:
    models: list[Manifest]
    blobs: list[BlobUsage]  # blobs no remaining model uses

    @property
    def reclaimable(self) -> int:
        return sum(b.reclaimable for b in self.blobs)

    @property
    def linked(self) -> int:
        """Blobs that are links to files kept elsewhere: deleting them frees nothing."""
        return sum(1 for b in self.blobs if b.reclaimable == 0 and b.size)


def plan_removal(layout: StoreLayout, catalog: Catalog | None, references: list[str]
                 ) -> RemovalPlan:
    from llmctl.store.names import resolve_stored

    chosen: dict[str, Manifest] = {}
    for text in references:
        found = resolve_stored(layout, catalog, text)
        chosen[found.reference] = found
    return _plan(layout, list(chosen.values()))


def _plan(layout: StoreLayout, chosen: list[Manifest]) -> RemovalPlan:
    removing = {m.reference for m in chosen}
    still_used = {f.digest for m in manifests.iter_manifests(layout)
                  if m.reference not in removing for f in m.files}
    blobs = BlobStore(layout)
    freed = {f.digest for m in chosen for f in m.files} - still_used
    usages = [u for d in sorted(freed) if (u := blobs.usage(d)) is not None]
    return RemovalPlan(chosen, usages)


def remove(layout: StoreLayout, plan: RemovalPlan) -> RemovalPlan:
    """Delete the planned models and the blobs only they used. The plan is worked out
    again under the lock, in case another llmctl changed the store in between."""
    blobs = BlobStore(layout)
    with layout.lock():
        current = [m for m in plan.models
                   if manifests.load(layout, m.name, m.tag) is not None]
        plan = _plan(layout, current)
        for manifest in plan.models:
            manifests.delete(layout, manifest)
        for usage in plan.blobs:
            blobs.delete(usage.digest)
    return plan


def check_file(layout: StoreLayout, manifest: Manifest) -> tuple[Path, GGUFHeader]:
    """The stored model's file and header, after the checks that catch a damaged store
    (a file deleted, truncated or overwritten since it was verified) before any engine
    opens it."""
    from llmctl.store.gguf_header import read_header

    entry = manifest.primary
    path = BlobStore(layout).path(entry.digest)
    try:
        size = path.stat().st_size
        if size != entry.size:
            raise VerificationFailed(str(path), f"its file is {size} bytes, expected {entry.size}")
        header = read_header(path)
    except (VerificationFailed, FileNotFoundError) as exc:
        reason = exc.reason if isinstance(exc, VerificationFailed) else "its file is missing"
        raise VerificationFailed(
            manifest.reference,
            f"{reason}; re-pull it: llmctl rm {manifest.reference} && "
            f"llmctl pull {manifest.reference}",
        ) from None
    return path, header


@dataclass(frozen=True)
class ModelDetails:
    manifest: Manifest
    path: Path
    summary: dict[str, Any]  # architecture, parameters, quantization, context length, ...
    metadata: dict[str, Any]  # every key of the GGUF header; long arrays summarised
    tensor_types: dict[str, int]


def describe(layout: StoreLayout, catalog: Catalog | None, reference: str) -> ModelDetails:
    from llmctl.store.gguf_header import ArraySummary
    from llmctl.store.names import resolve_stored

    manifest = resolve_stored(layout, catalog, reference)
    path, header = check_file(layout, manifest)
    metadata = {k: (str(v) if isinstance(v, ArraySummary) else v)
                for k, v in header.metadata.items()}
    return ModelDetails(manifest, path, header.summary(), metadata, header.tensor_types)
