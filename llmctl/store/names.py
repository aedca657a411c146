"""Model references: what the text a user types names (finding stored models by them is
llmctl.store.lookup's job).

    smollm2                 a name; the catalog's default tag, else "latest", else its only tag
    smollm2:135m            name and tag
    ./models/x.gguf         a file or folder on disk
    3f9a1c2b7d0e            a unique prefix (6+ hex digits) of a stored model's ID
    hf://org/repo:Q4_K_M@rev, https://host/x.gguf#sha256=...   network sources
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from llmctl.errors import UsageError

# 128 characters per part at most: a name becomes folder names in the store.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}(/[a-z0-9][a-z0-9._-]{0,127})?$")
# A Hub repository id, as the Hub allows them (no "..", no leading '.' or '-').
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_TAG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
DEFAULT_TAG = "latest"
MODEL_SUFFIXES = (".gguf",)


@dataclass(frozen=True)
class NameRef:
    name: str
    tag: str | None

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else self.name


@dataclass(frozen=True)
class PathRef:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class HubRef:
    repo: str
    selector: str | None  # a file name or a quantization such as Q4_K_M
    revision: str | None

    def __str__(self) -> str:
        text = f"hf://{self.repo}"
        if self.selector:
            text += f":{self.selector}"
        if self.revision:
            text += f"@{self.revision}"
        return text


@dataclass(frozen=True)
class UrlRef:
    url: str  # as given, credentials included: for the request only
    sha256: str | None

    def __str__(self) -> str:
        from llmctl.store.credentials import public_url

        return public_url(self.url)


Reference = NameRef | PathRef | HubRef | UrlRef


def _looks_like_path(text: str) -> bool:
    if text.startswith(("/", "./", "../", "~")) or text in (".", ".."):
        return True
    if os.sep in text or text.lower().endswith(MODEL_SUFFIXES):
        try:
            return Path(text).exists()
        except OSError:  # a name too long to be a path, say
            return False
    return False


def parse_reference(text: str) -> Reference:
    text = text.strip()
    if not text:
        raise UsageError("empty model reference", hint="name a model, e.g. smollm2")
    if text.startswith("hf://"):
        rest = text.removeprefix("hf://")
        rest, _, revision = rest.partition("@")
        repo, _, selector = rest.partition(":")
        if not _REPO.match(repo) or ".." in repo:
            raise UsageError(f"'{_short(text)}' is not a Hugging Face reference",
                             hint="use hf://ORG/REPO[:FILE_OR_QUANT][@REVISION]")
        return HubRef(repo, selector or None, revision or None)
    if text.startswith(("https://", "http://")):
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 (raises ValueError for a port that is no number)
        except ValueError as exc:
            raise UsageError(f"'{_short(text)}' is not a valid URL ({exc})",
                             hint="check the host and port") from None
        sha = None
        if parts.fragment.startswith("sha256="):
            sha = parts.fragment.removeprefix("sha256=").lower()
        return UrlRef(parts._replace(fragment="").geturl(), sha)
    if _looks_like_path(text):
        return PathRef(Path(text).expanduser())
    name, _, tag = text.lower().partition(":")
    if not _NAME.match(name) or (tag and not _TAG.match(tag)):
        raise UsageError(
            f"'{_short(text)}' is not a model reference",
            hint="use NAME[:TAG] (letters, digits, '.', '_', '-'), a path to a .gguf, or hf://ORG/REPO",
        )
    return NameRef(name, tag or None)


def _short(text: str, limit: int = 80) -> str:
    """Input quoted in a message: a 10,000-character name is not worth repeating whole."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def sanitize_name(text: str) -> str:
    """A model name derived from a file name: lower case, allowed characters only, 128
    characters at most."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:128].rstrip("-._")
    return name or "model"


