"""Models already in the Hugging Face cache, read from its folder without huggingface_hub
(importing it costs more than the whole scan; the layout is documented and stable):

    $HF_HUB_CACHE (default $HF_HOME/hub, ~/.cache/huggingface/hub)/
      models--<org>--<repo>/
        blobs/<sha256 or git sha1>      each file's content, named by its hash
        refs/main                       the commit `main` pointed to when downloaded
        snapshots/<commit>/<path>       relative links into blobs/

Large (LFS) files are named by their sha256: the import passes those names on as claims,
which registering checks against the content. Small files kept in git are named by a git
sha1 (configs and tokenizers, a few MB at most).

One repository can give several models: one per GGUF file (tagged by its quantization,
as `llmctl pull hf://org/repo:Q4_K_M` would tag it), one safetensors model (config.json
and *.safetensors: MLX reads these), one diffusers pipeline (model_index.json).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from llmctl.errors import UsageError
from llmctl.formats import GGUF, detect_format, diffusers
from llmctl.formats.hf import TEXT_SUFFIXES
from llmctl.store.catalog import quantization_in
from llmctl.store.importers import FoundModel
from llmctl.store.names import DEFAULT_TAG, sanitize_name

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHARD = re.compile(r"-\d{5}-of-(\d{5})\.gguf$", re.IGNORECASE)


def find_root(given: Path | None = None) -> Path:
    """--cache-dir, else where huggingface_hub puts its cache, by the same variables."""
    if given is not None:
        root = given.expanduser()
    elif configured := os.environ.get("HF_HUB_CACHE") or os.environ.get(
            "HUGGINGFACE_HUB_CACHE"):
        root = Path(configured).expanduser()
    elif home := os.environ.get("HF_HOME"):
        root = Path(home).expanduser() / "hub"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(xdg).expanduser() / "huggingface" / "hub"
    if not root.is_dir():
        raise UsageError(f"no Hugging Face cache at {root}",
                         hint="pass --cache-dir DIR or set HF_HUB_CACHE")
    return root


def repo_id(folder_name: str) -> str | None:
    """"models--org--repo" -> "org/repo" (None for datasets and spaces)."""
    if not folder_name.startswith("models--"):
        return None
    parts = folder_name.removeprefix("models--").split("--")
    return "/".join([parts[0], "--".join(parts[1:])] if len(parts) > 1 else parts)


def model_name(repo: str) -> str:
    """The name `llmctl pull hf://org/repo` stores a model under (see sources/hf.py)."""
    return "/".join(sanitize_name(part) for part in repo.split("/"))


def scan(root: Path) -> list[FoundModel]:
    found: list[FoundModel] = []
    for folder in sorted(root.iterdir()):
        repo = repo_id(folder.name)
        if repo is None or not folder.is_dir():
            continue
        snapshot, revision = _snapshot(folder)
        origin = {"type": "hf-cache", "repo": repo, "revision": revision,
                  "cache": str(root)}
        if snapshot is None:
            found.append(FoundModel(model_name(repo), DEFAULT_TAG, None, origin=origin,
                                    problem="no downloaded snapshot"))
            continue
        files = _files(folder, snapshot)
        models = _ggufs(repo, files, origin) + _folder_models(repo, files, origin)
        if not models:
            models = [FoundModel(model_name(repo), DEFAULT_TAG, None, origin=origin,
                                 problem="no GGUF, safetensors or diffusers model in its "
                                         "cached files")]
        found.extend(models)
    return found


def _snapshot(folder: Path) -> tuple[Path | None, str | None]:
    """The snapshot `main` points to; without a ref (a download by commit), the newest."""
    snapshots = folder / "snapshots"
    try:
        commit = (folder / "refs" / "main").read_text().strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit, commit
    except OSError:
        pass
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()),
                        key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return (candidates[-1], candidates[-1].name) if candidates else (None, None)


# A file of a snapshot: its name in the repository, the blob holding it, its sha256 if
# the blob's name is one.
CachedFile = tuple[str, Path, str | None]


def _files(folder: Path, snapshot: Path) -> dict[str, CachedFile]:
    files: dict[str, CachedFile] = {}
    blobs = (folder / "blobs").resolve()
    for dirpath, dirnames, filenames in os.walk(snapshot):
        dirnames.sort()
        for filename in sorted(filenames):
            link = Path(dirpath, filename)
            target = link.resolve()
            if not target.is_file():  # a dangling link: the blob was deleted
                continue
            name = link.relative_to(snapshot).as_posix()
            from_blobs = target.parent == blobs and _SHA256.match(target.name)
            files[name] = (name, target, f"sha256:{target.name}" if from_blobs else None)
    return files


def _ggufs(repo: str, files: dict[str, CachedFile], origin: dict) -> list[FoundModel]:
    found: list[FoundModel] = []
    taken: set[str] = set()
    for name, path, digest in files.values():
        pure = PurePosixPath(name)
        if pure.suffix.lower() != ".gguf" or pure.name.lower().startswith("mmproj"):
            continue  # mmproj: a vision model's image encoder, not a model of its own
        quant = quantization_in(pure.name)
        tag = sanitize_name(quant) if quant else sanitize_name(pure.stem)
        if tag in taken:  # two files of one quantization (folders per variant)
            tag = sanitize_name(pure.stem)
        taken.add(tag)
        source = dict(origin, file=name, quantization=quant)
        if shard := _SHARD.search(pure.name):
            found.append(FoundModel(model_name(repo), tag, GGUF, origin=source,
                                    problem=f"{name} is a GGUF split in "
                                            f"{int(shard[1])} files; llmctl stores "
                                            "one-file GGUFs"))
            continue
        found.append(FoundModel(model_name(repo), tag, GGUF, [path], ["model.gguf"],
                                [digest], source))
    return found


def _folder_models(repo: str, files: dict[str, CachedFile], origin: dict
                   ) -> list[FoundModel]:
    """A diffusers pipeline, or a safetensors text model, made of the repository's files."""
    top = {n for n in files if "/" not in n}
    chosen: list[CachedFile]
    if "model_index.json" in top:
        folders = diffusers.read_components(files["model_index.json"][1])
        names = diffusers.without_other_weights(
            [n for n in files if n.split("/")[0] in folders])
        chosen = [files["model_index.json"]] + [files[n] for n in names]
    elif "config.json" in top and any(n.endswith(".safetensors") for n in top):
        chosen = [files[n] for n in sorted(top) if PurePosixPath(n).suffix in TEXT_SUFFIXES]
    else:
        return []
    names = [name for name, _, _ in chosen]
    fmt = detect_format(names, files["config.json"][1] if "config.json" in files else None)
    if fmt is None:
        return []
    return [FoundModel(model_name(repo), DEFAULT_TAG, fmt, [p for _, p, _ in chosen], names,
                       [d for _, _, d in chosen], dict(origin))]
