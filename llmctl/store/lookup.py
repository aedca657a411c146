"""Finding stored models: by name and tag (a bare name takes the catalog's default tag,
else "latest", else its only tag), by a prefix of their ID, and the names close to one
that is not there ("did you mean")."""

from __future__ import annotations

import difflib
import re

from llmctl.errors import AmbiguousReference, ModelNotFound, UsageError
from llmctl.store import manifest as manifests
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout
from llmctl.store.manifest import Manifest
from llmctl.store.names import DEFAULT_TAG, NameRef, parse_reference

# A prefix of a stored model's ID: 6 hex digits at least (fewer match too much).
_ID_PREFIX = re.compile(r"^[0-9a-f]{6,64}$")


def find_stored(layout: StoreLayout, catalog: Catalog | None, ref: NameRef) -> Manifest | None:
    if ref.tag:
        return manifests.load(layout, ref.name, ref.tag)
    candidates = []
    if catalog is not None and (tag := catalog.default_tag(ref.name)):
        candidates.append(tag)
    candidates.append(DEFAULT_TAG)
    for tag in candidates:
        if found := manifests.load(layout, ref.name, tag):
            return found
    tags = [m for m in manifests.iter_manifests(layout) if m.name == ref.name]
    return tags[0] if len(tags) == 1 else None


def find_by_digest(layout: StoreLayout, prefix: str) -> Manifest | None:
    prefix = prefix.removeprefix("sha256:").lower()
    if not _ID_PREFIX.match(prefix):
        return None
    matches = [m for m in manifests.iter_manifests(layout)
               if m.digest.removeprefix("sha256:").startswith(prefix)]
    if len({m.digest for m in matches}) > 1:
        raise AmbiguousReference(prefix, [m.reference for m in matches])
    return matches[0] if matches else None


def suggestions(text: str, layout: StoreLayout, catalog: Catalog | None) -> list[str]:
    """Known models close to `text`: names for a bare name, name:tag for a full one."""
    stored = list(manifests.iter_manifests(layout))
    with_tag = ":" in text
    if with_tag:
        known = {m.reference for m in stored}
        known |= set(catalog.references()) if catalog is not None else set()
    else:
        known = {m.name for m in stored}
        known |= set(catalog.names()) if catalog is not None else set()
    close = difflib.get_close_matches(text.lower(), sorted(known), n=3, cutoff=0.6)
    # A name that starts another ("llama" -> "llama3.2") is a good guess too.
    close += sorted(k for k in known if k.startswith(text.lower()) and k not in close)
    return close[:3]


def resolve_stored(
    layout: StoreLayout, catalog: Catalog | None, text: str
) -> Manifest:
    """The stored model `text` names, by name[:tag] or digest prefix."""
    ref = parse_reference(text)
    if not isinstance(ref, NameRef):
        raise UsageError(f"'{text}' is not the name of a stored model",
                         hint="use a name from `llmctl ls`")
    if found := find_stored(layout, catalog, ref):
        return found
    if ref.tag is None and (found := find_by_digest(layout, ref.name)):
        return found
    in_catalog = catalog is not None and catalog.find(ref.name, ref.tag) is not None
    raise ModelNotFound(text, [] if in_catalog else suggestions(text, layout, catalog),
                        in_catalog=in_catalog)


def relatives(layout: StoreLayout, model: Manifest) -> list[Manifest]:
    """The stored models of the same base model in other formats: those `llmctl convert`
    made from `model`, the one it was made from, and so on both ways (what `bench
    --engine` compares). `model` itself is not in the list."""
    stored = list(manifests.iter_manifests(layout))
    family = {model.digest}
    grew = True
    while grew:
        grew = False
        for other in stored:
            parent = other.source.get("from_digest") if other.source.get("type") == "convert" \
                else None
            if other.digest in family and parent and parent not in family:
                family.add(parent)
                grew = True
            elif parent in family and other.digest not in family:
                family.add(other.digest)
                grew = True
    return [m for m in stored if m.digest in family and m.digest != model.digest]
