"""Model conversions into the format another engine runs. One module per target, imported
only when that conversion runs (they pull in torch, transformers, mlx):

    mlx.py   GGUF models and Hugging Face safetensors checkpoints -> MLX (through mlx-lm)

Each conversion works in a folder of its own under $LLMCTL_HOME/tmp and registers its
result in the store only when it is complete, so an interrupted conversion leaves nothing
behind. `work_folder` gives such a folder and cleans up after conversions that were killed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from llmctl.store.layout import StoreLayout

if TYPE_CHECKING:
    from llmctl.store.resolve import Runnable

PREFIX = "convert-"


def result_name(source: Runnable, suffix: str, name: str | None) -> tuple[str, str]:
    """(name, tag) a conversion's result is stored under: `--name` when given, else the
    source's name with its tag + `suffix` (smollm2:135m -> smollm2:135m-mlx-q4; a model
    run from a path: its name, `suffix` as the tag)."""
    from llmctl.store.names import DEFAULT_TAG, sanitize_name
    from llmctl.store.register import resolve_name

    if source.manifest is None:
        return resolve_name(name, sanitize_name(source.name), suffix)
    tag = source.manifest.tag
    return resolve_name(name, source.manifest.name,
                        suffix if tag == DEFAULT_TAG else f"{tag}-{suffix}")


@contextlib.contextmanager
def work_folder(layout: StoreLayout) -> Iterator[Path]:
    """A fresh folder under tmp/ for one conversion, deleted when the conversion ends,
    however it ends. Held under a lock named after it while in use, so that the next
    conversion can tell the folders of killed ones (kill -9, a power cut) from folders of
    conversions still running, and delete them."""
    layout.ensure()
    _sweep(layout)
    folder = Path(tempfile.mkdtemp(dir=layout.tmp, prefix=PREFIX))
    try:
        with layout.work_lock(folder.name):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (layout.tmp / "locks" / f"{folder.name}.lock").unlink()


def _sweep(layout: StoreLayout) -> None:
    for stale in layout.tmp.glob(f"{PREFIX}*"):
        try:
            with layout.work_lock(stale.name, blocking=False):
                shutil.rmtree(stale, ignore_errors=True)
        except BlockingIOError:
            continue  # another conversion is using it
