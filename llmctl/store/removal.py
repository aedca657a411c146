"""Removing models: what `rm` deletes (the models, the blobs only they used and the prompt
caches they made), and `rm --broken` (unreadable manifests, blobs no model names)."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmctl.errors import StoreWarning
from llmctl.store import manifest as manifests
from llmctl.store.blobs import BlobStore, BlobUsage
from llmctl.store.caches import find_caches, remove_caches
from llmctl.store.layout import StoreLayout
from llmctl.store.manifest import Manifest

if TYPE_CHECKING:
    from llmctl.store.catalog import Catalog


@dataclass(frozen=True)
class RemovalPlan:
    models: list[Manifest]
    blobs: list[BlobUsage]  # blobs no remaining model uses
    cache_bytes: int = 0  # the prompt caches of the models whose content goes

    @property
    def reclaimable(self) -> int:
        return sum(b.reclaimable for b in self.blobs) + self.cache_bytes

    @property
    def linked(self) -> int:
        """Blobs that are links to files kept elsewhere: deleting them frees nothing."""
        return sum(1 for b in self.blobs if b.reclaimable == 0 and b.size)


def plan_removal(layout: StoreLayout, catalog: Catalog | None, references: list[str]
                 ) -> RemovalPlan:
    from llmctl.store.lookup import resolve_stored

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
    kept = {m.id for m in manifests.iter_manifests(layout) if m.reference not in removing}
    caches = find_caches(layout, sorted({m.id for m in chosen} - kept))
    return RemovalPlan(chosen, usages, caches.size)


def unused_blobs(layout: StoreLayout, candidates: set[str] | None = None) -> set[str]:
    """The digests among `candidates` (every blob when None) that no stored model names."""
    used = {f.digest for m in manifests.iter_manifests(layout) for f in m.files}
    pool = BlobStore(layout).all_digests() if candidates is None else candidates
    return pool - used


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
        # A folder of links (model_folder) goes with the last model of its content.
        kept = {m.id for m in manifests.iter_manifests(layout)}
        for manifest in plan.models:
            if manifest.id not in kept:
                shutil.rmtree(layout.models / manifest.id, ignore_errors=True)
        remove_caches(layout, sorted({m.id for m in plan.models} - kept))
    return plan


@dataclass(frozen=True)
class Cleanup:
    """What `rm --broken` deletes: unreadable manifests, and the blobs no readable
    manifest names (left by a damaged manifest, or by a model replaced by older llmctl)."""

    broken: list[manifests.BrokenManifest]
    blobs: list[BlobUsage]

    @property
    def reclaimable(self) -> int:
        return sum(b.reclaimable for b in self.blobs)


def plan_cleanup(layout: StoreLayout) -> Cleanup:
    broken = manifests.broken_manifests(layout)
    blobs = BlobStore(layout)
    with warnings.catch_warnings():  # the broken ones are what this reports
        warnings.simplefilter("ignore", StoreWarning)
        unused = unused_blobs(layout)
    return Cleanup(broken, [u for d in sorted(unused) if (u := blobs.usage(d)) is not None])


def clean_up(layout: StoreLayout) -> Cleanup:
    """Delete unreadable manifests, then every blob and folder of links no stored model
    uses; worked out again under the lock."""
    blobs = BlobStore(layout)
    with layout.lock():
        plan = plan_cleanup(layout)
        for broken in plan.broken:
            manifests.delete_broken(layout, broken)
        plan = Cleanup(plan.broken, plan_cleanup(layout).blobs)
        for usage in plan.blobs:
            blobs.delete(usage.digest)
        kept = {m.id for m in manifests.iter_manifests(layout)}
        if layout.models.is_dir():
            for folder in layout.models.iterdir():
                if folder.name not in kept:
                    shutil.rmtree(folder, ignore_errors=True)
    return plan
