"""The user's own catalog entries, and the registry JSON that `catalog export/import` trade.

Entries that `llmctl catalog add/import` write live in `$LLMCTL_HOME/catalog/user.json`,
in the schema of the shipped TOML files (`{"model": [...]}`), read after them so that they
win. JSON rather than TOML because the standard library writes it (tomllib only reads; a
TOML writer would be a dependency for one small file), and because a file llmctl rewrites
must not be one a person annotates: hand-written `*.toml` files beside it are read, never
rewritten, so their comments survive.

Registry JSON is the shape other model managers exchange:
`{"custom": [{"id", "name", "url", "sha256", "requiresUnzip", "requiresAuth",
"alternativeURLs"}]}`. Exports add llmctl's own fields (kind, engine, format, size,
min_ram, description, sources ...), which other readers ignore and which make an export
read back as the same entries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from llmctl.errors import UsageError
from llmctl.formats import ENGINES, FORMATS, KINDS
from llmctl.store.catalog import (
    USER_FILE,
    Catalog,
    CatalogEntry,
    CatalogSource,
    check_entry,
    check_sha256,
    check_source,
    check_url,
    quantization_in,
    read_file,
)
from llmctl.store.layout import StoreLayout, write_atomically
from llmctl.store.names import DEFAULT_TAG, NameRef, parse_reference, sanitize_name

ARCHIVES = (".zip", ".tar.gz", ".tgz")  # as sources/url.py unpacks (not imported: httpx)
# Fields every stored entry spells out; the others are written only when not the default.
_ALWAYS = ("name", "tag", "kind", "engine", "format", "sources")


@dataclass(frozen=True)
class Change:
    entry: CatalogEntry
    status: str  # "added" | "replaced" | "unchanged" | "removed"
    shadows: str | None = None  # the file of the entry this one stands in for (or stood)


def user_file(layout: StoreLayout) -> Path:
    return layout.root / "catalog" / USER_FILE


# -- validation: every entry that reaches user.json went through these -----------------------

def reference(text: str) -> tuple[str, str]:
    """(name, tag) of NAME[:TAG], by the rules of model names; the tag defaults to latest."""
    try:
        ref = parse_reference(text)
    except UsageError:
        ref = None
    if not isinstance(ref, NameRef):
        raise UsageError(f"'{text}' is not a model name",
                         hint="use NAME[:TAG] (letters, digits, '.', '_', '-')")
    return ref.name, ref.tag or DEFAULT_TAG


def model_format(file_name: str, format: str | None = None, kind: str | None = None,
                 engine: str | None = None) -> tuple[str, str, str]:
    """(kind, engine, format) from what was given, else from the file's name: a .gguf is
    text/llama/gguf; an archive is judged by the name inside (x.mlmodelc.zip is Core ML).
    What cannot be told stays "": the files decide once they are downloaded."""
    from llmctl.formats import detect_format

    if format is not None and format not in FORMATS:
        raise UsageError(f"unknown format '{format}'",
                         hint=f"choose one of: {', '.join(FORMATS)}")
    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown kind '{kind}'", hint=f"choose one of: {', '.join(KINDS)}")
    if engine is not None and engine not in ENGINES:
        raise UsageError(f"unknown engine '{engine}'",
                         hint=f"choose one of: {', '.join(ENGINES)}")
    if format:
        info = FORMATS[format]
        return kind or info.kind, engine or info.engines[0], format
    inner = file_name.lower()
    for suffix in ARCHIVES:
        inner = inner.removesuffix(suffix)
    found = detect_format([inner]) if inner else None
    if found is not None and found.format == "ggml" and not PurePosixPath(inner).name.startswith(
            "ggml"):
        # Any lone .bin reads as whisper.cpp's layout, but a "model.bin" is as often a
        # pickle: only whisper.cpp's own names (ggml-tiny.bin) say ggml without --format.
        found = None
    if found is None:
        return kind or "", engine or "", ""
    return kind or found.kind, engine or found.engine, found.format


def url_file_name(url: str) -> str:
    return PurePosixPath(unquote(urlsplit(url).path)).name


def url_source(url: str, sha256: str | None = None, alternative_urls: list[str] | None = None,
               unpack: bool = False, auth: bool = False) -> CatalogSource:
    """A source of type "url" as llmctl.store.sources.url reads it. Flags are written only
    when set: without `unpack` the downloader unpacks by the file's suffix."""
    options: dict[str, Any] = {"url": check_url(url)}
    if sha := check_sha256(sha256):
        options["sha256"] = sha
    alternatives = [check_url(u, "alternative URL") for u in alternative_urls or []]
    if alternatives:
        options["alternative_urls"] = alternatives
    if unpack:
        options["unpack"] = True
    if auth:
        options["auth"] = True
    return CatalogSource("url", options)


