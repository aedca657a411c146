"""Known models: the TOML files shipped in `llmctl/data/catalog/` (schema in text.toml's
header) plus the user's own under `$LLMCTL_HOME/catalog/`."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "catalog"


@dataclass(frozen=True)
class CatalogSource:
    type: str  # "package" | "hf" | "url"
    options: dict[str, Any]

    @property
    def files(self) -> dict[str, str]:
        return self.options.get("files", {})

    def file(self, quantization: str | None) -> str | None:
        return _get_folded(self.files, quantization)

    def sha256(self, quantization: str) -> str | None:
        value = self.options.get("sha256", {})
        if isinstance(value, str):  # a source of one file (type "url")
            return value
        return _get_folded(value, quantization)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    tag: str
    kind: str
    engine: str
    format: str
    sources: list[CatalogSource]
    quantization: str | None = None
    default: bool = False
    size: int = 0
    min_ram: int = 0
    license: str = ""
    homepage: str = ""
    description: str = ""
    verified: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def quantizations(self) -> list[str]:
        """Every quantization some source can provide, the default first."""
        found: list[str] = [self.quantization] if self.quantization else []
        for source in self.sources:
            for quant in source.files:
                if quant.upper() not in (q.upper() for q in found):
                    found.append(quant)
        return found


@dataclass(frozen=True)
class CatalogMatch:
    """A catalog entry and the variant of it a reference asked for."""

    entry: CatalogEntry
    quantization: str | None
    tag: str  # the tag the stored model gets: the entry's, plus "-<quant>" for a non-default

    @property
    def reference(self) -> str:
        return f"{self.entry.name}:{self.tag}"


def _get_folded(table: dict[str, Any], key: str | None) -> Any:
    if key is None:
        return None
    for k, v in table.items():
        if k.upper() == key.upper():
            return v
    return None


def _parse_entry(raw: dict[str, Any], origin: Path) -> CatalogEntry:
    try:
        sources = [
            CatalogSource(s["type"], {k: v for k, v in s.items() if k != "type"})
            for s in raw.get("sources", [])
        ]
        known = {f for f in CatalogEntry.__dataclass_fields__ if f != "sources"}
        unknown = set(raw) - known - {"sources"}
        if unknown:
            raise KeyError(f"unknown keys {sorted(unknown)}")
        return CatalogEntry(sources=sources, **{k: v for k, v in raw.items() if k in known})
    except (KeyError, TypeError) as exc:
        where = f"{raw.get('name', '?')}:{raw.get('tag', '?')}"
        raise UsageError(f"catalog file {origin} has a bad entry {where}: {exc}") from None


class Catalog:
    def __init__(self, files: list[Path]):
        self.files = files

    @classmethod
    def default(cls, home: Path | None = None) -> Catalog:
        files = sorted(SHIPPED.glob("*.toml"))
        if home is not None and (home / "catalog").is_dir():
            # The user's entries come last so that they win over shipped ones.
            files += sorted((home / "catalog").glob("*.toml"))
        return cls(files)

    @cached_property
    def entries(self) -> list[CatalogEntry]:
        by_ref: dict[str, CatalogEntry] = {}
        for path in self.files:
            with open(path, "rb") as handle:
                try:
                    data = tomllib.load(handle)
                except tomllib.TOMLDecodeError as exc:
                    raise UsageError(f"catalog file {path} is not valid TOML: {exc}") from None
            for raw in data.get("model", []):
                entry = _parse_entry(raw, path)
                by_ref[entry.reference] = entry
        return list(by_ref.values())

    def names(self) -> list[str]:
        return sorted({e.name for e in self.entries})

    def references(self) -> list[str]:
        """Every reference the catalog answers to, variants included."""
        refs = []
        for entry in self.entries:
            refs.append(entry.reference)
            for quant in entry.quantizations[1:]:
                refs.append(f"{entry.reference}-{quant.lower()}")
        return refs

    def default_tag(self, name: str) -> str | None:
        tags = [e for e in self.entries if e.name == name]
        for entry in tags:
            if entry.default:
                return entry.tag
        return tags[0].tag if len(tags) == 1 else None

    def find(self, name: str, tag: str | None) -> CatalogMatch | None:
        tag = tag or self.default_tag(name)
        if tag is None:
            return None
        for entry in self.entries:
            if entry.name != name:
                continue
            if entry.tag == tag:
                return CatalogMatch(entry, entry.quantization, entry.tag)
            prefix = entry.tag + "-"
            if tag.startswith(prefix):
                quant = tag[len(prefix):]
                for known in entry.quantizations:
                    if known.upper() == quant.upper():
                        is_default = known == entry.quantization
                        return CatalogMatch(
                            entry, known, entry.tag if is_default else f"{prefix}{known.lower()}"
                        )
        return None
