"""Plain URLs: `https://host/model.gguf#sha256=HEX`, and catalog entries of type "url".

The download itself is llmctl.store.download's job. This module names the model, picks
the token (if the entry needs one, for its own host only) and unpacks archives safely.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from llmctl.errors import UsageError, VerificationFailed
from llmctl.store import download as downloader
from llmctl.store.layout import StoreLayout
from llmctl.store.names import UrlRef, sanitize_name
from llmctl.store.sources import LocalFiles

if TYPE_CHECKING:
    from llmctl.store.pull import PullOptions

FileProgress = Callable[[str, int, int], None]
ARCHIVES = (".zip", ".tar.gz", ".tgz")
# Environment variables a token for an entry with `auth = true` is read from.
TOKEN_VARIABLES = ("LLMCTL_TOKEN",)


def file_name(url: str) -> str:
    """The last path segment of `url`, as a plain file name (never a path)."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UsageError(f"'{url}' does not end in a file name",
                         hint="give the URL of the file itself")
    return name


def _stem(name: str) -> str:
    lower = name.lower()
    for suffix in (*ARCHIVES, ".gguf"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def model_name(ref: UrlRef) -> str:
    return sanitize_name(_stem(file_name(ref.url)))


def _token_for(url: str) -> tuple[str, str] | None:
    host = (urlsplit(url).hostname or "").lower()
    variables = ("HF_TOKEN", *TOKEN_VARIABLES) if host.endswith("huggingface.co") else (
        TOKEN_VARIABLES)
    for variable in variables:
        if token := os.environ.get(variable):
            return host, token
    return None


def fetch(layout: StoreLayout, ref: UrlRef, options: PullOptions, *,
          on_progress: FileProgress) -> LocalFiles:
    request = downloader.DownloadRequest([ref.url], ref.sha256, model=model_name(ref))
    return _fetch(layout, request, options, unpack=None, on_progress=on_progress)


def fetch_catalog_source(layout: StoreLayout, source: dict[str, Any], options: PullOptions,
                         *, on_progress: FileProgress, model: str = "") -> LocalFiles:
    urls = [source["url"], *source.get("alternative_urls", [])]
    auth = _token_for(source["url"]) if source.get("auth") else None
    request = downloader.DownloadRequest(urls, source.get("sha256"), auth=auth, model=model)
    return _fetch(layout, request, options, unpack=source.get("unpack"),
                  on_progress=on_progress)


def _fetch(layout: StoreLayout, request: downloader.DownloadRequest, options: PullOptions,
           *, unpack: bool | None, on_progress: FileProgress) -> LocalFiles:
    name = file_name(request.urls[0])
    done = downloader.download(
        layout, request, parts=options.parts, rate_limit=options.rate_limit,
        on_progress=lambda d, t: on_progress(name, d, t),
    )
    origin: dict[str, Any] = {"type": "url", "url": done.url, "sha256": done.digest}
    if unpack is None:
        unpack = name.lower().endswith(ARCHIVES)
    if not unpack:
        return LocalFiles([done.path], origin=origin, names=[name], digests=[done.digest],
                          owned=True, cleanup=lambda: downloader.forget(layout, done.key))
    target = layout.downloads / f"{done.key}.unpacked"
    try:
        paths, names = unpack_archive(done.path, target, name)
    except VerificationFailed:
        downloader.forget(layout, done.key)  # a refused archive is not worth keeping
        raise
    origin["archive"] = name

    def cleanup() -> None:
        shutil.rmtree(target, ignore_errors=True)
        downloader.forget(layout, done.key)

    return LocalFiles(paths, origin=origin, names=names, owned=True, cleanup=cleanup)


def _is_archive_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _safe_member(name: str, archive: str) -> PurePosixPath:
    """An archive member's path, refused if it is absolute or climbs out of the target."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise VerificationFailed(archive, f"entry '{name}' would be written outside the "
                                 "folder it is unpacked into; refused")
    return path


def unpack_archive(archive: Path, target: Path, label: str) -> tuple[list[Path], list[str]]:
    """Unpack a .zip or .tar.gz into `target` (a fresh folder; written under a temporary
    name, then renamed). Entries with absolute paths, `..`, or links pointing outside the
    folder are refused. Returns the regular files and their names inside the folder."""
    shutil.rmtree(target, ignore_errors=True)
    work = target.with_name(target.name + ".incomplete")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            _unzip(archive, work, label)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                try:
                    # The standard library's "data" filter refuses absolute paths, paths
                    # and links leading outside the folder, devices, and set-uid bits.
                    tar.extractall(work, filter="data")
                except tarfile.FilterError as exc:
                    raise VerificationFailed(label, f"{exc}; refused") from None
        else:
            raise VerificationFailed(label, "is neither a zip nor a tar archive")
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    files = sorted(p for p in target.rglob("*") if p.is_file() and not p.is_symlink())
    if not files:
        raise VerificationFailed(label, "the archive holds no files")
    return files, [p.relative_to(target).as_posix() for p in files]


def _unzip(archive: Path, work: Path, label: str) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        need = sum(m.file_size for m in members)
        downloader.check_disk(work, need)
        for info in members:
            path = _safe_member(info.filename, label)
            if _is_archive_link(info):
                link = zf.read(info).decode()
                resolved = PurePosixPath(os.path.normpath(path.parent / link))
                if link.startswith("/") or resolved.parts[:1] == ("..",):
                    raise VerificationFailed(label, f"link '{info.filename}' points outside "
                                             "the folder it is unpacked into; refused")
                (work / path).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(link, work / path)
                continue
            zf.extract(info, work)
