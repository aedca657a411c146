"""Model conversions into the format another engine runs: one frame (`convert`) and one
module per target, imported only when a conversion to it runs (they pull in torch,
transformers, mlx, coremltools):

    mlx.py          text models, GGUF or Hugging Face safetensors -> MLX (through mlx-lm)
    onnx.py         text models, GGUF or Hugging Face safetensors -> ONNX Runtime GenAI
    executorch.py   text models, GGUF or Hugging Face safetensors -> an ExecuTorch program
    coreml/         Stable Diffusion pipelines (diffusers) -> Core ML, in Apple's layout;
                    text models go on to coreml_lm.py (a stateful Core ML language model)

The frame does what every conversion does: check the options, find the source (pulled
first when it is a catalog model), name the result, refuse one already stored, record
where the result came from and register it. A target (`Target`) supplies what differs:
which sources it takes and the work itself. The work happens in a folder of its own under
$LLMCTL_HOME/tmp and the result is registered only when it is complete, so an interrupted
conversion leaves nothing in the store. `work_folder` gives such a folder and cleans up
after conversions that were killed.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from llmctl.errors import UsageError
from llmctl.formats import ModelFormat
from llmctl.store import manifest as manifests
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout
from llmctl.store.manifest import Manifest
from llmctl.store.names import DEFAULT_TAG, Reference, parse_reference, sanitize_name
from llmctl.store.register import OnEvent, PullEvent, no_events, register, resolve_name
from llmctl.store.resolve import Runnable, runnable
from llmctl.store.sources import LocalFiles

# `--to` -> the module that converts to it, imported only when a conversion runs; each
# module has a TARGET.
TARGETS = {"mlx": "llmctl.convert.mlx", "onnx": "llmctl.convert.onnx",
           "executorch": "llmctl.convert.executorch", "coreml": "llmctl.convert.coreml"}
PREFIX = "convert-"


class Options(Protocol):
    """A target's options, as the frame uses them."""

    def check(self) -> None:
        """Raise UsageError for options the target cannot honour."""

    @property
    def suffix(self) -> str:
        """The tag suffix of the result: mlx-q4, coreml-split_einsum_v2."""


@dataclass(frozen=True, kw_only=True)
class Conversion:
    """A conversion, stored."""

    manifest: Manifest
    source: str  # the model converted
    seconds: float
    bits_per_weight: float | None = None  # as mlx-lm reports it, for quantized MLX results
    peak_memory: int | None = None  # bytes, where the target measures it
    notes: list[str] = field(default_factory=list)  # facts for stderr
    warnings: list[str] = field(default_factory=list)  # what may not work as wanted


@dataclass(frozen=True)
class Request:
    """One conversion, as the frame hands it to its target's work."""

    source: Runnable
    checked: Any  # what the target's check_source returned
    options: Any  # the target's Options
    layout: StoreLayout
    reference: str  # name:tag the result is stored under
    force: bool
    step: Callable[..., None]  # step(status, done=0, total=0): a progress event


@dataclass(frozen=True)
class Product:
    """What a target's work leaves for the frame to store."""

    folder: Path  # the result's files, stored under their paths relative to it
    origin: dict[str, Any]  # the target's part of the manifest's record of the source
    facts: dict[str, Any] = field(default_factory=dict)  # the fields of its Conversion


class Target:
    """What a conversion target supplies to the frame: a subclass, its module's TARGET,
    and a row in TARGETS."""

    to: ClassVar[str]  # --to, recorded in the origin
    model_format: ClassVar[ModelFormat]  # what the result is stored as
    options: ClassVar[type]  # its Options, with the defaults
    use: ClassVar[str]  # how to use a result, for the already-stored hint: "... {reference}"
    result: ClassVar[type[Conversion]] = Conversion
    # Whether the store's "verifying <file>" events reach on_event: one per file of every
    # Core ML package would bury the progress.
    file_events: ClassVar[bool] = True
    # The command line's options it takes, as `options_from_cli` reads them.
    flags: ClassVar[tuple[str, ...]] = ()

    def options_from_cli(self, given: dict[str, Any]) -> Any:
        """Its Options from the command line's: `given` holds the flags given (of
        `flags`), each with its value ("" for a bare -q)."""
        raise NotImplementedError

    def for_source(self, source: Runnable, options: Any) -> tuple[Target, Any]:
        """The target (and its options) that converts `source`: this one, unless the
        target converts several kinds of model, each its own way (Core ML)."""
        return self, options

    def refuse_before_pulling(self, ref: Reference, layout: StoreLayout,
                              catalog: Catalog) -> None:
        """Say no before a catalog model is pulled, when the catalog already tells."""

    def check_source(self, source: Runnable, options: Any) -> Any:
        """Raise UsageError for a source the target does not convert; return what its
        work needs to know about the source."""
        raise NotImplementedError

    def work(self, request: Request) -> AbstractContextManager[Product]:
        """The conversion itself: the finished files, held (locked, not cleaned up) until
        the frame has stored them."""
        raise NotImplementedError


