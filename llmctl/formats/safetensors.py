"""safetensors files: their headers (tensor names, types, shapes), read as JSON without
loading weights or importing a library."""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path


def tensors(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (dtype, element count) from a .safetensors header: 8 bytes of length, then
    that much JSON."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    return {name: (entry["dtype"], prod(entry["shape"])) for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)}
