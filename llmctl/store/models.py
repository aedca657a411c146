"""Stored models as `rm` and `show` see them: removal plans, checked files, details.

Name resolution and GGUF reading are imported by the functions that use them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from llmctl.errors import StoreWarning, VerificationFailed
from llmctl.formats import hf, safetensors
from llmctl.store import manifest as manifests
from llmctl.store.blobs import BlobStore, BlobUsage
from llmctl.store.layout import StoreLayout
from llmctl.store.manifest import Manifest, ManifestFile

if TYPE_CHECKING:
    from llmctl.formats.gguf import GGUFHeader
    from llmctl.store.catalog import Catalog


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


def verify_files(layout: StoreLayout, manifest: Manifest,
                 on_progress: Callable[[str, int, int], None] | None = None) -> None:
    """Hash every file of a stored model now; VerificationFailed naming the first one
    whose content is not its digest. Files found sound are remembered as verified."""
    blobs = BlobStore(layout)
    for entry in manifest.files:
        _checked_blob(layout, manifest, entry)
        report = (lambda done, total, name=entry.name: on_progress(name, done, total)
                  ) if on_progress else None
        if not blobs.verify(entry.digest, report):
            what = "its file" if len(manifest.files) == 1 else f"its file {entry.name}"
            raise _damaged(manifest, f"{what} does not hold the content it was stored with "
                                     f"({entry.digest})")


def is_verified(layout: StoreLayout, manifest: Manifest) -> bool:
    """Whether every file of the model was read back and found to hold its digest."""
    blobs = BlobStore(layout)
    return all(blobs.is_verified(f.digest) for f in manifest.files)


def check_file(layout: StoreLayout, manifest: Manifest) -> tuple[Path, GGUFHeader]:
    """The stored model's file and header, after the checks that catch a damaged store
    (a file deleted, truncated or overwritten since it was verified) before any engine
    opens it."""
    from llmctl.formats.gguf import read_header

    path = _checked_blob(layout, manifest, manifest.primary)
    try:
        header = read_header(path)
    except VerificationFailed as exc:
        raise _damaged(manifest, exc.reason) from None
    return path, header


def _damaged(manifest: Manifest, reason: str) -> VerificationFailed:
    return VerificationFailed(
        manifest.reference,
        f"{reason}; re-pull it: llmctl rm {manifest.reference} && "
        f"llmctl pull {manifest.reference}",
    )


def _checked_blob(layout: StoreLayout, manifest: Manifest, entry: ManifestFile) -> Path:
    """The blob of one of the model's files, after checking that it is there and has the
    size it was verified with (a stat: cheap enough for every run)."""
    path = BlobStore(layout).path(entry.digest)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        what = "its file" if len(manifest.files) == 1 else f"its file {entry.name}"
        raise _damaged(manifest, f"{what} is missing") from None
    if size != entry.size:
        what = "its file" if len(manifest.files) == 1 else entry.name
        raise _damaged(manifest, f"{what} is {size} bytes, expected {entry.size}")
    return path


def model_folder(layout: StoreLayout, manifest: Manifest) -> Path:
    """The stored model as a folder that engines open by path (mlx-lm, diffusers, Core ML):
    `models/<id>/` with one link per file, named as the manifest names it (`config.json`,
    `unet/diffusion_pytorch_model.safetensors`), each pointing at its blob.

    The folder is built under tmp/ and renamed into place, so an engine never sees half of
    it, and reused while every link still reaches its blob. The links are relative symbolic
    links: a hard link would keep a blob's data alive after `rm` deleted the blob (and make
    `rm` count the blob as freeing nothing), and relative ones survive moving LLMCTL_HOME.
    """
    entries = [(_safe_name(manifest, f.name), _checked_blob(layout, manifest, f))
               for f in manifest.files]
    folder = layout.models / manifest.id
    if _complete(folder, entries):
        return folder
    layout.ensure()
    layout.models.mkdir(exist_ok=True)
    # tmp/<x>/ and models/<id>/ lie at the same depth below the root, so a link's relative
    # target is the same in both places.
    building = Path(tempfile.mkdtemp(dir=layout.tmp, prefix=f"model-{manifest.id}-"))
    try:
        building.chmod(0o755)  # mkdtemp's folders are private; the store's are not
        for name, blob in entries:
            link = building.joinpath(*name.parts)
            link.parent.mkdir(parents=True, exist_ok=True)
            final = folder.joinpath(*name.parts)
            os.symlink(os.path.relpath(blob, final.parent), link)
        if folder.exists() or folder.is_symlink():  # stale: a blob was re-stored elsewhere
            stale = Path(tempfile.mkdtemp(dir=layout.tmp, prefix=f"stale-{manifest.id}-"))
            os.replace(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(building, folder)
        except OSError:
            # Another llmctl built the same folder a moment ago: use that one.
            if not _complete(folder, entries):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def _safe_name(manifest: Manifest, name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise VerificationFailed(manifest.reference,
                                 f"its file name '{name}' points outside the model's folder")
    return path


def _complete(folder: Path, entries: list[tuple[PurePosixPath, Path]]) -> bool:
    for name, blob in entries:
        link = folder.joinpath(*name.parts)
        if not link.is_symlink() or not link.exists() or not link.samefile(blob):
            return False
    return True


@dataclass(frozen=True)
class ModelDetails:
    manifest: Manifest
    path: Path
    verified: bool  # every file read back and found to hold its digest
    summary: dict[str, Any]  # architecture, parameters, quantization, context length, ...
    metadata: dict[str, Any]  # every key of the GGUF header; long arrays summarised
    tensor_types: dict[str, int]


def describe(layout: StoreLayout, catalog: Catalog | None, reference: str) -> ModelDetails:
    from llmctl.formats.gguf import ArraySummary
    from llmctl.store.names import resolve_stored

    manifest = resolve_stored(layout, catalog, reference)
    if manifest.format != "gguf":
        folder = model_folder(layout, manifest)
        return ModelDetails(manifest, folder, is_verified(layout, manifest),
                            *_folder_details(folder))
    path, header = check_file(layout, manifest)
    metadata = {k: (str(v) if isinstance(v, ArraySummary) else v)
                for k, v in header.metadata.items()}
    return ModelDetails(manifest, path, is_verified(layout, manifest), header.summary(),
                        metadata, header.tensor_types)


def _folder_details(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """Summary, metadata and tensor types of a folder model, from its config.json and the
    headers of its .safetensors files (read as JSON: no library, no weights). The chat
    template is kept under the key GGUF uses for it, so `show --template` finds it."""
    config = hf.read_config(folder)
    settings = hf.text_settings(config)

    def get(key: str) -> Any:  # the model's own (a VLM's architecture), else its text's
        return config.get(key, settings.get(key))

    quantization = config.get("quantization") or {}
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    parameters = 0
    tensor_types: dict[str, int] = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for name, (dtype, count) in safetensors.tensors(path).items():
            if name.endswith((".scales", ".biases")) and bits:
                continue  # MLX quantization's per-group scales and offsets, not parameters
            # MLX packs quantized weights `bits` at a time into uint32 words.
            parameters += count * 32 // bits if bits and dtype == "U32" else count
            tensor_types[dtype] = tensor_types.get(dtype, 0) + 1
    metadata = dict(config)
    template = hf.chat_template(folder)
    if template:
        metadata["tokenizer.chat_template"] = template
    summary = {
        "architecture": get("model_type"),
        "parameters": parameters,
        "quantization": f"{bits}-bit, groups of {quantization.get('group_size')}" if bits
        else get("dtype") or get("torch_dtype"),
        "context_length": get("max_position_embeddings"),
        "embedding_length": get("hidden_size"),
        "block_count": get("num_hidden_layers"),
        "chat_template": template is not None,
        "model_name": get("_name_or_path") or get("_model_name_or_path"),
        "license": None,
    }
    return summary, metadata, tensor_types
