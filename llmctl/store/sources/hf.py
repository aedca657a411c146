"""Hugging Face repositories, through huggingface_hub and its cache.

huggingface_hub does the downloading: it knows HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE,
HF_HOME, revisions, resumable transfers and its cache. This module decides *which* files
of a repository make the model, routes huggingface_hub's progress into llmctl's, and turns
its exceptions into one-line reasons. Files stay in the Hugging Face cache; the store links
them (LocalFiles.owned is False), so nothing is kept twice.

huggingface_hub is imported inside the functions: `llmctl --help`, `ls` and completion
must not pay for it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from llmctl.errors import SourceUnavailable, UsageError
from llmctl.formats import coreml, diffusers, onnx
from llmctl.formats import hf as hf_folder
from llmctl.store.catalog import quantization_in
from llmctl.store.names import HubRef, sanitize_name
from llmctl.store.sources import FileProgress, LocalFiles, PullOptions, SourceMissing

if TYPE_CHECKING:
    from llmctl.store.layout import StoreLayout

DEFAULT_REVISION = "main"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def model_name(ref: HubRef) -> tuple[str, str]:
    """The name and tag a pull of `ref` is stored under: hf://Org/Repo:Q4_K_M@rev becomes
    org/repo:q4_k_m-rev (a revision other than main is part of the tag, so that two
    revisions of a repository can be kept side by side)."""
    org, repo = ref.repo.split("/")
    tag = sanitize_name(ref.selector.removesuffix(".gguf")) if ref.selector else "latest"
    if ref.revision and ref.revision != "main":
        tag = f"{tag}-{sanitize_name(ref.revision)[:12]}"
    return f"{sanitize_name(org)}/{sanitize_name(repo)}", tag


def fetch(ref: HubRef, *, on_progress: FileProgress) -> LocalFiles:
    """The files `ref` names, in the Hugging Face cache (downloaded first if missing).

    A direct hf:// pull has no other source to fall back on, so a source that cannot
    provide the model is reported as SourceUnavailable (exit 3), naming the reason."""
    try:
        return _fetch(ref, on_progress=on_progress)
    except SourceMissing as exc:
        raise SourceUnavailable(str(ref), [str(exc)]) from None


def fetch_catalog_source(options: dict[str, Any], quantization: str | None, *,
                         on_progress: FileProgress) -> LocalFiles:
    """A catalog source of type "hf": `repo`, optional `revision` (a commit, usually),
    `files` = {QUANT: file name} or `allow_patterns` for a multi-file model, or neither
    (then the quantization picks a GGUF file as `hf://repo:QUANT` would)."""
    repo = options["repo"]
    revision = options.get("revision")
    try:
        listing = _list_repo(repo, revision)
        if files := options.get("files"):
            chosen = [_pick_catalog_file(files, quantization)]
        elif patterns := options.get("allow_patterns"):
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            chosen = [f for f in listing.files
                      if any(fnmatch.fnmatchcase(f, p) for p in patterns)]
            if not chosen:
                raise SourceMissing(f"no file matches {', '.join(patterns)}")
        else:
            chosen = _choose(HubRef(repo, quantization, revision), listing)
        return _download(repo, listing, chosen, on_progress=on_progress)
    except (SourceMissing, UsageError) as exc:
        # The entry's fault, not the user's: the next source may do.
        raise SourceMissing(f"hf://{repo}: {exc}") from None


@contextlib.contextmanager
def catalog_files(layout: StoreLayout, options: dict[str, Any], quantization: str | None,
                  pull_options: PullOptions, *, on_progress: FileProgress, model: str
                  ) -> Iterator[LocalFiles]:
    """A catalog source of type "hf" (the sources contract); huggingface_hub downloads."""
    yield fetch_catalog_source(options, quantization, on_progress=on_progress)


def _pick_catalog_file(files: dict[str, str], quantization: str | None) -> str:
    if quantization is None:
        if len(files) == 1:
            return next(iter(files.values()))
        raise SourceMissing(f"several files ({', '.join(files)}) and no quantization asked")
    for quant, name in files.items():
        if quant.casefold() == quantization.casefold():
            return name
    raise SourceMissing(f"no {quantization} file listed")


def _fetch(ref: HubRef, *, on_progress: FileProgress) -> LocalFiles:
    listing = _list_repo(ref.repo, ref.revision)
    return _download(ref.repo, listing, _choose(ref, listing), on_progress=on_progress)


# --- what the repository holds ----------------------------------------------------------


@dataclass(frozen=True)
class _Listing:
    """The files of one revision of a repository, as the Hub lists them or, offline, as
    the Hugging Face cache holds them."""

    revision: str | None  # as asked (None: the default branch)
    files: list[str]
    # Why the Hub could not be asked (offline mode, or unreachable), when the listing
    # comes from the cache: downloads then use the cache only, rather than retry the
    # network for every file.
    offline: str | None = None


def _list_repo(repo: str, revision: str | None) -> _Listing:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    with _hub_errors(repo, revision):
        try:
            # Always with a revision: some servers (olah) serve only the /revision/ route.
            info = HfApi().model_info(repo, revision=revision or DEFAULT_REVISION)
        except OfflineModeIsEnabled:
            why = "offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to download it"
        except _transport_errors() as exc:
            why = f"{_endpoint()} cannot be reached ({_redact(_first_line(exc))})"
        else:
            return _Listing(revision, [s.rfilename for s in info.siblings or []])
    cached = _cached_listing(repo, revision, why)
    if cached is None:
        subject = f"revision {revision} is not" if revision else "not"
        raise SourceMissing(f"{subject} in the Hugging Face cache ({_cache_dir()}) and {why}")
    return cached


def _cached_listing(repo: str, revision: str | None, offline: str) -> _Listing | None:
    """The files of `revision` the cache holds: refs/<branch> names the commit, and
    snapshots/<commit>/ holds links to the blobs. Only what was downloaded before: so
    offline, `hf://org/repo` picks the one GGUF file pulled from a repo of several."""
    from huggingface_hub.file_download import repo_folder_name

    folder = _cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")
    asked = revision or DEFAULT_REVISION
    commit = asked
    if not _COMMIT.match(asked):
        try:
            commit = (folder / "refs" / asked).read_text().strip()
        except OSError:
            return None
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                   if p.is_file())
    return _Listing(revision, files, offline)


# --- which files make the model ---------------------------------------------------------


def _choices(ggufs: list[str]) -> list[str]:
    """What a user can put after the colon: quantizations where they tell the files
    apart, file names otherwise."""
    labels = [quantization_in(f) for f in ggufs]
    if None in labels or len(set(labels)) != len(labels):
        return sorted(ggufs)
    return sorted(str(label) for label in labels)


def _choose(ref: HubRef, listing: _Listing) -> list[str]:
    try:
        return _choose_files(ref, listing)
    except UsageError as exc:
        if not (listing.offline and ref.selector):
            raise
        # The cache lists only what was downloaded before: the file may well exist.
        raise SourceMissing(f"{exc} (only the Hugging Face cache was searched: "
                            f"{listing.offline})") from None


def _choose_files(ref: HubRef, listing: _Listing) -> list[str]:
    files = listing.files
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    where = str(HubRef(ref.repo, None, ref.revision))
    selector = ref.selector
    if selector:
        if found := _by_name(files, selector):
            # A folder holding several builds ("cpu_and_mobile") still needs a choice.
            return _one_build(ref, found, str(HubRef(ref.repo, selector, ref.revision))
                              ) or found
        if ggufs:
            return [_by_quantization(ref, ggufs, selector, where)]
        raise UsageError(f"{where} has no file or folder '{selector}'"
                         + _listed("; choices: ", _top_level(files)),
                         hint=f"name one: llmctl pull {HubRef(ref.repo, 'PATH', ref.revision)}")
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        choices = _choices(ggufs)
        raise UsageError(f"{where} has several GGUF files; choices: {', '.join(choices)}",
                         hint=f"pick one, e.g. llmctl pull "
                              f"{HubRef(ref.repo, choices[0], ref.revision)}")
    return _model_files(ref, listing)


def _by_name(files: list[str], selector: str) -> list[str]:
    """Files an exact path, a folder, a base name or a glob pattern names."""
    selector = selector.strip("/")
    if selector in files:
        return [selector]
    if inside := [f for f in files if f.startswith(selector + "/")]:
        return inside
    if same := [f for f in files if PurePosixPath(f).name == selector]:
        return same if len(same) == 1 else []
    if glob.has_magic(selector):
        return [f for f in files if fnmatch.fnmatchcase(f, selector)]
    return [f for f in files if f.casefold() == selector.casefold()]


def _by_quantization(ref: HubRef, ggufs: list[str], selector: str, where: str) -> str:
    wanted = selector.removesuffix(".gguf").casefold()
    # An exact label first, so that Q4_K picks "x.Q4_K.gguf" even beside "x.Q4_K_M.gguf";
    # then the label anywhere in the name between delimiters ("UD-Q4_K_XL").
    exact = [f for f in ggufs if (quantization_in(f) or "").casefold() == wanted]
    around = re.compile(rf"(?<![a-z0-9]){re.escape(wanted)}(?![a-z0-9])", re.I)
    matches = exact or [f for f in ggufs if around.search(PurePosixPath(f).name)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        choices = _choices(ggufs)
        raise UsageError(f"{where} has no {selector} file; choices: {', '.join(choices)}",
                         hint=f"pick one, e.g. llmctl pull "
                              f"{HubRef(ref.repo, choices[0], ref.revision)}")
    raise UsageError(f"{selector} matches several files in {where}: {', '.join(matches)}",
                     hint=f"name the file, e.g. llmctl pull "
                          f"{HubRef(ref.repo, matches[0], ref.revision)}")


def _top_level(files: list[str]) -> list[str]:
    return sorted({f.split("/")[0] + ("/" if "/" in f else "") for f in files
                   if not f.startswith(".")})


def _listed(prefix: str, items: list[str], limit: int = 10) -> str:
    if not items:
        return ""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return prefix + ", ".join(items[:limit]) + more


def _model_files(ref: HubRef, listing: _Listing) -> list[str]:
    """The files a repository without GGUF files needs, by what it is: a diffusers
    pipeline, one build of a Core ML or ONNX Runtime GenAI model, a Whisper conversion
    (CTranslate2, mlx-whisper), or a safetensors checkpoint (MLX or Transformers)."""
    files = listing.files
    where = str(HubRef(ref.repo, None, ref.revision))
    if "model_index.json" in files:
        return _diffusers_files(ref.repo, listing)
    if (build := _one_build(ref, files, where)) is not None:
        return build
    top = [f for f in files if "/" not in f]
    if (speech := hf_folder.speech_files(top)) is not None:
        return speech
    if "config.json" in top and any(f.endswith(".safetensors") for f in top):
        return hf_folder.checkpoint_files(top)
    raise UsageError(f"cannot tell which files of {where} make a model"
                     + _listed(" (", _top_level(files)) + (")" if files else ""),
                     hint=f"name a file or folder: llmctl pull "
                          f"{HubRef(ref.repo, 'PATH', ref.revision)}")


def _is_repo_furniture(name: str) -> bool:
    name = PurePosixPath(name).name
    return name in (".gitattributes", "LICENSE", "LICENSE.txt") or \
        name.lower().endswith((".zip", ".png", ".jpg", ".md"))


# --- builds published side by side -----------------------------------------------------


@dataclass(frozen=True)
class _Builds:
    """A format whose repositories publish several builds of one model side by side, each
    in a folder of its own (Apple's `split_einsum/compiled`, Microsoft's
    `cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4`): a pull takes one."""

    what: str  # what the error calls several of them
    roots: Callable[[list[str]], list[str]]  # the folders holding a build, "" for the top
    # Whether a build is its folder's whole tree (a Core ML model is a folder itself) or
    # only the files directly in it (an ONNX build is flat; its parent may hold others).
    nested: bool

    def files(self, names: list[str], root: str) -> list[str]:
        prefix = f"{root}/" if root else ""
        return [n for n in names if n.startswith(prefix) and not _is_repo_furniture(n)
                and (self.nested or "/" not in n[len(prefix):])]


# Asked in order, after diffusers pipelines and before plain checkpoints.
_BUILDS = (
    _Builds("Core ML variants", coreml.model_roots, nested=True),
    _Builds("ONNX Runtime GenAI builds", onnx.build_roots, nested=False),
)


def _one_build(ref: HubRef, files: list[str], where: str) -> list[str] | None:
    """The files of the one build `files` hold; None when they hold no build of a format
    in _BUILDS; a UsageError naming the folders to choose from when they hold several."""
    for kind in _BUILDS:
        if not (roots := kind.roots(files)):
            continue
        if len(roots) == 1:
            return kind.files(files, roots[0])
        raise UsageError(f"{where} holds several {kind.what}; choices: "
                         f"{', '.join(r or '.' for r in roots)}",
                         hint=f"pick one, e.g. llmctl pull "
                              f"{HubRef(ref.repo, roots[0] or '*', ref.revision)}")
    return None


def _diffusers_files(repo: str, listing: _Listing) -> list[str]:
    """model_index.json names the pipeline's components; each has a folder of its own."""
    index = _download(repo, listing, ["model_index.json"], on_progress=lambda *_: None)
    folders = diffusers.read_components(index.paths[0]) or {
        f.split("/")[0] for f in listing.files if "/" in f}
    return diffusers.pipeline_files(listing.files, folders)


