"""Known models: the TOML files shipped in `llmctl/data/catalog/` (schema in text.toml's
header) plus the user's own under `$LLMCTL_HOME/catalog/`: hand-written `*.toml` files in
the same format, and `user.json`, the entries `llmctl catalog add/import` write (the same
schema as JSON; editing it is `llmctl.store.user_catalog`'s business)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.errors import UsageError

if TYPE_CHECKING:
    from llmctl.store.layout import StoreLayout

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "catalog"
USER_FILE = "user.json"
KINDS = ("text", "image")
# Each format and the (kind, engine) a model in it has unless its entry says otherwise.
FORMATS: dict[str, tuple[str, str]] = {
    "gguf": ("text", "llama"),
    "safetensors": ("text", "mlx"),
    "mlx": ("text", "mlx"),
    "diffusers": ("image", "diffusers"),
    "coreml": ("image", "coreml"),
}
ENGINES = tuple(dict.fromkeys(engine for _, engine in FORMATS.values()))


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

    def to_dict(self) -> dict[str, Any]:
        """The entry as a catalog file has it (sources flattened to `type` + options)."""
        data = asdict(self)
        data["sources"] = [{"type": s.type, **s.options} for s in self.sources]
        return data

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


# A GGUF quantization in a file name: Q4_K_M, q8_0, IQ4_XS, F16, BF16, UD-Q4_K_XL ...
# Parts after the first are short (K, M, XXS, 0), so "Q4_K_M_imatrix" gives Q4_K_M.
_QUANT = re.compile(r"(?<![a-z0-9])((?:ud-)?(?:i?q\d(?:_[a-z0-9]{1,3})*|bf16|f16|f32|tq\d_\d"
                    r"|mxfp4))(?![a-z0-9])")


def quantization_in(file_name: str) -> str | None:
    """The quantization a GGUF file's name states (the last one), upper case."""
    stem = file_name.rsplit("/", 1)[-1].lower().removesuffix(".gguf")
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else None


def _get_folded(table: dict[str, Any], key: str | None) -> Any:
    if key is None:
        return None
    for k, v in table.items():
        if k.upper() == key.upper():
            return v
    return None


def parse_entry(raw: dict[str, Any], origin: Path | str) -> CatalogEntry:
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


def read_file(path: Path) -> list[dict[str, Any]]:
    """The raw `model` tables of one catalog file, TOML or JSON."""
    try:
        if path.suffix == ".json":
            import json

            data = json.loads(path.read_bytes())
        else:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise UsageError(f"catalog file {path} is not valid {kind}: {exc}",
                         hint="fix or remove it") from None
    models = data.get("model", []) if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise UsageError(f"catalog file {path} has no list of model tables",
                         hint="fix or remove it")
    return models


class Catalog:
    def __init__(self, files: list[Path]):
        self.files = files

    @classmethod
    def default(cls, home: Path | None = None) -> Catalog:
        files = sorted(SHIPPED.glob("*.toml"))
        folder = home / "catalog" if home is not None else None
        if folder is not None and folder.is_dir():
            # The user's entries come last so that they win over shipped ones; the entries
            # `llmctl catalog add` wrote come after hand-written ones.
            files += sorted(folder.glob("*.toml"))
            if (folder / USER_FILE).is_file():
                files.append(folder / USER_FILE)
        return cls(files)

    @cached_property
    def _loaded(self) -> tuple[list[CatalogEntry], dict[str, Path]]:
        by_ref: dict[str, CatalogEntry] = {}
        origins: dict[str, Path] = {}
        for path in self.files:
            for raw in read_file(path):
                entry = parse_entry(raw, path)
                by_ref[entry.reference] = entry
                origins[entry.reference] = path
        return list(by_ref.values()), origins

    @property
    def entries(self) -> list[CatalogEntry]:
        return self._loaded[0]

    def origin(self, entry: CatalogEntry) -> Path:
        """The file the entry comes from (the last one, when a user entry shadows another)."""
        return self._loaded[1][entry.reference]

    def is_shipped(self, entry: CatalogEntry) -> bool:
        return self.origin(entry).parent == SHIPPED

    def label(self, entry: CatalogEntry) -> str:
        """Where an entry comes from, in a word: shipped, user (user.json), or its file."""
        if self.is_shipped(entry):
            return "shipped"
        path = self.origin(entry)
        return "user" if path.name == USER_FILE else str(path)

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
        """The entry marked default, else "latest" (what a bare name means for stored
        models too), else the only tag."""
        tags = [e for e in self.entries if e.name == name]
        for entry in tags:
            if entry.default:
                return entry.tag
        if any(e.tag == "latest" for e in tags):
            return "latest"
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


@dataclass(frozen=True)
class AvailableModel:
    """A catalog entry as `ls --available` shows it."""

    entry: CatalogEntry
    shipped: bool
    stored: list[str]  # references of the entry and its variants that are in the store
    # Bytes it needs: min_ram, else its size (the weights at least must fit); 0 = unknown.
    need: int
    fits: bool | None  # None: the entry gives no figure, or this machine's memory is unknown

    def to_dict(self) -> dict[str, Any]:
        entry = self.entry
        return {
            "name": entry.name, "tag": entry.tag, "reference": entry.reference,
            "kind": entry.kind, "engine": entry.engine, "format": entry.format,
            "size": entry.size, "min_ram": entry.min_ram, "fits": self.fits,
            "stored": self.stored, "quantization": entry.quantization,
            "quantizations": entry.quantizations, "default": entry.default,
            "shipped": self.shipped, "license": entry.license,
            "description": entry.description,
            "sources": [s.type for s in entry.sources],
        }


@dataclass(frozen=True)
class Availability:
    models: list[AvailableModel]
    memory: int | None  # bytes this process may use (see llmctl.resources)


def available(catalog: Catalog, layout: StoreLayout, *, engine: str | None = None,
              kind: str | None = None, fits: bool = False) -> Availability:
    """Catalog models, filtered by engine and kind; with `fits`, only those known to fit
    in the memory this process may use."""
    from llmctl.resources import usable_memory_bytes
    from llmctl.store.manifest import iter_manifests

    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown kind '{kind}'", hint=f"choose one of: {', '.join(KINDS)}")
    engines = dict.fromkeys([*ENGINES, *(e.engine for e in catalog.entries if e.engine)])
    if engine is not None and engine not in engines:
        raise UsageError(f"unknown engine '{engine}'",
                         hint=f"choose one of: {', '.join(engines)}")
    memory = usable_memory_bytes()
    stored = {m.reference for m in iter_manifests(layout)}
    found = []
    for entry in catalog.entries:
        if (engine and entry.engine != engine) or (kind and entry.kind != kind):
            continue
        variants = [entry.reference] + [f"{entry.reference}-{q.lower()}"
                                        for q in entry.quantizations[1:]]
        need = entry.min_ram or entry.size
        fit = None if not need or memory is None else need <= memory
        if fits and not fit:
            continue
        found.append(AvailableModel(entry, catalog.is_shipped(entry),
                                    [v for v in variants if v in stored], need, fit))
    return Availability(found, memory)
