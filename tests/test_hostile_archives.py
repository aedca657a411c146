"""Hostile archives (issue 10, item 1, and item 12's zip whose declared sizes are false):
members that would be written outside the folder they are unpacked into, through a chain
of links, by an absolute or `..` name, as tar hard links or devices, and zips lying about
their sizes or checksums. Each is refused with a one-line VerificationFailed naming the
member, nothing is written outside the target, and nothing half-unpacked is left.

Every test runs in the `sandbox` fixture (tests/hostile.py). The unpack target lies
`TARGET_DEPTH` folders below the sandbox's root, every chain climbs fewer levels than
that, and absolute links and names point only into the sandbox: even if the hole came
back, an escape would land in the sandbox (its canary, where possible), never above it.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Runner
from fileserver import FileServer
from hostile import Sandbox, one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl.errors import InsufficientResources, VerificationFailed
from llmctl.store.archives import unpack_archive

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TARGET_WAY = ("u1", "u2", "u3", "u4")  # folders between LLMCTL_HOME and the target
# Folders between the sandbox's root and the target: d1..d6, llmctl-home, u1..u4, target.
TARGET_DEPTH = 12
UP_TO_CANARY = 6  # levels from the target (or its work folder) to the canary's folder


@dataclass(frozen=True)
class Entry:
    kind: str  # "file", "dir", "link", "hard", "fifo", "device"
    name: str
    data: bytes = b""
    target: str = ""  # a link's (or hard link's) text


def build(path: Path, entries: list[Entry]) -> Path:
    """A .zip or .tar.gz (by `path`'s suffix) holding `entries` in order, as a hostile
    tool would write them: names and link texts exactly as given."""
    if path.suffix == ".zip":
        # A hostile tool writes the same name twice on purpose; zipfile only warns.
        with warnings.catch_warnings(), zipfile.ZipFile(
                path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            warnings.simplefilter("ignore", UserWarning)
            for entry in entries:
                if entry.kind == "dir":
                    zf.writestr(zipfile.ZipInfo(entry.name.rstrip("/") + "/"), b"")
                elif entry.kind == "link":
                    info = zipfile.ZipInfo(entry.name)
                    info.create_system = 3
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                    zf.writestr(info, entry.target)
                elif entry.kind in ("file", "hard"):  # a zip has no hard links
                    zf.writestr(entry.name, entry.data)
                else:
                    info = zipfile.ZipInfo(entry.name)
                    info.create_system = 3
                    info.external_attr = (stat.S_IFIFO | 0o644) << 16
                    zf.writestr(info, b"")
        return path
    types = {"dir": tarfile.DIRTYPE, "link": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
             "fifo": tarfile.FIFOTYPE, "device": tarfile.CHRTYPE, "file": tarfile.REGTYPE}
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = types[entry.kind]
            info.linkname = entry.target
            info.size = len(entry.data) if entry.kind == "file" else 0
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
    return path


def chain(levels: int, leaf: str) -> list[Entry]:
    """Issue 10's exploit: `a -> .`, `a/l1 -> ..`, `a/l1/l2 -> ..` ..., each harmless by
    its name alone, then a file written through them `levels` folders up."""
    entries = [Entry("link", "a", target=".")]
    way = "a"
    for level in range(1, levels + 1):
        way += f"/l{level}"
        entries.append(Entry("link", way, target=".."))
    entries.append(Entry("file", f"{way}/{leaf}", b"escaped"))
    return entries


@pytest.fixture
def target(sandbox: Sandbox) -> Path:
    """Where the unit tests unpack: deep in the store, TARGET_DEPTH below the sandbox."""
    way = sandbox.home.joinpath(*TARGET_WAY)
    way.mkdir(parents=True)
    place = way / "target"
    assert len(place.relative_to(sandbox.root).parts) == TARGET_DEPTH
    assert place.parents[UP_TO_CANARY - 1] == sandbox.canary.parent
    return place


@pytest.fixture
def archives(tmp_path: Path) -> Path:
    """Archives are built outside the sandbox, so only what unpacking writes is in it."""
    folder = tmp_path / "archives"
    folder.mkdir()
    return folder


def written_outside(sandbox: Sandbox, target: Path) -> list[Path]:
    """Anything in the store that is neither the target's nor one of the folders on the
    way to it (links reported, never followed). The sandbox fixture checks the rest."""
    allowed = {sandbox.home.joinpath(*TARGET_WAY[:n]) for n in range(1, len(TARGET_WAY) + 1)}
    found = []
    for dirpath, dirnames, filenames in os.walk(sandbox.home):
        here = Path(dirpath)
        for name in dirnames + filenames:
            path = here / name
            if path == target or target in path.parents:
                continue
            if path not in allowed or path.is_symlink():
                found.append(path)
        dirnames[:] = [d for d in dirnames if here / d != target]
    return found


def refused(archive: Path, target: Path, sandbox: Sandbox) -> str:
    """Unpack `archive`, which must be refused with one line; nothing may remain."""
    with pytest.raises(VerificationFailed) as caught:
        unpack_archive(archive, target, archive.name)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{archive.name}: ")
    assert not target.exists() and not target.with_name("target.incomplete").exists()
    assert written_outside(sandbox, target) == []
    sandbox.assert_contained()
    return message


# -- links -------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_chain_of_links_is_refused_before_it_writes(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / f"chain{suffix}", chain(UP_TO_CANARY, "canary/escaped.txt"))
    message = refused(archive, target, sandbox)
    assert "member 'a/l1' would be written through 'a', which is a link" in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_file_is_never_written_through_a_link_even_one_that_stays_inside(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / f"alias{suffix}", [
        Entry("dir", "model"), Entry("link", "alias", target="model"),
        Entry("file", "alias/weights.bin", b"abc")])
    message = refused(archive, target, sandbox)
    assert "member 'alias/weights.bin' would be written through 'alias'" in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
@pytest.mark.parametrize("text", ["../../../canary", "model/../..", "../model"])
def test_a_relative_link_leading_out_is_refused(
        suffix: str, text: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / f"out{suffix}", [
        Entry("file", "model/weights.bin", b"abc"), Entry("link", "config.json", target=text)])
    message = refused(archive, target, sandbox)
    assert f"member 'config.json' is a link to '{text}', which leads outside the folder" \
        in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_an_absolute_link_is_refused_even_into_the_folder_itself(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    for text in (str(sandbox.canary), str(target.with_name("target.incomplete"))):
        archive = build(archives / f"abs{suffix}", [
            Entry("link", "model/up", target=text), Entry("file", "model/up/x.bin", b"x")])
        message = refused(archive, target, sandbox)
        assert f"member 'model/up' is a link to the absolute path '{text[:80]}" in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_link_that_a_later_member_turns_outward_is_refused(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    # `a -> b/..` is the folder itself while b is a plain name; once `b -> .`, it is the
    # folder above. Each looked harmless when it was made.
    archive = build(archives / f"later{suffix}", [
        Entry("link", "a", target="b/.."), Entry("link", "b", target="."),
        Entry("file", "weights.bin", b"abc")])
    message = refused(archive, target, sandbox)
    assert ("member 'a' is a link to 'b/..', which leads outside the folder it is unpacked "
            "into once the members after it are in") in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_loop_of_links_is_refused(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / f"loop{suffix}", [
        Entry("link", "b", target="a/x"), Entry("link", "a", target="b/y"),
        Entry("file", "weights.bin", b"abc")])
    message = refused(archive, target, sandbox)
    assert "member 'b' is a link to 'a/x', which goes round a loop of links" in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_links_that_stay_inside_are_kept_and_only_regular_files_returned(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / f"good{suffix}", [
        Entry("dir", "model"), Entry("file", "model/weights.bin", b"abc"),
        Entry("link", "model/current", target="weights.bin"),
        Entry("link", "here", target="."), Entry("link", "up", target="model/.."),
        Entry("file", "./README.txt", b"hello")])
    files, names = unpack_archive(archive, target, archive.name)
    assert names == ["README.txt", "model/weights.bin"]
    assert files == [target / "README.txt", target / "model/weights.bin"]
    assert os.readlink(target / "model/current") == "weights.bin"
    assert (target / "model/weights.bin").read_bytes() == b"abc"
    assert not target.with_name("target.incomplete").exists()
    assert written_outside(sandbox, target) == []


# -- names -------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
@pytest.mark.parametrize("name", ["model/../../escaped.txt", "../canary/escaped.txt",
                                  "model\\..\\..\\escaped.txt"])
def test_a_name_with_dotdot_is_refused(
        suffix: str, name: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / f"dotdot{suffix}", [
        Entry("file", "model/weights.bin", b"abc"), Entry("file", name, b"x")])
    message = refused(archive, target, sandbox)
    assert f"member '{name}' climbs out of the folder with '..'" in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_an_absolute_name_is_refused_not_stripped(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    # tarfile's "data" filter would strip the "/" and write it inside; README promises a
    # refusal. The name points into the sandbox's canary, never above it.
    name = str(sandbox.canary / "escaped.txt")
    archive = build(archives / f"abs{suffix}", [Entry("file", name, b"x")])
    assert f"member '{name}' has an absolute path" in refused(archive, target, sandbox)


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_name_with_control_characters_is_refused_on_one_line(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / f"ctl{suffix}", [Entry("file", "model\n\x1b[31m.bin", b"x")])
    message = refused(archive, target, sandbox)
    assert "member 'model\\n\\x1b[31m.bin' has a control character" in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_member_twice_is_refused_never_written_over(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / f"twice{suffix}", [
        Entry("file", "model.gguf", b"first"), Entry("file", "model.gguf", b"second")])
    assert "member 'model.gguf' is in the archive twice" in refused(archive, target, sandbox)


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_file_where_a_folder_is_needed_is_refused(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / f"clash{suffix}", [
        Entry("file", "model", b"x"), Entry("file", "model/weights.bin", b"abc")])
    message = refused(archive, target, sandbox)
    assert "member 'model/weights.bin' would be written through 'model', which is a file" \
        in message


# -- tar: hard links, devices, FIFOs -------------------------------------------------------

@pytest.mark.parametrize("text", ["model/weights.bin", "SANDBOX"])
def test_a_tar_hard_link_is_refused(
        text: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    bait = sandbox.canary.parent / "bait.txt"  # beside the canary, inside the sandbox
    if text == "SANDBOX":
        text = str(bait)
        bait.write_text("bait")
    try:
        archive = build(archives / "hard.tar.gz", [
            Entry("file", "model/weights.bin", b"abc"), Entry("hard", "model/copy", target=text)])
        with pytest.raises(VerificationFailed) as caught:
            unpack_archive(archive, target, archive.name)
    finally:
        bait.unlink(missing_ok=True)
    assert f"member 'model/copy' is a hard link (to '{text}'); refused" in str(caught.value)
    assert not target.exists() and not target.with_name("target.incomplete").exists()
    assert written_outside(sandbox, target) == []


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_tar_device_or_fifo_is_refused(
        kind: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / "dev.tar.gz", [
        Entry("file", "model/weights.bin", b"abc"), Entry(kind, "model/pipe")])
    assert "member 'model/pipe' is a device or FIFO" in refused(archive, target, sandbox)


def test_a_zip_fifo_is_refused(sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / "dev.zip", [Entry("fifo", "model/pipe")])
    assert "member 'model/pipe' is a device, FIFO or socket" in refused(archive, target, sandbox)


# -- zips that lie about their sizes or checksums ----------------------------------------

def patch_zip(path: Path, member: str, **fields: int) -> None:
    """Rewrite `member`'s crc, compress_size or file_size in both its local header and the
    central directory, as a lying tool would have written them."""
    local = {"crc": 14, "compress_size": 18, "file_size": 22}
    central = {"crc": 16, "compress_size": 20, "file_size": 24}
    data = bytearray(path.read_bytes())
    encoded = member.encode()
    for magic, offsets, name_at in ((b"PK\x03\x04", local, 30), (b"PK\x01\x02", central, 46)):
        at = data.find(magic)
        while data[at + name_at:at + name_at + len(encoded)] != encoded:
            at = data.find(magic, at + 1)
            assert at >= 0, member
        for field, value in fields.items():
            struct.pack_into("<I", data, at + offsets[field], value)
    path.write_bytes(bytes(data))


def zip_of(path: Path, name: str, data: bytes, method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        zf.writestr("README.txt", b"fine", compress_type=zipfile.ZIP_STORED)
        zf.writestr(name, data)
    return path


@pytest.mark.parametrize(("method", "fields", "says"), [
    (zipfile.ZIP_STORED, {"file_size": 5000}, "is stored uncompressed but declares 5000"),
    (zipfile.ZIP_STORED, {"file_size": 3, "compress_size": 3}, "does not match its CRC-32"),
    (zipfile.ZIP_STORED, {"compress_size": 10**6, "file_size": 10**6}, "more than the archive"),
    (zipfile.ZIP_STORED, {"crc": 12345}, "does not match its CRC-32"),
    (zipfile.ZIP_DEFLATED, {"crc": 12345}, "does not match its CRC-32"),
    (zipfile.ZIP_DEFLATED, {"file_size": 5000}, "holds 2000 bytes, not the 5000 it declares"),
    (zipfile.ZIP_DEFLATED, {"file_size": 4_000_000_000}, "deflated bytes can hold"),
    (zipfile.ZIP_DEFLATED, {"compress_size": 4}, "not the 2000 it declares"),
], ids=["stored-bigger", "stored-smaller", "past-the-end", "stored-crc", "deflated-crc",
        "deflated-bigger", "terabyte", "compressed-short"])
def test_a_zip_whose_declared_sizes_or_crc_are_false_is_refused(
        method: int, fields: dict[str, int], says: str, sandbox: Sandbox, target: Path,
        archives: Path) -> None:
    archive = zip_of(archives / "liar.zip", "model.bin", os.urandom(1000) * 2, method)
    patch_zip(archive, "model.bin", **fields)
    message = refused(archive, target, sandbox)
    assert "member 'model.bin'" in message and says in message


def test_a_member_expanding_past_its_declared_size_is_refused(
        sandbox: Sandbox, target: Path, archives: Path) -> None:
    # 64 MB of zeros declared as 1,000 bytes, with the checksum of those 1,000: zipfile
    # alone would hand over the first 1,000 and say nothing.
    archive = zip_of(archives / "bomb.zip", "model.bin", bytes(64 << 20), zipfile.ZIP_DEFLATED)
    patch_zip(archive, "model.bin", file_size=1000, crc=zlib.crc32(bytes(1000)))
    message = refused(archive, target, sandbox)
    assert "member 'model.bin' holds more data than the 1000 bytes it declares" in message


def test_a_zip_with_another_compression_is_refused(
        sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = zip_of(archives / "bz.zip", "model.bin", bytes(1000), zipfile.ZIP_BZIP2)
    message = refused(archive, target, sandbox)
    assert "member 'model.bin' is compressed with method 12" in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_truncated_archive_is_refused(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = build(archives / f"cut{suffix}", [Entry("file", "a.bin", os.urandom(50_000)),
                                                Entry("file", "b.bin", os.urandom(50_000))])
    data = archive.read_bytes()
    if suffix == ".zip":  # the central directory intact, the data of b.bin zeroed
        with zipfile.ZipFile(archive) as zf:
            start = zf.getinfo("b.bin").header_offset + 100
        archive.write_bytes(data[:start] + bytes(20_000) + data[start + 20_000:])
    else:
        archive.write_bytes(data[: len(data) * 3 // 4])
    refused(archive, target, sandbox)


def test_a_tar_member_declaring_more_than_its_archive_can_hold_is_refused(
        sandbox: Sandbox, target: Path, archives: Path) -> None:
    archive = archives / "liar.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("model.bin")
        info.size = 10**12  # a header only: the terabyte never follows
        tar.addfile(info)
    message = refused(archive, target, sandbox)
    assert "member 'model.bin' declares 1000000000000 bytes, more than the archive" in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_not_enough_disk_for_the_declared_sizes_is_refused_before_writing(
        suffix: str, sandbox: Sandbox, target: Path, archives: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    archive = build(archives / f"big{suffix}", [Entry("file", "model.bin", os.urandom(1 << 16))])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(
        total=10**9, used=10**9 - 1024, free=1024))
    with pytest.raises(InsufficientResources):
        unpack_archive(archive, target, archive.name)
    assert not target.exists() and not target.with_name("target.incomplete").exists()


# -- any layout: a property ---------------------------------------------------------------

MAX_CLIMB = 5  # `..` in one whole example: fewer than TARGET_DEPTH, or than the canary's 7
# Folder names are few, so that links, folders and files meet; a file's own name is its
# own, so that many layouts unpack (and their links are then checked where they lead).
_FOLDERS = st.sampled_from(["a", "a", "b", "b", "m", "k1", ".", ".."])
_LINK_NAMES = st.sampled_from(["k1", "k2", "k3", "a"])
_LINK_STEPS = st.sampled_from(["a", "b", "k1", "m", "f0", ".", "..", ".."])


@st.composite
def layouts(draw: st.DrawFn) -> tuple[str, list[Entry]]:
    """A random archive: files, folders, `..` names, relative links (chains too), absolute
    links into the sandbox, hard links; in zip or tar.gz. At most MAX_CLIMB `..` in all."""
    suffix = draw(st.sampled_from([".zip", ".tar.gz"]))
    entries: list[Entry] = []
    if levels := draw(st.sampled_from([0, 0, 0, 1, 2, 3])):
        entries += chain(levels, draw(st.sampled_from(["f", "a/f", "m/f"])))
    for number in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["file", "file", "file", "dir", "link", "link", "link",
                                     "abs", "hard"]))
        folders = draw(st.lists(_FOLDERS, max_size=2))
        if kind == "dir":
            name = "/".join([*folders, draw(_FOLDERS)])
        elif kind in ("link", "abs"):
            name = "/".join([*folders, draw(_LINK_NAMES)])
        else:
            name = "/".join([*folders, f"f{number}"])
        if kind == "abs":
            where = draw(st.sampled_from(["CANARY", "WORK", "TARGET"]))
            entries.append(Entry("link", name, target=where))
        elif kind in ("link", "hard"):
            text = "/".join(draw(st.lists(_LINK_STEPS, min_size=1, max_size=4)))
            entries.append(Entry(kind, name, target=text))
        else:
            entries.append(Entry(kind, name, b"x" if kind == "file" else b""))
    return suffix, _within_climb(entries)


def _within_climb(entries: list[Entry]) -> list[Entry]:
    """`entries` with every `..` past the first MAX_CLIMB turned into a plain name, so no
    example can ever climb out of the sandbox, whatever the code under test does."""
    budget = MAX_CLIMB

    def tame(text: str) -> str:
        nonlocal budget
        steps = []
        for step in text.split("/"):
            if step == "..":
                if budget == 0:
                    step = "z"
                budget = max(0, budget - 1)
            steps.append(step)
        return "/".join(steps)

    return [Entry(e.kind, tame(e.name), e.data, tame(e.target)) for e in entries]


@given(layout=layouts())
@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_whatever_the_layout_nothing_is_written_outside_the_target(
        layout: tuple[str, list[Entry]], sandbox: Sandbox, target: Path, archives: Path) -> None:
    suffix, entries = layout
    work = target.with_name("target.incomplete")
    absolute = {"CANARY": str(sandbox.canary), "WORK": str(work), "TARGET": str(target)}
    entries = [Entry(e.kind, e.name, e.data, absolute.get(e.target, e.target))
               for e in entries]
    archive = build(archives / f"any{suffix}", entries)
    try:
        files, names = unpack_archive(archive, target, archive.name)
    except VerificationFailed as exc:
        assert "\n" not in str(exc)
        assert not target.exists() and not work.exists()
    else:
        assert files and len(files) == len(names) and not work.exists()
        for path in _everything(target):
            assert _inside(Path(os.path.realpath(path)), target), path
        for path, name in zip(files, names, strict=True):
            assert path == target / name and path.is_file() and not path.is_symlink()
    finally:
        shutil.rmtree(target, ignore_errors=True)
    assert written_outside(sandbox, target) == []
    sandbox.assert_contained()


def _everything(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def _inside(path: Path, folder: Path) -> bool:
    folder = Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


# -- end to end: `llmctl pull URL` ---------------------------------------------------------

# The work folder of a pull: LLMCTL_HOME/tmp/downloads/<key>.unpacked.incomplete, 10 below
# the sandbox's root; 4 levels up from it is the canary's folder.
PULL_UP_TO_CANARY = 4


def test_pull_refuses_a_chain_of_links_and_registers_nothing(
        llmctl: Runner, sandbox: Sandbox, archives: Path) -> None:
    archive = build(archives / "chain.zip", chain(PULL_UP_TO_CANARY, "canary/escaped.txt"))
    with FileServer() as server:
        result = llmctl("pull", server.add("chain.zip", archive))
    line = one_line_error(result, 4)
    assert "chain.zip: member 'a/l1' would be written through 'a', which is a link" in line
    assert sandbox.stored(llmctl) == []
    assert not list((sandbox.home / "tmp" / "downloads").glob("*.unpacked*"))


def test_pull_refuses_an_absolute_name_in_a_tar(
        llmctl: Runner, sandbox: Sandbox, archives: Path) -> None:
    name = str(sandbox.canary / "escaped.txt")
    archive = build(archives / "abs.tar.gz", [Entry("file", "model.gguf", b"GGUF"),
                                              Entry("file", name, b"x")])
    with FileServer() as server:
        result = llmctl("pull", server.add("abs.tar.gz", archive))
    line = one_line_error(result, 4)
    assert f"abs.tar.gz: member '{name}' has an absolute path; refused" in line
    assert sandbox.stored(llmctl) == []


def test_pull_refuses_a_zip_with_false_sizes(
        llmctl: Runner, sandbox: Sandbox, archives: Path) -> None:
    archive = zip_of(archives / "liar.zip", "model.gguf", bytes(64 << 20), zipfile.ZIP_DEFLATED)
    patch_zip(archive, "model.gguf", file_size=1000, crc=zlib.crc32(bytes(1000)))
    with FileServer() as server:
        result = llmctl("pull", server.add("liar.zip", archive))
    line = one_line_error(result, 4)
    assert "member 'model.gguf' holds more data than the 1000 bytes it declares" in line
    assert sandbox.stored(llmctl) == []


def test_pull_of_a_good_zip_with_a_link_inside_still_works(
        llmctl: Runner, sandbox: Sandbox, archives: Path, smollm2_gguf: Path) -> None:
    archive = archives / "smol.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(smollm2_gguf, f"smol/{NAME}")
        link = zipfile.ZipInfo("smol/latest.gguf")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, NAME)
    with FileServer() as server:
        result = llmctl("pull", server.add("smol.zip", archive))
    assert result.returncode == 0, result.stderr
    assert sandbox.stored(llmctl) == ["smol:latest"]
    show = llmctl("show", "--json", "smol")
    assert f"sha256:{SHA}" in show.stdout and f"smol/{NAME}" in show.stdout
