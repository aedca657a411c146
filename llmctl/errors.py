"""Exceptions the library raises for conditions a user can act on.

Each carries the facts; `llmctl.cli.errors` turns them into one line and an exit code.
"""

from __future__ import annotations


class LlmctlError(Exception):
    """Base class for every error llmctl reports without a traceback."""


class UsageError(LlmctlError):
    """The command line or an input asks for something that cannot be done as asked."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class InvalidName(UsageError, ValueError):
    """An ID, digest or file name that cannot become a path in the store (it would lead
    outside it, or is not a name at all). A ValueError too: read from data (a manifest, a
    conversation file) it makes the data unreadable."""


class StoreWarning(UserWarning):
    """Something in the store or the catalog is unreadable and was skipped (a truncated
    manifest, a bad catalog entry): issued with `warnings.warn`, shown once by the CLI."""


class ModelNotFound(LlmctlError):
    def __init__(self, reference: str, suggestions: list[str] | None = None,
                 in_catalog: bool = False):
        super().__init__(reference)
        self.reference = reference
        self.suggestions = suggestions or []
        # True when the catalog knows the model but the store does not have it yet.
        self.in_catalog = in_catalog


class AmbiguousReference(LlmctlError):
    def __init__(self, reference: str, matches: list[str]):
        super().__init__(reference)
        self.reference = reference
        self.matches = matches


class SourceUnavailable(LlmctlError):
    """No source listed for a model could provide it on this machine."""

    def __init__(self, model: str, reasons: list[str]):
        super().__init__(model)
        self.model = model
        self.reasons = reasons


class VerificationFailed(LlmctlError):
    """A file is not what it should be: wrong checksum, truncated, not a model file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class InsufficientResources(LlmctlError):
    """Not enough disk space or memory for what was asked: `need` and `have` in bytes."""

    def __init__(self, what: str, need: int, have: int, where: str = "", hint: str = ""):
        super().__init__(what)
        self.what = what  # "disk space" | "memory"
        self.need = need
        self.have = have
        self.where = where
        self.hint = hint


class DownloadFailed(LlmctlError):
    """A download could not complete (server errors, dropped connections after every
    retry, HTTP 4xx). What was downloaded so far is kept for the next attempt."""


class EngineUnavailable(LlmctlError):
    def __init__(self, engine: str, reason: str, install: str | None = None):
        super().__init__(f"{engine}: {reason}")
        self.engine = engine
        self.reason = reason
        self.install = install


class EngineFailure(LlmctlError):
    """The engine refused the model or failed while running it."""


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (an engine's library may say pages), or its
    type's name when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
