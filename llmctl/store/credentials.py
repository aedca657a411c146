"""What in a URL is a secret, and where a secret may go.

Credentials in URLs (user:password@, the query strings of pre-signed URLs, API keys) are
used for the request only: everything llmctl stores or prints shows `public_url(url)`
(issue 10: they landed in manifests, `show`, `ls --json` and error messages). A token or
password is sent only to the origin it was given for (scheme, host and port), over https
(plain http: loopback only, for tests), on every request and every redirect.

Plain string work (no httpx at import time), so the catalog can use it too.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

if TYPE_CHECKING:
    import httpx

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORTS = {"http": 80, "https": 443}

# Query parameters that carry credentials: API keys, bearer tokens, the signatures of
# pre-signed URLs (S3, GCS, Azure SAS, CloudFront). Compared in lower case; a name that
# contains one of _CREDENTIAL_WORDS counts too ("hf_token", "X-Goog-Signature").
_CREDENTIAL_KEYS = frozenset({
    "key", "apikey", "api_key", "api-key", "sig", "auth", "pass", "pwd", "passwd", "code",
    "hdnts", "policy", "key-pair-id", "x-amz-credential", "x-goog-credential",
})
_CREDENTIAL_WORDS = ("token", "secret", "password", "signature", "credential", "apikey",
                     "api_key", "session")


def _is_credential(name: str) -> bool:
    name = name.strip().lower()
    return name in _CREDENTIAL_KEYS or any(word in name for word in _CREDENTIAL_WORDS)


def public_url(url: str) -> str:
    """`url` as llmctl may store or print it: without user name and password and without
    query parameters that carry credentials (token=, X-Amz-Signature=, ...), nor the
    fragment. The full URL is used for the request only (issue 10)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that cannot be parsed>"
    host = parts.netloc.rpartition("@")[2]
    query = "&".join(pair for pair in parts.query.split("&")
                     if pair and not _is_credential(unquote_plus(pair.partition("=")[0])))
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def without_userinfo(url: str) -> str:
    """The URL to request: credentials in the query stay (a pre-signed URL needs them),
    user:password@ goes (it is sent as an Authorization header, to its own origin only)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], fragment=""))


def secrets_in(url: str) -> set[str]:
    """The credential values inside `url`, raw and decoded: never printed."""
    parts = urlsplit(url)
    found: set[str] = set()
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        found |= {userinfo, *userinfo.split(":", 1)}
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if value and _is_credential(unquote_plus(name)):
            found.add(value)
    found |= {unquote(s) for s in found} | {unquote_plus(s) for s in found}
    # Very short values would blank out unrelated text; they are also no real secret.
    return {s for s in found if len(s) >= 4}


def redact(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port): tokens and passwords go only to the origin they were given
    for. A different port is a different origin (issue 10: a token followed a redirect
    to another port of the same host)."""
    if isinstance(url, str):
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        try:
            port = parts.port
        except ValueError:
            port = None
    else:
        scheme, host, port = url.scheme.lower(), url.host.lower(), url.port
    return scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme)


class Credentials:
    """Adds each credential to requests for its own origin only: a bearer token (a
    catalog entry's), or the user and password a URL carried. httpx also drops the
    Authorization header when a redirect leaves the origin; this makes sure a credential
    is never attached to a request for any other origin in the first place, and never
    sent in clear text (plain http: loopback only, for tests)."""

    def __init__(self, urls: list[str], auth: tuple[str, str] | None = None):
        """`urls` may carry user:password@; `auth` is (URL, bearer token): the token goes
        to that URL's origin."""
        self.rules: list[tuple[tuple[str, str, int | None], str]] = []
        for url in urls:
            parts = urlsplit(url)
            if "@" in parts.netloc:
                pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
                self.rules.append(
                    (_origin(url), "Basic " + base64.b64encode(pair.encode()).decode()))
        if auth:
            self.rules.append((_origin(auth[0]), f"Bearer {auth[1]}"))

    def apply(self, request: httpx.Request) -> None:
        origin = _origin(request.url)
        secure = origin[0] == "https" or origin[1] in LOOPBACK
        for allowed, header in self.rules:
            if origin == allowed and secure:
                request.headers["Authorization"] = header
                return
        request.headers.pop("Authorization", None)
