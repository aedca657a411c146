"""Known models: the TOML files shipped in `llmctl/data/catalog/` (schema in text.toml's
header) plus the user's own under `$LLMCTL_HOME/catalog/`: hand-written `*.toml` files in
the same format, and `user.json`, the entries `llmctl catalog add/import` write (the same
schema as JSON; editing it is `llmctl.store.user_catalog`'s business)."""

from __future__ import annotations

import re
import tomllib
import warnings
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from llmctl.errors import InvalidName, StoreWarning, UsageError
from llmctl.formats import ENGINES, FORMATS, KINDS
from llmctl.store.catalog_files import SHIPPED, USER_FILE, catalog_files
from llmctl.store.credentials import public_url
from llmctl.store.layout import relative_name

if TYPE_CHECKING:
    from llmctl.store.layout import StoreLayout



@dataclass(frozen=True)
class CatalogSource:
    type: str  # "package" | "hf" | "url"
    options: dict[str, Any]

    @property
    def files(self) -> dict[str, str]:
        return self.options.get("files", {})

    def file(self, quantization: str | None) -> str | None:
        return _get_folded(self.files, quantization)

    def offers(self, quantization: str | None) -> bool:
        """False when the source lists its files per quantization and not this one."""
        return not (quantization and self.files and self.file(quantization) is None)

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


# -- checking entries: every catalog file, shipped or the user's, goes through these ----------
# A catalog entry decides what `pull` opens, links and downloads, and registry JSON comes
# from anywhere: a package path with '../' once linked an arbitrary local file on pull, and
# one malformed entry broke `pull` and `catalog export` for the whole catalog (issue 10).

_NAME_PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_PACKAGE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
SOURCE_TYPES = ("package", "hf", "url")


def check_url(text: Any, what: str = "url") -> str:
    """An http(s) URL with a host and no credentials in it."""
    if not isinstance(text, str):
        raise UsageError(f"{what} must be a string, not {type(text).__name__}")
    parts = urlsplit(text.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname or " " in text.strip():
        raise UsageError(f"{what} '{text[:80]}' is not an http(s) URL")
    # The catalog is plain text that gets exported and shared: never a secret in it, neither
    # user:password@ nor a token or signature in the query.
    if parts.username or parts.password or public_url(text.strip()) != urlunsplit(
            parts._replace(fragment="")):
        raise UsageError(f"{what} '{public_url(text.strip())}' carries credentials",
                         hint="mark the entry as needing auth and set LLMCTL_TOKEN instead")
    return text.strip()


def check_sha256(text: Any) -> str | None:
    if text in (None, ""):
        return None
    value = str(text).strip().lower().removeprefix("sha256:")
    if not _HEX64.match(value):
        raise UsageError(f"sha256 '{str(text)[:80]}' is not 64 hexadecimal digits")
    return value


def _strings(value: Any, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise UsageError(f"{what} must be a string or a list of strings")
    return items


def _digests(value: Any) -> None:
    """sha256 as one digest (a one-file source) or {QUANT: digest}."""
    for digest in value.values() if isinstance(value, dict) else [value]:
        if check_sha256(digest) is None:
            raise UsageError("sha256 must be 64 hexadecimal digits")


def _file_in(value: Any, what: str) -> None:
    try:
        relative_name(value, what)
    except InvalidName as exc:
        raise UsageError(str(exc)) from None


def check_source(raw: Any) -> CatalogSource:
    """A source of an entry, checked field by field; UsageError names what is wrong."""
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise UsageError("a source must be a table with a 'type'")
    kind = raw["type"]
    options = {k: v for k, v in raw.items() if k != "type"}
    allowed = {"package": {"package", "path", "parts", "sha256"},
               "hf": {"repo", "revision", "files", "allow_patterns", "sha256"},
               "url": {"url", "alternative_urls", "sha256", "unpack", "auth"}}.get(kind)
    if allowed is None:
        raise UsageError(f"unknown source type '{kind[:40]}'",
                         hint=f"use one of: {', '.join(SOURCE_TYPES)}")
    if unknown := set(options) - allowed:
        raise UsageError(f"unknown keys {sorted(unknown)} in a {kind} source")
    if "sha256" in options:
        _digests(options["sha256"])
    if kind == "package":
        parts = options.get("parts")
        pieces = [options] if parts is None else parts
        if not isinstance(pieces, list) or not pieces or not all(
                isinstance(p, dict) for p in pieces):
            raise UsageError("'parts' must be a list of {package, path} tables")
        if not isinstance(options.get("package"), str) or not _PACKAGE.match(
                options["package"]):
            raise UsageError(f"package '{str(options.get('package'))[:60]}' is not a "
                             "distribution name")
        for piece in pieces:
            package = piece.get("package")
            if not isinstance(package, str) or not _PACKAGE.match(package):
                raise UsageError(f"package '{str(package)[:60]}' is not a distribution name")
            _file_in(piece.get("path"), "package path")
    elif kind == "hf":
        repo = options.get("repo")
        if not isinstance(repo, str) or not _REPO.match(repo) or ".." in repo:
            raise UsageError(f"'{str(repo)[:60]}' is not a Hugging Face repository",
                             hint="use ORG/REPO")
        revision = options.get("revision")
        if revision is not None and (not isinstance(revision, str)
                                     or not _REVISION.match(revision) or ".." in revision):
            raise UsageError(f"revision '{str(revision)[:60]}' is not a branch, tag or commit")
        files = options.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(q, str) for q in files):
            raise UsageError("'files' must be a table of QUANT = \"file name\"")
        for name in files.values():
            _file_in(name, "file")
        if "allow_patterns" in options:
            _strings(options["allow_patterns"], "'allow_patterns'")
    else:
        check_url(options.get("url"))
        for alternative in _strings(options.get("alternative_urls", []), "'alternative_urls'"):
            check_url(alternative, "alternative URL")
        for flag in ("unpack", "auth"):
            if not isinstance(options.get(flag, False), bool):
                raise UsageError(f"'{flag}' must be true or false")
    return CatalogSource(kind, options)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "tag": str, "kind": str, "engine": str, "format": str,
    "quantization": (str, type(None)), "default": bool, "size": int, "min_ram": int,
    "license": str, "homepage": str, "description": str, "verified": bool,
    "parameters": dict,
}


