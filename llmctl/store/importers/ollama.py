"""Models in an Ollama store, read from its folder without Ollama running.

    $OLLAMA_MODELS (default ~/.ollama/models)/
      manifests/<host>/<namespace>/<model>/<tag>   a Docker-style image manifest (JSON)
      blobs/sha256-<hex>                           every layer, named by its sha256

A manifest's layer of media type `application/vnd.ollama.image.model` is the GGUF file;
template, system prompt and parameters are small layers beside it. Blob names are the
sha256 Ollama verified when it pulled them, but a name is only a claim: the import checks
each blob's size against the manifest here, and its content against its name when it is
registered (llmctl.store.imports).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError
from llmctl.formats import GGUF
from llmctl.store.importers import FoundModel
from llmctl.store.names import sanitize_name

MEDIA = "application/vnd.ollama.image."
DEFAULT_HOST = "registry.ollama.ai"
HUB_HOSTS = ("hf.co", "huggingface.co")
SMALL = 64 * 1024  # template, system and params layers read into the manifest's source
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


def find_root(given: Path | None = None) -> Path:
    """--ollama-dir, else $OLLAMA_MODELS, else ~/.ollama/models, else where Linux's
    installer keeps the service's models."""
    if given is not None:
        root = given.expanduser()
    elif configured := os.environ.get("OLLAMA_MODELS"):
        root = Path(configured).expanduser()
    else:
        candidates = [Path.home() / ".ollama" / "models",
                      Path("/usr/share/ollama/.ollama/models")]
        root = next((c for c in candidates if (c / "manifests").is_dir()), candidates[0])
    if not (root / "manifests").is_dir():
        raise UsageError(f"no Ollama models in {root} (it has no manifests folder)",
                         hint="pass --ollama-dir DIR or set OLLAMA_MODELS")
    return root


def model_name(host: str, namespace: str, model: str, tag: str) -> tuple[str, str]:
    """llmctl's name and tag for an Ollama model: llama3.2:3b stays llama3.2:3b; a user's
    namespace is kept (jmorgan/foo); hf.co/org/repo:Q4_K_M becomes org/repo:q4_k_m, the
    name `llmctl pull hf://org/repo:Q4_K_M` gives it."""
    name = sanitize_name(model)
    if host in HUB_HOSTS or namespace != "library":
        name = f"{sanitize_name(namespace)}/{name}"
    return name, sanitize_name(tag)


def display_name(host: str, namespace: str, model: str, tag: str) -> str:
    """What `ollama list` calls the model."""
    if host == DEFAULT_HOST:
        return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


def scan(root: Path) -> list[FoundModel]:
    found = []
    manifests = root / "manifests"
    for path in sorted(manifests.glob("*/*/*/*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        parts = path.relative_to(manifests).parts
        found.append(_read(root, path, *parts))
    return found


def _blob(root: Path, digest: str) -> Path | None:
    match = _DIGEST.match(str(digest))
    if not match:
        return None
    for name in (f"sha256-{match[1]}", f"sha256:{match[1]}"):  # older Ollama used ':'
        if (root / "blobs" / name).is_file():
            return root / "blobs" / name
    return None


def _read(root: Path, path: Path, host: str, namespace: str, model: str,
          tag: str) -> FoundModel:
    name, llmctl_tag = model_name(host, namespace, model, tag)
    shown = display_name(host, namespace, model, tag)
    origin: dict[str, Any] = {"type": "ollama", "model": shown, "manifest": str(path)}

    def problem(reason: str) -> FoundModel:
        return FoundModel(name, llmctl_tag, GGUF, origin=origin, problem=reason)

    try:
        layers = json.loads(path.read_text())["layers"]
        kinds = [(layer["mediaType"].removeprefix(MEDIA), layer) for layer in layers]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return problem(f"unreadable manifest {path}")
    weights = [layer for kind, layer in kinds if kind == "model"]
    if any(kind == "adapter" for kind, _ in kinds):
        return problem("it applies a LoRA adapter to its model, which llmctl cannot do yet")
    if len(weights) != 1:
        return problem(f"it has {len(weights)} model layers; llmctl imports GGUF models of "
                       "one file")
    layer = weights[0]
    blob = _blob(root, layer.get("digest", ""))
    if blob is None:
        return problem(f"its model file {layer.get('digest')} is missing from {root / 'blobs'}")
    if blob.stat().st_size != layer.get("size"):
        return problem(f"{blob} has {blob.stat().st_size} bytes, its manifest says "
                       f"{layer.get('size')}")
    digest = "sha256:" + _DIGEST.match(layer["digest"])[1]  # type: ignore[index]
    origin.update(digest=digest, path=str(blob))
    origin.update(_small_layers(root, kinds))
    return FoundModel(name, llmctl_tag, GGUF, [blob], ["model.gguf"], [digest], origin)


def _small_layers(root: Path, kinds: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Ollama's template, system prompt and parameters, kept as the model's source: they
    are what Ollama would run it with (llmctl uses the GGUF's own chat template)."""
    extra: dict[str, Any] = {}
    for kind, layer in kinds:
        if kind == "projector":  # vision models: the image encoder, not imported (yet)
            extra["projector"] = layer.get("digest")
        if kind not in ("template", "system", "params") or layer.get("size", SMALL) > SMALL:
            continue
        blob = _blob(root, layer.get("digest", ""))
        if blob is None:
            continue
        try:
            text = blob.read_text(encoding="utf-8")
            extra[kind] = json.loads(text) if kind == "params" else text
        except (OSError, ValueError):  # unreadable or not JSON: it is only a note
            continue
    return extra