def target(to: str) -> Target:
    if to not in TARGETS:
        raise UsageError(f"--to {to} is not supported", hint=f"use {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[to]).TARGET


def options_from_cli(to: str, given: dict[str, Any]) -> Options:
    """`to`'s options from the command line's: `given` maps each flag to its value, None
    when not given. A flag another target takes is refused, naming that target."""
    chosen = target(to)
    given = {flag: value for flag, value in given.items() if value is not None}
    if foreign := [flag for flag in given if flag not in chosen.flags]:
        owners = [name for name in TARGETS if foreign[0] in target(name).flags]
        raise UsageError(f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} for "
                         f"--to {' and '.join(owners)}",
                         hint=f"--to {to} takes {', '.join(chosen.flags) or 'no options'}")
    return chosen.options_from_cli(given)


def convert(text: str, to: str, layout: StoreLayout, catalog: Catalog, *,
            options: Options | None = None, name: str | None = None, force: bool = False,
            on_event: OnEvent = no_events) -> Conversion:
    """Convert the model `text` names (stored, from the catalog, hf://, or a path) to the
    format `to` names and store the result under `name` (default: the model's name, its
    tag + the options' suffix: smollm2:135m-mlx-q4, sd1.5:fp16-coreml-split_einsum_v2)."""
    chosen = target(to)
    options = chosen.options() if options is None else options
    options.check()
    started = time.perf_counter()
    ref = parse_reference(text)
    chosen.refuse_before_pulling(ref, layout, catalog)
    source = runnable(ref, layout, catalog, on_event=on_event)
    chosen, options = chosen.for_source(source, options)
    options.check()
    checked = chosen.check_source(source, options)
    target_name, tag = result_name(source, options.suffix, name)
    reference = f"{target_name}:{tag}"
    if not force and manifests.load(layout, target_name, tag) is not None:
        raise UsageError(f"{reference} is already stored",
                         hint=f"{chosen.use.format(reference=reference)}; convert again "
                         "with --force")

    def step(status: str, done: int = 0, total: int = 0) -> None:
        on_event(PullEvent(reference, status, done, total))

    def storing(event: PullEvent) -> None:
        if chosen.file_events or not event.status.startswith("verifying "):
            on_event(event)

    with chosen.work(Request(source, checked, options, layout, reference, force,
                             step)) as product:
        origin = {"type": "convert", "from": source.name, "to": to} | product.origin
        if source.manifest is not None:
            origin["from_digest"] = source.manifest.digest
        files = sorted(p for p in product.folder.rglob("*") if p.is_file())
        step("storing")
        result = register(
            layout, LocalFiles(files, names=[p.relative_to(product.folder).as_posix()
                                             for p in files], origin=origin, owned=True),
            name=target_name, tag=tag, expected_sha256=None, on_event=storing,
            model_format=chosen.model_format, overwrite=force)  # refused above unless --force
    return chosen.result(manifest=result.manifest, source=source.name,
                         seconds=time.perf_counter() - started, **product.facts)


def result_name(source: Runnable, suffix: str, name: str | None) -> tuple[str, str]:
    """(name, tag) a conversion's result is stored under: `--name` when given, else the
    source's name with its tag + `suffix` (smollm2:135m -> smollm2:135m-mlx-q4; a model
    run from a path: its name, `suffix` as the tag)."""
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