def hf_source(repo: str, file: str | None, revision: str | None, sha256: str | None = None
              ) -> tuple[CatalogSource, str | None]:
    """A source of type "hf", and the quantization its file provides (its `files` key)."""
    if repo.count("/") != 1 or not all(repo.split("/")) or " " in repo:
        raise UsageError(f"'{repo}' is not a Hugging Face repository", hint="use ORG/REPO")
    options: dict[str, Any] = {"repo": repo}
    if revision:
        options["revision"] = revision
    quant = None
    if file:
        quant = quantization_in(file) or PurePosixPath(file).stem
        options["files"] = {quant: file}
        if sha := check_sha256(sha256):
            options["sha256"] = {quant: sha}
    return CatalogSource("hf", options), quant


def new_entry(text: str, source: CatalogSource, *, file_name: str,
              quantization: str | None = None, format: str | None = None,
              kind: str | None = None, engine: str | None = None, size: int = 0,
              min_ram: int = 0, description: str = "") -> CatalogEntry:
    name, tag = reference(text)
    kind, engine, format = model_format(file_name, format, kind, engine)
    if size < 0 or min_ram < 0:
        raise UsageError("sizes cannot be negative")
    return CatalogEntry(name=name, tag=tag, kind=kind, engine=engine, format=format,
                        sources=[source], quantization=quantization, size=size,
                        min_ram=min_ram, description=description)


def compact(entry: CatalogEntry) -> dict[str, Any]:
    """The entry as user.json keeps it: defaults left out, as in the shipped TOML."""
    defaults = {f.name: f.default for f in fields(CatalogEntry)}
    return {k: v for k, v in entry.to_dict().items()
            if k in _ALWAYS or (v != defaults.get(k) and v not in ({}, []))}


# -- user.json --------------------------------------------------------------------------------

def _write(layout: StoreLayout, raws: list[dict[str, Any]]) -> None:
    body = json.dumps({"model": raws}, indent=2, ensure_ascii=False) + "\n"
    write_atomically(user_file(layout), body.encode())


def save(layout: StoreLayout, entries: list[CatalogEntry], *, force: bool = False,
         replace_own: bool = False) -> list[Change]:
    """Write entries to user.json. An entry from another file (shipped, or a hand-written
    TOML) is shadowed only with `force`; one of user.json's own is replaced with
    `replace_own` or `force`. All entries or none are written."""
    seen: set[str] = set()
    for entry in entries:
        if entry.reference in seen:
            raise UsageError(f"{entry.reference} is given twice")
        seen.add(entry.reference)
    path = user_file(layout)
    with layout.work_lock("catalog"):
        catalog = Catalog.default(layout.root)
        own = {f"{r.get('name')}:{r.get('tag')}": r for r in _own(path)}
        rest = Catalog([f for f in catalog.files if f != path])
        others = {e.reference: (e, rest.origin(e)) for e in rest.entries}
        changes = []
        for entry in entries:
            ref = entry.reference
            other = others.get(ref)
            if other and not force:
                where = "is shipped with llmctl" if rest.is_shipped(other[0]) else (
                    f"is defined in {other[1]}")
                raise UsageError(f"{ref} {where}", hint="pass --force to use yours instead")
            if ref in own and not (replace_own or force) and own[ref] != compact(entry):
                raise UsageError(f"{ref} is already in your catalog",
                                 hint="pass --force to replace it")
            if other and not entry.default and other[0].default:
                entry = replace(entry, default=True)  # keep what a bare name resolves to
            raw = compact(entry)
            status = ("added" if ref not in own else
                      "unchanged" if own[ref] == raw else "replaced")
            own[ref] = raw
            changes.append(Change(entry, status, str(other[1]) if other else None))
        _write(layout, list(own.values()))
    return changes


def _own(path: Path) -> list[dict[str, Any]]:
    return read_file(path) if path.is_file() else []