def parse_entry(raw: dict[str, Any], origin: Path | str) -> CatalogEntry:
    """One [[model]] table, checked; UsageError naming the file, the entry and the problem."""
    where = f"{str(raw.get('name', '?'))[:60]}:{str(raw.get('tag', '?'))[:40]}"
    try:
        return check_entry(raw)
    except UsageError as exc:
        raise UsageError(f"catalog file {origin} has a bad entry {where}: {exc}",
                         hint=exc.hint) from None


def check_entry(raw: dict[str, Any]) -> CatalogEntry:
    """One [[model]] table as an entry, every field and source checked (UsageError)."""
    if not isinstance(raw, dict):
        raise UsageError("an entry must be a table")
    known = {f.name for f in fields(CatalogEntry)} - {"sources"}
    if unknown := set(raw) - known - {"sources"}:
        raise UsageError(f"unknown keys {sorted(unknown)}")
    for key in ("name", "tag", "kind", "engine", "format"):
        if key not in raw:
            raise UsageError(f"missing '{key}'")
    for key, value in raw.items():
        expected = _TYPES.get(key)
        if expected and (not isinstance(value, expected) or (
                isinstance(value, bool) and expected is int)):
            raise UsageError(f"'{key}' has the wrong type ({type(value).__name__})")
    name_parts = raw["name"].split("/")
    if len(name_parts) > 2 or not all(_NAME_PART.match(p) for p in name_parts) or (
            not _NAME_PART.match(raw["tag"])):
        raise UsageError("name and tag must be lower-case letters, digits, '.', '_', "
                         "'-' (one '/' in the name at most)")
    if raw["kind"] not in (*KINDS, "") or raw["format"] not in (*FORMATS, ""):
        raise UsageError(f"unknown kind '{raw['kind'][:20]}' or format "
                         f"'{raw['format'][:20]}'")
    if raw.get("size", 0) < 0 or raw.get("min_ram", 0) < 0:
        raise UsageError("sizes cannot be negative")
    sources = raw.get("sources", [])
    if not isinstance(sources, list) or not sources:
        raise UsageError("'sources' must be a non-empty list")
    checked = [check_source(s) for s in sources]
    return CatalogEntry(sources=checked, **{k: v for k, v in raw.items() if k in known})


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


def _skipped(reason: str) -> None:
    warnings.warn(StoreWarning(f"{reason}; skipped (fix or remove it)"), stacklevel=3)


class Catalog:
    def __init__(self, files: list[Path]):
        self.files = files

    @classmethod
    def default(cls, home: Path | None = None) -> Catalog:
        return cls(catalog_files(home))

    @cached_property
    def _loaded(self) -> tuple[list[CatalogEntry], dict[str, Path]]:
        """Every good entry; an unreadable file or a bad entry is skipped with a warning,
        so that one of them never breaks the rest of the catalog."""
        by_ref: dict[str, CatalogEntry] = {}
        origins: dict[str, Path] = {}
        for path in self.files:
            try:
                raws = read_file(path)
            except (UsageError, OSError) as exc:
                _skipped(f"{exc}" if isinstance(exc, UsageError) else
                         f"catalog file {path} cannot be read ({exc.strerror})")
                continue
            for raw in raws:
                try:
                    entry = parse_entry(raw, path)
                except UsageError as exc:
                    _skipped(str(exc))
                    continue
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
    memory: int | None  # bytes llmctl plans for a model to need (llmctl.host.allowed_memory)


def available(catalog: Catalog, layout: StoreLayout, *, engine: str | None = None,
              kind: str | None = None, fits: bool = False) -> Availability:
    """Catalog models, filtered by engine and kind; with `fits`, only those known to fit
    in the memory llmctl plans for: the rule run's memory guard applies too."""
    from llmctl.host import allowed_memory
    from llmctl.store.manifest import iter_manifests

    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown kind '{kind}'", hint=f"choose one of: {', '.join(KINDS)}")
    engines = dict.fromkeys([*ENGINES, *(e.engine for e in catalog.entries if e.engine)])
    if engine is not None and engine not in engines:
        raise UsageError(f"unknown engine '{engine}'",
                         hint=f"choose one of: {', '.join(engines)}")
    memory = allowed_memory()
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