# --- downloading ------------------------------------------------------------------------


def _download(repo: str, listing: _Listing, names: list[str], *,
              on_progress: FileProgress) -> LocalFiles:
    for name in names:
        if name in listing.files:
            continue
        if listing.offline:
            raise SourceMissing(f"{name} is not in the Hugging Face cache ({_cache_dir()}) "
                                f"and {listing.offline}")
        raise SourceMissing(f"no file {name} in {HubRef(repo, None, listing.revision)}")
    if len(names) == 1:
        return _download_one(repo, listing, names[0], on_progress=on_progress)
    return _download_many(repo, listing, names, on_progress=on_progress)


def _download_one(repo: str, listing: _Listing, name: str, *,
                  on_progress: FileProgress) -> LocalFiles:
    from huggingface_hub import hf_hub_download

    _no_hub_bars()
    with _hub_errors(repo, listing.revision, name):
        # The revision as asked (a branch, tag or commit): huggingface_hub then records
        # refs/<branch> in its cache, which is what an offline pull looks up later.
        path = Path(hf_hub_download(
            repo, name, revision=listing.revision, local_files_only=bool(listing.offline),
            tqdm_class=_progress_class(name, on_progress)))
    blob = path.resolve()
    size = blob.stat().st_size
    # Reported also when nothing was downloaded, so that the user sees which file was used.
    on_progress(name, size, size)
    commit = path.parents[len(PurePosixPath(name).parts) - 1].name
    return LocalFiles([blob], names=[name],
                      origin={"type": "hf", "repo": repo, "revision": commit, "file": name})


