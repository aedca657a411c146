"""The one table that turns known exceptions into one line and an exit code.

Anything not in the table is a bug: it is reported as one, with the traceback under
LLMCTL_DEBUG=1.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from llmctl import errors

OK = 0
FAILURE = 1
USAGE = 2
NOT_FOUND = 3
VERIFICATION = 4
RESOURCES = 5
INTERRUPTED = 130


def _usage(e: errors.UsageError) -> str:
    return f"{e}; {e.hint}" if e.hint else str(e)


def _not_found(e: errors.ModelNotFound) -> str:
    if e.in_catalog:
        return f"model '{e.reference}' is not in the store; try: llmctl pull {e.reference}"
    if e.suggestions:
        return f"model '{e.reference}' not found; did you mean {' or '.join(e.suggestions)}?"
    return f"model '{e.reference}' not found; try: llmctl ls"


def _ambiguous(e: errors.AmbiguousReference) -> str:
    return f"'{e.reference}' matches several models ({', '.join(e.matches)}); use a longer ID"


def _unavailable(e: errors.SourceUnavailable) -> str:
    return f"cannot pull {e.model}: " + "; ".join(e.reasons)


def _verification(e: errors.VerificationFailed) -> str:
    return f"{e.path}: {e.reason}"


def _resources(e: errors.InsufficientResources) -> str:
    from llmctl.units import format_bytes

    where = f" in {e.where}" if e.where else ""
    text = (f"not enough {e.what}{where}: need {format_bytes(e.need)}, "
            f"have {format_bytes(e.have)}")
    return f"{text}; {e.hint}" if e.hint else text


def _engine(e: errors.EngineUnavailable) -> str:
    return f"the {e.engine} engine cannot run here: {e.reason}" + (
        f"; install it: {e.install}" if e.install else "")


def _os_error(e: OSError) -> str:
    name = str(e.filename) if e.filename else ""
    where = f" ({name if len(name) <= 120 else name[:117] + '...'})" if name else ""
    return f"{e.strerror or e}{where}"


# Ordered: the first matching row wins, so subclasses come before their bases.
TABLE: list[tuple[type[BaseException], int, Callable[[Any], str]]] = [
    (errors.UsageError, USAGE, _usage),
    (errors.ModelNotFound, NOT_FOUND, _not_found),
    (errors.AmbiguousReference, USAGE, _ambiguous),
    (errors.SourceUnavailable, NOT_FOUND, _unavailable),
    (errors.VerificationFailed, VERIFICATION, _verification),
    (errors.InsufficientResources, RESOURCES, _resources),
    (errors.DownloadFailed, FAILURE, str),
    (errors.EngineUnavailable, FAILURE, _engine),
    (errors.EngineFailure, FAILURE, str),
]


# What the file system refuses, by errno: (exit code, what to do next). Where the store is
# the culprit, the hint names LLMCTL_HOME.
OS_ERRORS: dict[int, tuple[int, str]] = {
    errno.ENOSPC: (RESOURCES, "free some space and retry"),
    errno.EDQUOT: (RESOURCES, "free some space and retry"),
    errno.EROFS: (FAILURE, "the file system is read-only; point LLMCTL_HOME at a writable "
                           "folder"),
    errno.EACCES: (FAILURE, "check the permissions, or point LLMCTL_HOME at a folder of "
                            "yours"),
    errno.EPERM: (FAILURE, "check the permissions, or point LLMCTL_HOME at a folder of yours"),
    errno.ENOTDIR: (USAGE, "a file stands where a folder is needed; check LLMCTL_HOME and "
                           "the paths given"),
    errno.ENAMETOOLONG: (USAGE, "use a shorter name or path"),
    errno.ELOOP: (USAGE, "a path leads through a loop of symbolic links"),
}


def describe(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for a known exception, None for a bug."""
    if isinstance(exc, OSError) and exc.errno in OS_ERRORS:
        code, hint = OS_ERRORS[exc.errno]
        prefix = {errno.ENOSPC: "not enough disk space: ", errno.EDQUOT: "not enough disk "
                  "space: ", errno.EACCES: "permission denied: ",
                  errno.EPERM: "permission denied: "}.get(exc.errno, "")
        return code, f"{prefix}{_os_error(exc)}; {hint}"
    if isinstance(exc, PermissionError):
        return FAILURE, f"permission denied: {_os_error(exc)}"
    for kind, code, message in TABLE:
        if isinstance(exc, kind):
            return code, message(exc)
    return None
