"""Plain URLs: `https://host/model.gguf#sha256=HEX`, and catalog entries of type "url".

The download itself is llmctl.store.download's job. This module names the model, picks
the token (if the entry needs one, for its own origin only) and unpacks archives safely.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from llmctl.errors import UsageError
from llmctl.store import download as downloader
from llmctl.store.archives import unpack_archive
from llmctl.store.credentials import public_url
from llmctl.store.layout import StoreLayout
from llmctl.store.names import UrlRef, sanitize_name
from llmctl.store.sources import FileProgress, LocalFiles

if TYPE_CHECKING:
    from llmctl.store.sources import PullOptions

ARCHIVES = (".zip", ".tar.gz", ".tgz")
# Environment variables a token for an entry with `auth = true` is read from.
TOKEN_VARIABLES = ("LLMCTL_TOKEN",)


def file_name(url: str) -> str:
    """The last path segment of `url`, as a plain file name (never a path)."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UsageError(f"'{public_url(url)}' does not end in a file name",
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
    """(URL, token) for an entry with `auth = true`: the token goes to that URL's origin
    only. HF_TOKEN counts for the Hub's own hosts ("evilhuggingface.co" is not one)."""
    host = (urlsplit(url).hostname or "").lower()
    hub = host == "huggingface.co" or host.endswith(".huggingface.co")
    variables = ("HF_TOKEN", *TOKEN_VARIABLES) if hub else TOKEN_VARIABLES
    for variable in variables:
        if token := os.environ.get(variable):
            return url, token
    return None


def fetching(layout: StoreLayout, ref: UrlRef, options: PullOptions, *,
             on_progress: FileProgress) -> contextlib.AbstractContextManager[LocalFiles]:
    """`with fetching(...) as files: register(...)`: the file at `ref`, downloaded (or
    reused), held locked until the body has stored it; see download.downloading. The URL
    may carry credentials (user:password@, a pre-signed query): they are used for the
    request only, and `files.origin` holds the URL without them."""
    request = downloader.DownloadRequest([ref.url], ref.sha256, model=model_name(ref))
    return _fetching(layout, request, options, unpack=None, on_progress=on_progress)


def catalog_files(layout: StoreLayout, source: dict[str, Any], quantization: str | None,
                  options: PullOptions, *, on_progress: FileProgress, model: str = ""
                  ) -> contextlib.AbstractContextManager[LocalFiles]:
    """`fetching` for a catalog source of type "url": `url`, optional `sha256`,
    `alternative_urls`, `auth` (a token from LLMCTL_TOKEN, or HF_TOKEN for the Hub, sent
    to the entry's own origin only) and `unpack`."""
    urls = [source["url"], *source.get("alternative_urls", [])]
    auth = _token_for(source["url"]) if source.get("auth") else None
    request = downloader.DownloadRequest(urls, source.get("sha256"), auth=auth, model=model)
    return _fetching(layout, request, options, unpack=source.get("unpack"),
                     on_progress=on_progress)


@contextlib.contextmanager
def _fetching(layout: StoreLayout, request: downloader.DownloadRequest, options: PullOptions,
              *, unpack: bool | None, on_progress: FileProgress) -> Iterator[LocalFiles]:
    name = file_name(request.urls[0])
    with downloader.downloading(
        layout, request, parts=options.parts, rate_limit=options.rate_limit,
        on_progress=lambda d, t: on_progress(name, d, t),
    ) as done:
        origin: dict[str, Any] = {"type": "url", "url": done.url, "sha256": done.digest}
        if unpack is None:
            unpack = name.lower().endswith(ARCHIVES)
        if not unpack:
            # A blob an earlier download stored is linked (it is the store's already);
            # a fresh download is moved in.
            yield LocalFiles([done.path], origin=origin, names=[name], digests=[done.digest],
                             owned=not done.stored)
            return
        # A refused archive raises VerificationFailed: `downloading` deletes it.
        target = layout.downloads / f"{done.key}.unpacked"
        try:
            paths, names = unpack_archive(done.path, target, name)
            origin["archive"] = name
            yield LocalFiles(paths, origin=origin, names=names, owned=True)
        finally:
            shutil.rmtree(target, ignore_errors=True)
        # Its files are in the store: the archive itself is not kept.
        downloader.forget(layout, done.key)
