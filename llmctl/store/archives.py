"""Archives a model comes in (.zip, .tar.gz), unpacked so that nothing lands outside the
folder they are unpacked into.

One writer (`_Writer`) places the members of either kind of archive, and every member
passes the same checks before anything is written for it:
- its name is relative, without `..`, NUL or control characters (refused, never rewritten:
  tarfile's "data" filter silently strips a leading "/", and README promises a refusal);
- the folders on its way are opened one at a time, each from the one above, with
  O_NOFOLLOW: nothing is ever written through a link, wherever an earlier member's link
  leads;
- a link is made only if it resolves inside the folder, following the links already on
  disk as the OS would; all links are checked again after the last member, since a member
  that comes later can change where an earlier link leads;
- a file is created with O_EXCL (a second member of the same name is refused, never written
  over the first) and gets exactly the bytes it declares: a member whose data runs past its
  declared size, falls short of it or fails its checksum is refused;
- tar hard links, devices and FIFOs are refused.
Issue 10 is the lesson: links were checked by their names alone, so a chain `a -> .`,
`a/l1 -> ..`, `a/l1/l2 -> ..` ... let a later member write anywhere the user can.

Everything is written into `<target>.incomplete` and renamed once the last member is in; a
refusal removes it, so nothing is ever left half-unpacked.
"""

from __future__ import annotations

import bz2
import contextlib
import copy
import errno
import gzip
import lzma
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, NoReturn

from llmctl.errors import VerificationFailed
from llmctl.store.download import check_disk

CHUNK = 1 << 20
MAX_NAME = 1024  # a member's name; the store takes file names up to this length
MAX_LINK = 4096  # PATH_MAX: a link's text longer than this is no path
MAX_HOPS = 40  # links followed while resolving one link, as Linux's own limit (ELOOP)
# Deflate's ceiling: a length of 258 bytes coded in two bits at best.
DEFLATE_RATIO = 1032
OUTSIDE = "leads outside the folder it is unpacked into"
_DRIVE = re.compile(r"^[A-Za-z]:")
# What zipfile, tarfile and the decompressors behind them raise on damaged or lying data.
# Only reads from the archive are guarded by it: an OSError while writing (a full disk, a
# read-only store) is not the archive's fault and goes to the error table as it is.
_DAMAGED = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
            OSError, ValueError, struct.error, NotImplementedError)
# zipfile hands bzip2 and LZMA data to the decompressor 4 KB at a time with no bound on
# what comes out (Python 3.11), and a crafted 4 KB can become gigabytes in memory; deflate
# is decompressed with a bound. Model archives use these two.
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# Python 3.11.4 and later: kept as a second line behind our own checks, for tar.
_DATA_FILTER = getattr(tarfile, "data_filter", None)


@dataclass(frozen=True)
class _Member:
    """One archive entry, whatever the archive's kind."""

    name: str  # as the archive spells it; messages name it
    kind: Literal["file", "dir", "link"]
    size: int = 0  # a file's declared size
    link: str = ""  # a link's text
    crc: int | None = None  # a zip member's declared CRC-32 of its data


def unpack_archive(archive: Path, target: Path, label: str) -> tuple[list[Path], list[str]]:
    """Unpack a .zip or .tar.gz into `target` (a fresh folder; written under a temporary
    name, then renamed). A member with an absolute path or `..`, a link leading outside,
    a member written through a link, a tar hard link or device, a damaged member or one
    whose size or checksum is false: VerificationFailed naming it, and nothing is left
    behind. Returns the regular files and their names inside the folder."""
    shutil.rmtree(target, ignore_errors=True)
    work = target.with_name(target.name + ".incomplete")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with _reading(label, "the archive"):
            unpack = (_unzip if zipfile.is_zipfile(archive)
                      else _untar if tarfile.is_tarfile(archive) else None)
        if unpack is None:
            raise VerificationFailed(label, "is neither a zip nor a tar archive")
        writer = _Writer(work, label)
        try:
            unpack(archive, writer)
            writer.finish()
        finally:
            writer.close()
        if not writer.files:
            raise VerificationFailed(label, "the archive holds no files")
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    files = sorted(writer.files)
    return [target.joinpath(*parts) for parts in files], ["/".join(parts) for parts in files]