def _download_many(repo: str, listing: _Listing, names: list[str], *,
                   on_progress: FileProgress) -> LocalFiles:
    from huggingface_hub import snapshot_download

    _no_hub_bars()
    label = f"{repo} ({len(names)} files)"
    with _hub_errors(repo, listing.revision):
        folder = Path(snapshot_download(
            repo, revision=listing.revision, allow_patterns=[glob.escape(n) for n in names],
            local_files_only=bool(listing.offline),
            tqdm_class=_progress_class(label, on_progress)))
    paths = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise SourceMissing(f"{name} is missing from the downloaded snapshot {folder}")
        paths.append(path.resolve())
    total = sum(p.stat().st_size for p in paths)
    on_progress(label, total, total)
    return LocalFiles(paths, names=list(names),
                      origin={"type": "hf", "repo": repo, "revision": folder.name,
                              "files": list(names)})


def _progress_class(label: str, on_progress: FileProgress) -> type:
    """A tqdm class for huggingface_hub's `tqdm_class=`: it never draws (llmctl's own
    display does) and passes byte counts on to `on_progress` under `label`."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class ProgressBridge(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            name = kwargs.pop("name", None) or ""
            # Only bars counting the bytes of files: not snapshot_download's count of
            # files, nor the ".transfer" bars (network bytes, whose total is a guess).
            self._forward = kwargs.get("unit") == "B" and not name.endswith(".transfer")
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            # A disabled tqdm counts nothing itself; snapshot_download's threads share
            # one bar.
            with self.get_lock():
                self.n += n or 0
                done, total = int(self.n), int(self.total or 0)
            if self._forward and total:
                on_progress(label, done, total)
            return None

    return ProgressBridge


def _no_hub_bars() -> None:
    """No bar of huggingface_hub's own on the terminal, even one not made through
    `tqdm_class` (the user's HF_HUB_DISABLE_PROGRESS_BARS=0 still wins)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    if constants.HF_HUB_DISABLE_PROGRESS_BARS is not False and not are_progress_bars_disabled():
        disable_progress_bars()


# --- errors -----------------------------------------------------------------------------


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures: huggingface_hub 2.x speaks httpx2; older releases httpx."""
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(__import__(module).TransportError)
    return tuple(found)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _redact(text: str) -> str:
    """Never print a token, even one a server echoed back in an error."""
    from huggingface_hub import get_token

    for token in {get_token(), os.environ.get("HF_TOKEN"),
                  os.environ.get("HUGGING_FACE_HUB_TOKEN")}:
        if token:
            text = text.replace(token, "***")
    return text


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str | None, file: str | None = None) -> Iterator[None]:
    """huggingface_hub's failures as SourceMissing with a one-line reason. Unknown
    exceptions pass through: they are bugs to see, not to hide."""
    try:
        yield
    except SourceMissing:
        raise
    except Exception as exc:
        reason = _reason(exc, revision, file)
        if reason is None:
            raise
        raise SourceMissing(_redact(reason)) from None


def _reason(exc: BaseException, revision: str | None, file: str | None) -> str | None:
    """One line that says what failed and what to do next; None for an unknown failure."""
    from huggingface_hub import constants, errors

    endpoint = constants.ENDPOINT
    what = f"{file} (revision {revision or DEFAULT_REVISION})" if file else (
        f"revision {revision}" if revision else "the repository")
    unreachable = (
        "offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to download it"
        if constants.HF_HUB_OFFLINE else
        f"{endpoint} could not be reached; check the network or HF_ENDPOINT")
    not_cached = f"{what} is not in the Hugging Face cache ({_cache_dir()}) and {unreachable}"
    # Some servers (olah, for one) answer "repository not found" for a revision or a
    # file they do not have.
    missing = f"repository or revision {revision}" if revision else "repository"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    # Ordered: the first matching row wins, so subclasses come before their bases.
    table: list[tuple[type[BaseException] | tuple[type[BaseException], ...], str]] = [
        (errors.GatedRepoError,
         "the repository is gated: accept its conditions on the Hub, then set HF_TOKEN"),
        (errors.DisabledRepoError, "the repository is disabled on the Hub"),
        (errors.RepositoryNotFoundError,
         f"{missing} not found on {endpoint}; check the name (or set HF_TOKEN if it is "
         "private)"),
        (errors.RevisionNotFoundError,
         f"no revision '{revision}' on {endpoint}; check the branch, tag or commit"),
        (errors.IncompleteSnapshotError,
         f"the Hugging Face cache holds only part of {what} and {unreachable}"),
        (errors.LocalEntryNotFoundError, not_cached),
        (errors.EntryNotFoundError, f"no file {what} on {endpoint}"),
        (errors.OfflineModeIsEnabled, not_cached),
        (errors.HfHubHTTPError,
         f"access denied (HTTP {status}); set HF_TOKEN to a token that may read it"
         if status in (401, 403) else f"{endpoint} answered HTTP {status}; try again later"),
        (_transport_errors(),
         f"{endpoint} cannot be reached ({_first_line(exc)}); check the network or "
         "HF_ENDPOINT"),
        # A server that is no Hub (a login page, a proxy's error page) answers HTML where
        # the Hub answers JSON (issue 10).
        (json.JSONDecodeError,
         f"{endpoint} did not answer as a Hugging Face Hub does (not JSON; a web page?); "
         "check HF_ENDPOINT, or unset it to use huggingface.co"),
    ]
    for kinds, message in table:
        if isinstance(exc, kinds):
            return message
    # A download that ended short ("Consistency check failed") is a bare OSError; OS
    # errors proper (disk full) have an errno and are left to llmctl's error table.
    if type(exc) is OSError and exc.errno is None:
        return f"downloading {what} failed ({_first_line(exc)}); pull again to resume"
    return None