def remove(layout: StoreLayout, texts: list[str]) -> list[Change]:
    """Delete entries from user.json; shipped and hand-written ones are refused."""
    path = user_file(layout)
    with layout.work_lock("catalog"):
        catalog = Catalog.default(layout.root)
        own = {f"{r.get('name')}:{r.get('tag')}": r for r in _own(path)}
        rest = Catalog([f for f in catalog.files if f != path])
        changes = []
        for text in texts:
            name, tag = reference(text)
            if ":" not in text:  # a bare name: the tag `pull NAME` would take
                tag = catalog.default_tag(name) or tag
            ref = f"{name}:{tag}"
            if ref not in own:
                entry = next((e for e in catalog.entries if e.reference == ref), None)
                if entry is None:
                    raise UsageError(f"no catalog entry {ref}",
                                     hint="see: llmctl catalog ls --user")
                if catalog.is_shipped(entry):
                    raise UsageError(f"{ref} is shipped with llmctl; only your own entries "
                                     "can be removed", hint="see: llmctl catalog ls --user")
                raise UsageError(f"{ref} is defined in {catalog.origin(entry)}",
                                 hint="edit that file to remove it")
            entry = next(e for e in catalog.entries if e.reference == ref)
            del own[ref]
            shadowed = next((e for e in rest.entries if e.reference == ref), None)
            changes.append(Change(entry, "removed",
                                  str(rest.origin(shadowed)) if shadowed else None))
        _write(layout, list(own.values()))
    return changes


def own_entries(catalog: Catalog) -> list[CatalogEntry]:
    """The entries of user.json and hand-written files: what `export` writes."""
    return [e for e in catalog.entries if not catalog.is_shipped(e)]


def write_registry(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())


# -- registry JSON ----------------------------------------------------------------------------

def to_registry(entries: list[CatalogEntry]) -> dict[str, Any]:
    return {"custom": [_registry_item(e) for e in entries]}


def _registry_item(entry: CatalogEntry) -> dict[str, Any]:
    url_sources = [s for s in entry.sources if s.type == "url"]
    item: dict[str, Any] = {
        "id": entry.name if entry.tag == DEFAULT_TAG else entry.reference,
        "name": entry.description or entry.reference,
    }
    if url_sources:
        options = url_sources[0].options
        item["url"] = options["url"]
        if options.get("sha256"):
            item["sha256"] = options["sha256"]
        # The downloader unpacks an archive by its suffix unless told: so do other readers.
        archive = url_file_name(options["url"]).lower().endswith(ARCHIVES)
        item["requiresUnzip"] = bool(options.get("unpack", archive))
        item["requiresAuth"] = bool(options.get("auth"))
        item["alternativeURLs"] = list(options.get("alternative_urls", []))
    else:
        # No plain URL: give other readers the Hub's own download address of the file.
        hub = next((s for s in entry.sources if s.type == "hf"), None)
        file = hub.file(entry.quantization) if hub else None
        if hub and file:
            revision = hub.options.get("revision", "main")
            item["url"] = f"https://huggingface.co/{hub.options['repo']}/resolve/{revision}/{file}"
            if sha := hub.sha256(entry.quantization or ""):
                item["sha256"] = sha
        elif hub:
            item["url"] = f"https://huggingface.co/{hub.options['repo']}"
        item.update(requiresUnzip=False, requiresAuth=False, alternativeURLs=[])
    # llmctl's own fields: ignored by other readers, and what makes an export read back
    # as the same entries.
    extra = compact(entry)
    del extra["name"], extra["tag"]
    item.update(extra)
    item.setdefault("description", "")
    return item


def read_registry(file: str) -> list[CatalogEntry]:
    """Entries from a registry JSON file, or stdin for "-" (see from_registry)."""
    import sys

    try:
        text = sys.stdin.read() if file == "-" else Path(file).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    return from_registry(text, "stdin" if file == "-" else file)