def _unzip(archive: Path, writer: _Writer) -> None:
    with contextlib.ExitStack() as stack:
        with _reading(writer.label, "the archive"):
            zf = stack.enter_context(zipfile.ZipFile(archive))
        members = zf.infolist()
        size = archive.stat().st_size
        for info in members:
            _check_declared(info, size, writer)
        # Declared sizes, now known to be possible: a member whose data turns out bigger
        # is refused as soon as it runs past them.
        check_disk(writer.work, sum(info.file_size for info in members))
        for info in members:
            member, opener = _zip_member(zf, info, writer)
            writer.add(member, opener)


def _check_declared(info: zipfile.ZipInfo, archive_size: int, writer: _Writer) -> None:
    """Refuse sizes no data could have, before anything is written or the disk checked (a
    zip declaring a terabyte is a liar, not a reason to ask for a bigger disk)."""
    if info.is_dir():
        return
    if info.flag_bits & 0x1:
        writer.refuse(info.filename, "is encrypted")
    if info.compress_type not in _ZIP_METHODS:
        writer.refuse(info.filename, f"is compressed with method {info.compress_type}; "
                      "llmctl unpacks stored and deflated zip members only")
    if info.header_offset + info.compress_size > archive_size:
        writer.refuse(info.filename, f"declares {info.compress_size} compressed bytes, more "
                      "than the archive holds")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        writer.refuse(info.filename, f"is stored uncompressed but declares {info.file_size} "
                      f"bytes for {info.compress_size}")
    if (info.compress_type == zipfile.ZIP_DEFLATED
            and info.file_size > info.compress_size * DEFLATE_RATIO + 1024):
        writer.refuse(info.filename, f"declares {info.file_size} bytes, more than its "
                      f"{info.compress_size} deflated bytes can hold")


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                writer: _Writer) -> tuple[_Member, Callable[[], IO[bytes]] | None]:
    name = info.filename
    mode = info.external_attr >> 16  # Unix mode, where a Unix tool wrote the archive
    if info.is_dir() or stat.S_ISDIR(mode):
        return _Member(name, "dir"), None

    def opener() -> IO[bytes]:
        return zf.open(_one_byte_more(info))

    if stat.S_ISLNK(mode):
        if info.file_size > MAX_LINK:
            writer.refuse(name, f"is a link of {info.file_size} bytes")
        text = b"".join(writer.data(_Member(name, "file", info.file_size, crc=info.CRC),
                                    opener))
        return _Member(name, "link", link=os.fsdecode(text)), None
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        writer.refuse(name, "is a device, FIFO or socket")
    return _Member(name, "file", info.file_size, crc=info.CRC), opener


