"""Prompt caches on disk: a prompt's KV state, saved so that a later process whose prompt
starts with the same tokens processes only the rest (`run --prompt-cache FILE`, and the
cache `chat` keeps with a conversation).

Each file starts with a header that says what made it: the model (its digest), the engine,
the context length, llmctl's version, this file format's version, and the tokens whose
state follows. A file made by anything else is refused with the reason (`CacheRefused`),
never loaded into a model it was not made by; so is a damaged one. The state itself is the
engine's own: llama.cpp's sequence state behind a header of ours (with the state's size
and CRC-32), mlx-lm's prompt-cache safetensors file with the header in its metadata.

Files are written under a temporary name beside the target and renamed when complete: a
process killed while saving leaves the previous cache, or none, never half of one.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl import __version__
from llmctl.errors import EngineFailure

FORMAT_VERSION = 1
MAGIC = b"LLMCTL-KV\n"  # llmctl's own container (the llama engine's caches)
HEADER_KEY = "llmctl"  # the header's key in a safetensors file's metadata
MAX_HEADER = 64 << 20  # a header longer than this is not one of ours
PARTIAL = ".partial.safetensors"  # .NAME.<pid>.partial.safetensors while being written


class CacheRefused(EngineFailure):
    """A prompt cache that is not used: made by something else, or damaged. Callers note
    it on stderr and go on without the cache."""


@dataclass(frozen=True)
class CacheIdentity:
    """What a cache must have been made by to be loaded."""

    model: str  # the model's digest (or, for a file run by path, its path, size and time)
    engine: str
    context: int

    def header(self, tokens: Sequence[int]) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "llmctl": __version__, "model": self.model,
                "engine": self.engine, "context": self.context, "token_count": len(tokens),
                "tokens": list(tokens)}

    def refusal(self, header: dict[str, Any]) -> str | None:
        """Why a cache with `header` must not be loaded, or None."""
        said = {"format": (header.get("format"), FORMAT_VERSION),
                "llmctl version": (header.get("llmctl"), __version__),
                "engine": (header.get("engine"), self.engine),
                "model": (header.get("model"), self.model),
                "context": (header.get("context"), self.context)}
        for what, (made, now) in said.items():
            if made != now:
                shown = {"model": "another model", "engine": f"the {made} engine",
                         "context": f"a context of {made} tokens (this one is {now})"}
                return f"it was made by {shown.get(what, f'{what} {made}')}"
        tokens = header.get("tokens")
        if (not isinstance(tokens, list) or len(tokens) != header.get("token_count")
                or not all(isinstance(t, int) for t in tokens)):
            return "its header is damaged"
        return None


def write(path: Path, write_state: Callable[[Path, dict[str, Any]], None],
          identity: CacheIdentity, tokens: Sequence[int]) -> None:
    """The engine's state with its header, to `path` through a temporary file beside it
    (ending in .safetensors: MLX adds that suffix to names without it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")
    try:
        write_state(temporary, identity.header(tokens))
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _remove_orphans(path: Path) -> None:
    """Temporary files a killed process left beside `path` (its pid no longer runs)."""
    for orphan in path.parent.glob(f".{path.name}.*{PARTIAL}"):
        pid = orphan.name[len(path.name) + 2:-len(PARTIAL)]
        if pid.isdigit() and not _running(int(pid)):
            orphan.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read(path: Path, identity: CacheIdentity,
         read_state: Callable[[Path, dict[str, Any]], int]) -> list[int]:
    """The tokens of the cache at `path`, once the engine has restored its state; or
    CacheRefused, saying why not."""
    header = read_header(path)
    if (reason := identity.refusal(header)) is not None:
        raise CacheRefused(f"prompt cache {path} not used: {reason}")
    tokens = header["tokens"]
    try:
        restored = read_state(path, header)
    except CacheRefused:
        raise
    except Exception as exc:  # the engine library's words for a damaged file
        raise CacheRefused(f"prompt cache {path} not used: it is damaged ({exc})") from None
    if restored != len(tokens):
        raise CacheRefused(f"prompt cache {path} not used: it holds {restored} tokens where "
                           f"its header says {len(tokens)}")
    return tokens


def read_header(path: Path) -> dict[str, Any]:
    """A cache file's header, from either container; CacheRefused if it has none."""
    try:
        with open(path, "rb") as file:
            start = file.read(len(MAGIC))
            if start == MAGIC:
                header = _json_block(file)
                header["_payload_offset"] = file.tell()
                return header
            # A safetensors file: an 8-byte little-endian length, then its JSON header.
            file.seek(0)
            header = _json_block(file).get("__metadata__", {})
            if not isinstance(header, dict) or not isinstance(
                    mine := header.get(f"0.{HEADER_KEY}"), str):
                raise ValueError("no llmctl header")
            return json.loads(mine)
    except (OSError, ValueError, struct.error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not a prompt cache " \
            "llmctl wrote, or it is cut short"
        raise CacheRefused(f"prompt cache {path} not used: {reason}") from None


def _json_block(file: Any) -> dict[str, Any]:
    size = struct.unpack("<Q", file.read(8))[0]
    if size > MAX_HEADER:
        raise ValueError("header too long")
    data = file.read(size)
    if len(data) != size:
        raise ValueError("cut short")
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a header")
    return value


def write_container(path: Path, header: dict[str, Any], payload: bytes | memoryview) -> None:
    """llmctl's own container: MAGIC, the header's length and JSON, then the payload."""
    import zlib

    header = {**header, "payload_size": len(payload), "payload_crc32": zlib.crc32(payload)}
    data = json.dumps(header).encode()
    with open(path, "wb") as file:
        file.write(MAGIC + struct.pack("<Q", len(data)) + data)
        file.write(payload)


def read_payload(path: Path, header: dict[str, Any], into: Callable[[int], Any]) -> Any:
    """The payload of llmctl's container, read straight into the buffer `into(size)`
    makes and checked against its size and CRC-32 (damage, not tampering: the header's
    identity is what keeps a cache out of the wrong model)."""
    import zlib

    size, offset = header.get("payload_size"), header["_payload_offset"]
    with open(path, "rb") as file:
        held = os.fstat(file.fileno()).st_size - offset
        if not isinstance(size, int) or held != size:
            raise CacheRefused(f"prompt cache {path} not used: it is cut short or padded "
                               f"({held} of {size} bytes)")
        buffer = into(size)
        file.seek(offset)
        file.readinto(buffer)
    if zlib.crc32(memoryview(buffer).cast("B")) != header.get("payload_crc32"):
        raise CacheRefused(f"prompt cache {path} not used: its checksum does not match")
    return buffer
