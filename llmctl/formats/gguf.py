"""Read and check a GGUF file's header: its metadata and where its tensors lie.

Types, quantization block sizes and file-type names come from the `gguf` package. The walk
over the header is our own: `gguf.GGUFReader` builds a numpy view for every element of
every array (the tokenizer's 49k tokens and merges), which took 2 s for a 98 MB model here;
this walk skips those arrays and reads the same header in milliseconds, so `show` and the
pre-flight check before `run` stay instant on any model size.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from llmctl.errors import VerificationFailed

MAX_DIMS = 4  # GGML_MAX_DIMS
ARRAY_KEEP = 64  # arrays longer than this are summarised, not read


@dataclass(frozen=True)
class ArraySummary:
    """A long array in the metadata (token lists, merges), kept as type and length."""

    type: str
    length: int

    def __str__(self) -> str:
        return f"[{self.length} × {self.type}]"


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensor_count: int
    parameter_count: int
    data_end: int  # the last byte any tensor needs; the file must be at least this long
    file_size: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def arch_value(self, key: str) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}")

    @property
    def quantization(self) -> str | None:
        from gguf.constants import LlamaFileType

        file_type = self.metadata.get("general.file_type")
        if file_type is None:
            return None
        try:
            name = LlamaFileType(file_type).name
        except ValueError:
            return f"type {file_type}"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")

    def summary(self) -> dict[str, Any]:
        """The facts a manifest records and `show` prints first."""
        return {
            "architecture": self.architecture,
            "parameters": self.parameter_count,
            "quantization": self.quantization,
            "context_length": self.arch_value("context_length"),
            "embedding_length": self.arch_value("embedding_length"),
            "block_count": self.arch_value("block_count"),
            "chat_template": "tokenizer.chat_template" in self.metadata,
            "model_name": self.metadata.get("general.name"),
            "license": self.metadata.get("general.license"),
        }


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, reason: str) -> VerificationFailed:
        return VerificationFailed(str(self.path), reason)

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise self.fail("truncated: the header ends before its last field")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, skip: bool = False) -> str | None:
        length = self.take("<Q")
        if self.pos + length > len(self.buf):
            raise self.fail("truncated: a header string runs past the end of the file")
        start, self.pos = self.pos, self.pos + length
        if skip:
            return None
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _value(cur: _Cursor, value_type: int) -> Any:
    if value_type in _SCALARS:
        return cur.take(_SCALARS[value_type])
    if value_type == _STRING:
        return cur.string()
    if value_type == _ARRAY:
        item_type = cur.take("<I")
        length = cur.take("<Q")
        if length <= ARRAY_KEEP:
            return [_value(cur, item_type) for _ in range(length)]
        if item_type in _SCALARS:
            size = struct.calcsize(_SCALARS[item_type])
            if cur.pos + size * length > len(cur.buf):
                raise cur.fail("truncated: a metadata array runs past the end of the file")
            cur.pos += size * length
        elif item_type == _STRING:
            for _ in range(length):
                cur.string(skip=True)
        else:
            for _ in range(length):
                _value(cur, item_type)
        from gguf.constants import GGUFValueType

        return ArraySummary(GGUFValueType(item_type).name.lower(), length)
    raise cur.fail(f"not a valid GGUF file: unknown metadata type {value_type}")


def read_header(path: Path) -> GGUFHeader:
    """Parse and check the header; raise VerificationFailed for anything llama.cpp would
    trip over: not GGUF, an unknown version, a header or tensor data cut short."""
    from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

    path = Path(path)
    if path.is_dir():
        raise VerificationFailed(str(path), "is a folder, not a GGUF file")
    with open(path, "rb") as handle:
        file_size = path.stat().st_size
        if file_size < 24:
            raise VerificationFailed(str(path), f"only {file_size} bytes: not a GGUF model")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            if buf[:4] != b"GGUF":
                raise cur.fail("not a GGUF file (no GGUF magic at the start)")
            cur.pos = 4
            version = cur.take("<I")
            if version not in (2, 3):
                raise cur.fail(f"GGUF version {version} is not supported (2 and 3 are)")
            tensor_count = cur.take("<Q")
            kv_count = cur.take("<Q")
            # Each entry takes at least 8 bytes: counts beyond that are corruption.
            if (tensor_count + kv_count) * 8 > file_size:
                raise cur.fail("corrupt header: tensor and key counts exceed the file size")
            metadata: dict[str, Any] = {}
            for _ in range(kv_count):
                key = cur.string()
                metadata[key] = _value(cur, cur.take("<I"))
            tensors = []
            for _ in range(tensor_count):
                name = cur.string()
                n_dims = cur.take("<I")
                if n_dims > MAX_DIMS:
                    raise cur.fail(f"corrupt header: tensor {name} has {n_dims} dimensions")
                dims = [cur.take("<Q") for _ in range(n_dims)]
                type_id = cur.take("<I")
                offset = cur.take("<Q")
                tensors.append((name, dims, type_id, offset))
            alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
            # llama.cpp asserts on anything but a power of two (0 would divide by zero).
            if (not isinstance(alignment, int) or isinstance(alignment, bool)
                    or alignment <= 0 or alignment & (alignment - 1)):
                raise cur.fail(f"corrupt header: general.alignment is {alignment!r}, not a "
                               "power of two")
            data_start = -(-cur.pos // alignment) * alignment

    if not tensors:
        raise VerificationFailed(str(path), "a GGUF header without tensors: not a model")
    parameter_count = 0
    data_end = data_start
    tensor_types: dict[str, int] = {}
    for name, dims, type_id, offset in tensors:
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise VerificationFailed(
                str(path), f"tensor {name} has a type ({type_id}) this version cannot read"
            ) from None
        elements = prod(dims)
        parameter_count += elements
        tensor_types[qtype.name] = tensor_types.get(qtype.name, 0) + 1
        data_end = max(data_end, data_start + offset + elements // block * type_size)
    if data_end > file_size:
        raise VerificationFailed(
            str(path),
            f"truncated: tensor data needs {data_end} bytes but the file has {file_size}",
        )
    return GGUFHeader(version, metadata, tensor_count, parameter_count, data_end, file_size,
                      tensor_types)