def _one_byte_more(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """`info` declaring one byte more than it does, and no CRC. zipfile stops a member at
    its declared size, hiding any data past it, and checks the CRC of what it stopped at
    (so a member running on would fail as "Bad CRC-32", not as what it is). Asking for one
    byte more shows that the data runs on; `_Writer.data` checks the CRC itself."""
    wider = copy.copy(info)
    wider.file_size = info.file_size + 1
    wider.CRC = None  # zipfile skips its own check without a reference value
    return wider


def _untar(archive: Path, writer: _Writer) -> None:
    with contextlib.ExitStack() as stack:
        with _reading(writer.label, "the archive"):
            stream, ratio = _decompressed(archive)
            stack.enter_context(stream)
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|"))
        # The most a member can hold, where the compression bounds it (bzip2 and xz hardly
        # do): a declared size past it is a lie, not a reason to ask for a bigger disk.
        ceiling = archive.stat().st_size * ratio if ratio else None
        members = iter(tar)
        while True:
            with _reading(writer.label, "the archive"):
                member = next(members, None)
            if member is None:
                return
            _tar_member(tar, member, writer, ceiling)


def _decompressed(archive: Path) -> tuple[IO[bytes], int | None]:
    """The archive's bytes through a reader that decompresses only as much as is asked
    for (tarfile's own stream mode hands whole buffers to the decompressor, unbounded),
    and the most bytes it can give per byte of the archive, where that is bounded."""
    with archive.open("rb") as file:
        magic = file.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(archive, "rb"), DEFLATE_RATIO
    if magic.startswith(b"BZh"):
        return bz2.open(archive, "rb"), None
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(archive, "rb"), None
    return archive.open("rb"), 1


def _tar_member(tar: tarfile.TarFile, info: tarfile.TarInfo, writer: _Writer,
                ceiling: int | None) -> None:
    name = info.name
    if info.islnk():
        writer.refuse(name, f"is a hard link (to '{_shown(info.linkname)}')")
    if info.isdev():
        writer.refuse(name, "is a device or FIFO")
    member: _Member
    if info.issym():
        member = _Member(name, "link", link=info.linkname)
    elif info.isdir():
        member = _Member(name, "dir")
    elif info.isreg():
        member = _Member(name, "file", info.size)
    else:
        writer.refuse(name, f"is a tar entry of type {info.type!r}, which llmctl does not "
                      "unpack")

    def data_filter() -> None:
        try:
            _DATA_FILTER(info, str(writer.work))
        except tarfile.FilterError as exc:
            writer.refuse(name, f"is refused by tarfile's data filter ({_shown(str(exc))})")

    if member.kind == "file":
        if ceiling is not None and member.size > ceiling:
            writer.refuse(name, f"declares {member.size} bytes, more than the archive can "
                          "hold")
        check_disk(writer.work, member.size)  # a tar declares sizes member by member
    writer.add(member, lambda: tar.extractfile(info),
               second_check=data_filter if _DATA_FILTER else None)


class _Writer:
    """Places the members of one archive in `work`, checking each before it is written."""

    def __init__(self, work: Path, label: str) -> None:
        self.work = work
        self.label = label
        self.root = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.files: list[tuple[str, ...]] = []
        self.links: list[tuple[str, tuple[str, ...], str]] = []  # name, parts, text

    def close(self) -> None:
        os.close(self.root)

    def refuse(self, name: str, why: str) -> NoReturn:
        raise VerificationFailed(self.label, f"member '{_shown(name)}' {why}; refused")

    def add(self, member: _Member, opener: Callable[[], IO[bytes]] | None,
            second_check: Callable[[], None] | None = None) -> None:
        parts = self._parts(member.name)
        try:
            self._check_way(member.name, parts if member.kind == "dir" else parts[:-1])
            if member.kind == "link":
                self._check_link(member, parts)
            if second_check is not None:
                second_check()
            if member.kind == "dir":
                if parts:
                    os.close(self._folder(member.name, parts))
            elif member.kind == "file":
                assert opener is not None
                self._write_file(member, parts, opener)
            else:
                self._make_link(member, parts)
        except OSError as exc:
            # The name is the archive's fault only where this file system cannot hold it.
            if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
                self.refuse(member.name, f"cannot be written here ({exc.strerror})")
            raise

    def finish(self) -> None:
        """Check every link again: a member after it may have made a name its text goes
        through into a link (`a -> b/..` then `b -> .` leads out)."""
        for name, parts, text in self.links:
            if wrong := self._leads_wrong(parts[:-1], text):
                self.refuse(name, f"is a link to '{_shown(text)}', which {wrong} once the "
                            "members after it are in")

    def data(self, member: _Member, opener: Callable[[], IO[bytes]]) -> Iterator[bytes]:
        """A member's bytes: exactly as many as it declares, or a refusal."""
        what = f"member '{_shown(member.name)}'"
        with _reading(self.label, what):
            source = opener()
        seen = crc = 0
        with source:
            while True:
                with _reading(self.label, what):
                    chunk = source.read(CHUNK)
                if not chunk:
                    break
                seen += len(chunk)
                if seen > member.size:
                    self.refuse(member.name, "holds more data than the "
                                f"{member.size} bytes it declares")
                if member.crc is not None:
                    crc = zlib.crc32(chunk, crc)
                yield chunk
        if seen < member.size:
            self.refuse(member.name, f"holds {seen} bytes, not the {member.size} it declares")
        if member.crc is not None and crc != member.crc:
            self.refuse(member.name, f"does not match its CRC-32 ({crc:08x}, declared "
                        f"{member.crc:08x})")

    def _parts(self, name: str) -> tuple[str, ...]:
        if len(name) > MAX_NAME:
            self.refuse(name, f"has a name longer than {MAX_NAME} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            self.refuse(name, "has a control character in its name")
        # Zip tools on Windows write "\" for "/"; taken as a separator, ..\.. is caught too.
        path = name.replace("\\", "/")
        if path.startswith("/") or _DRIVE.match(path):
            self.refuse(name, "has an absolute path")
        parts = tuple(part for part in path.split("/") if part not in ("", "."))
        if ".." in parts:
            self.refuse(name, "climbs out of the folder with '..'")
        return parts

    def _check_link(self, member: _Member, parts: tuple[str, ...]) -> None:
        text = member.link
        if not parts:
            self.refuse(member.name, "is a link without a name")
        if not text or "\0" in text or len(text) > MAX_LINK:
            self.refuse(member.name, "is a link whose target is no path")
        if text.startswith("/"):
            self.refuse(member.name, f"is a link to the absolute path '{_shown(text)}'")
        if wrong := self._leads_wrong(parts[:-1], text):
            self.refuse(member.name, f"is a link to '{_shown(text)}', which {wrong}")

    def _leads_wrong(self, start: tuple[str, ...], text: str) -> str | None:
        """What is wrong with a link in folder `start` with this text, resolved now as the
        OS would (None: it stays inside): a name that is a link on disk is replaced by its
        own text, `..` steps up from a real folder (and out, from the top), a name not on
        disk (yet) is taken as a folder."""
        stack = list(start)  # real folders (or names not on disk), never links
        pending = text.split("/")
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not stack:
                    return OUTSIDE
                stack.pop()
                continue
            stack.append(part)
            here = self.work.joinpath(*stack)
            try:
                is_link = stat.S_ISLNK(os.lstat(here).st_mode)
            except OSError:
                continue  # not there, or under a file: nothing to follow
            if is_link:
                hops += 1
                inner = os.readlink(here)
                if hops > MAX_HOPS:
                    return "goes round a loop of links"
                if inner.startswith("/"):
                    return OUTSIDE
                stack.pop()
                pending = inner.split("/") + pending
        return None

    def _check_way(self, name: str, folders: tuple[str, ...]) -> None:
        """Refuse a member whose way down passes a link or a file already on disk: read
        only, before anything is written for it (`_folder` checks again as it opens)."""
        for depth in range(1, len(folders) + 1):
            try:
                mode = os.lstat(self.work.joinpath(*folders[:depth])).st_mode
            except FileNotFoundError:
                return  # made when the member is written
            if not stat.S_ISDIR(mode):
                self._not_a_folder(name, folders[:depth], mode)

    def _not_a_folder(self, name: str, way: tuple[str, ...], mode: int) -> NoReturn:
        what = "a link" if stat.S_ISLNK(mode) else "a file"
        self.refuse(name, f"would be written through '{_shown('/'.join(way))}', which is "
                    f"{what}, not a folder")

    def _folder(self, name: str, parts: tuple[str, ...]) -> int:
        """The folder `parts` opened (made where missing), one component at a time with
        O_NOFOLLOW, so that no link on the way is ever followed. The caller closes it."""
        fd = os.dup(self.root)
        try:
            for depth, part in enumerate(parts, 1):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                    | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                    self._not_a_folder(name, parts[:depth], mode)
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _write_file(self, member: _Member, parts: tuple[str, ...],
                    opener: Callable[[], IO[bytes]]) -> None:
        if not parts:
            self.refuse(member.name, "is a file without a name")
        parent = self._folder(member.name, parts[:-1])
        try:
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=parent)
        except FileExistsError:
            self._twice(member.name)
        finally:
            os.close(parent)
        with open(fd, "wb") as out:
            for chunk in self.data(member, opener):
                out.write(chunk)
        self.files.append(parts)

    def _make_link(self, member: _Member, parts: tuple[str, ...]) -> None:
        parent = self._folder(member.name, parts[:-1])
        try:
            os.symlink(member.link, parts[-1], dir_fd=parent)
        except FileExistsError:
            self._twice(member.name)
        finally:
            os.close(parent)
        self.links.append((member.name, parts, member.link))

    def _twice(self, name: str) -> NoReturn:
        self.refuse(name, "is in the archive twice, or over a folder or link an earlier "
                    "member made")


@contextlib.contextmanager
def _reading(label: str, what: str) -> Iterator[None]:
    """What a damaged archive raises while it is read, as a one-line refusal naming `what`."""
    try:
        yield
    except _DAMAGED as exc:
        detail = _shown(str(exc)) or type(exc).__name__
        raise VerificationFailed(label, f"{what} cannot be read ({detail}): the archive is "
                                 "damaged, or its declared sizes or checksums are false; "
                                 "refused") from exc


def _shown(text: str, limit: int = 240) -> str:
    """`text` fit for a one-line message: control characters and undecodable bytes
    escaped, a long name cut."""
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return shown if len(shown) <= limit else shown[:limit] + "..."