def from_registry(text: str, label: str) -> list[CatalogEntry]:
    """Entries from registry JSON (`{"custom": [...]}`, or the list alone). Every error
    names the entry; nothing is returned unless every entry is good."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{label} is not valid JSON: {exc}") from None
    items = data.get("custom") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise UsageError(f"{label} has no \"custom\" list of entries",
                         hint='expected {"custom": [{"id": ..., "url": ...}, ...]}')
    entries = []
    for number, item in enumerate(items, 1):
        where = f"{label}: entry {number}"
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            where += f" ('{item['id']}')"
        try:
            if not isinstance(item, dict):
                raise UsageError("is not an object")
            entries.append(_from_item(item))
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}", hint=exc.hint) from None
    return entries


def registry_reference(identifier: str) -> str:
    """An llmctl NAME:TAG from a registry id: "My Model" -> my-model:latest,
    "org/Repo:Q4" -> org/repo:q4 (one '/' at most, as in llmctl names)."""
    name, _, tag = identifier.partition(":")
    parts = [sanitize_name(p) for p in name.split("/") if p.strip()]
    name = "/".join([parts[0], "-".join(parts[1:])] if len(parts) > 1 else parts) or "model"
    return f"{name}:{sanitize_name(tag) if tag.strip() else DEFAULT_TAG}"


def _from_item(item: dict[str, Any]) -> CatalogEntry:
    identifier = item.get("id")
    if not isinstance(identifier, str) or not identifier.strip():
        raise UsageError("missing 'id'")
    ref = registry_reference(identifier)
    if "sources" in item:  # llmctl's own export: its sources, exactly
        sources = item["sources"]
        if not isinstance(sources, list) or not sources:
            raise UsageError("'sources' must be a non-empty list of sources")
        source_list = [check_source(s) for s in sources]  # every field, every type
    else:
        if "url" not in item:
            raise UsageError("missing 'url'")
        alternatives = item.get("alternativeURLs") or []
        if not isinstance(alternatives, list):
            raise UsageError("'alternativeURLs' must be a list of URLs")
        for flag in ("requiresUnzip", "requiresAuth"):
            if not isinstance(item.get(flag, False), bool):
                raise UsageError(f"'{flag}' must be true or false")
        source_list = [url_source(item["url"], item.get("sha256"), alternatives,
                                  unpack=item.get("requiresUnzip", False),
                                  auth=item.get("requiresAuth", False))]
    first_url = next((s.options.get("url", "") for s in source_list if s.type == "url"), "")
    given = {k: item[k] for k in ("kind", "engine", "format") if item.get(k)}
    kind, engine, format = model_format(url_file_name(first_url), **given)
    # llmctl's own fields when the file has them ("name" is the registry's display name).
    known = {f.name for f in fields(CatalogEntry)} - {"name", "tag", "sources"}
    raw = {k: v for k, v in item.items() if k in known}
    display = item.get("name") if isinstance(item.get("name"), str) else ""
    raw.update(kind=kind, engine=engine, format=format,
               description=item.get("description", display))
    for key in ("size", "min_ram"):
        if not isinstance(raw.get(key, 0), int) or raw.get(key, 0) < 0:
            raise UsageError(f"'{key}' must be a number of bytes")
    name, tag = reference(ref)
    # Every field checked as any catalog file's are (types, names, sources).
    return check_entry({"name": name, "tag": tag, **raw,
                        "sources": [{"type": s.type, **s.options} for s in source_list]})


def build_entry(text: str, *, url: str | None = None, hf: str | None = None,
                sha256: str | None = None, alternative_urls: list[str] | None = None,
                unpack: bool = False, auth: bool = False, file: str | None = None,
                revision: str | None = None, kind: str | None = None,
                engine: str | None = None, format: str | None = None,
                size: str | int = 0, min_ram: str | int = 0,
                description: str = "") -> CatalogEntry:
    """The entry `llmctl catalog add` describes, checked: one source, a URL or a Hub repo."""
    from llmctl.units import parse_size

    if bool(url) == bool(hf):
        raise UsageError("give exactly one source: --url URL or --hf ORG/REPO")
    try:
        sizes = [parse_size(str(v)) for v in (size, min_ram)]
    except ValueError as exc:
        raise UsageError(f"{exc}", hint="use bytes or a number with K, M or G") from None
    if hf:
        if alternative_urls or unpack or auth:
            raise UsageError("--alternative-url, --unzip and --auth go with --url",
                             hint="a Hub download uses HF_TOKEN by itself")
        if not file and not format:
            raise UsageError("--hf needs --file (a file of the repository) or --format",
                             hint="e.g. --file model-Q4_K_M.gguf")
        source, quant = hf_source(hf, file, revision, sha256)
        file_name = file or ""
    else:
        assert url is not None
        if file or revision:
            raise UsageError("--file and --revision go with --hf")
        source = url_source(url, sha256, alternative_urls, unpack=unpack, auth=auth)
        file_name = url_file_name(url)
        quant = quantization_in(file_name) if file_name.lower().endswith(".gguf") else None
        archive = unpack or file_name.lower().endswith(ARCHIVES)
        if not format and not archive and not model_format(file_name)[2]:
            raise UsageError(f"cannot tell what kind of model '{file_name}' is",
                             hint="pass --format (gguf, safetensors, mlx, diffusers, coreml, ggml)")
    return new_entry(text, source, file_name=file_name, quantization=quant, format=format,
                     kind=kind, engine=engine, size=sizes[0], min_ram=sizes[1],
                     description=description)
