"""Stable Diffusion to Core ML: `llmctl convert MODEL --to coreml`.

What Apple's torch2coreml (ml-stable-diffusion) does, on coremltools' public API, with the
current torch, diffusers and transformers, on macOS and Linux alike:

1. The source is a diffusers Stable Diffusion pipeline (stored, a folder, hf://). Its
   model_index.json and configs are checked first, without torch (pipeline.py): a text
   model, a missing component or an impossible option (options.py) stops here with one
   line (exit 2).
2. Each component (TextEncoder, Unet, VAEDecoder; VAEEncoder and SafetyChecker on request)
   is captured from PyTorch and converted (export.py). The UNet gets the chosen attention
   (attention.py), checked against the original before export; then it is split into
   UnetChunk1 + UnetChunk2 when asked (the chunk boundary is checked), and the text
   encoder and the UNet, chunks included, are palettized to n bits when asked (job.py).
   `--via apple` has Apple's own script convert the components instead (apple.py).
3. The models land in a Resources folder in the layout Apple's Swift and Python pipelines
   read, with vocab.json and merges.txt from the pipeline's own tokenizer and
   conversion.json (options, shapes, sizes, checks, library versions). On macOS the
   models are compiled to .mlmodelc; elsewhere they stay .mlpackage.
4. The folder is registered in the store as a new tag (`sd15:coreml-split_einsum_v2-6bit`)
   by the frame every conversion shares (llmctl.convert).

Work happens in $LLMCTL_HOME/tmp/coreml-<key>/, where <key> is derived from the source and
the options that shape the result. Every model is written under a temporary name and
renamed when complete, so a conversion that is interrupted (Ctrl-C, a crash, the OOM
killer) leaves finished components behind and the same command continues from them;
nothing is registered until everything is done. `one_process_per_component`
(`--low-memory`) runs each component in a fresh Python process (child.py).

Nothing here imports torch or coremltools at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llmctl.convert import Conversion, Product, Request, Target
from llmctl.convert.coreml.options import CoremlOptions
from llmctl.convert.coreml.pipeline import Pipeline, inspect_pipeline, memory_warning
from llmctl.errors import UsageError
from llmctl.formats import ModelFormat
from llmctl.host import peak_memory_bytes
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout
from llmctl.store.lookup import find_stored
from llmctl.store.names import NameRef, Reference
from llmctl.store.resolve import Runnable

CORE_ML = ModelFormat("image", "coreml", "coreml")
WORK_PREFIX = "coreml-"


@dataclass(frozen=True, kw_only=True)
class CoremlConversion(Conversion):
    compiled: bool  # .mlmodelc (macOS) rather than .mlpackage
    resumed: list[str]  # components finished by an earlier, interrupted run
    report: dict[str, Any] = field(default_factory=dict)  # conversion.json's content


class CoremlTarget(Target):
    to = "coreml"
    model_format = CORE_ML
    options = CoremlOptions
    use = "use it: llmctl imagine {reference} PROMPT"
    result = CoremlConversion
    file_events = False

    def refuse_before_pulling(self, ref: Reference, layout: StoreLayout,
                              catalog: Catalog) -> None:
        """A catalog model not stored yet would be pulled before inspect_pipeline refuses
        it: say no first when the catalog already tells it is no diffusers pipeline."""
        if not isinstance(ref, NameRef) or find_stored(layout, catalog, ref) is not None:
            return
        match = catalog.find(ref.name, ref.tag)
        if match is None or match.entry.format in ("diffusers", ""):  # "": the files decide
            return
        entry = match.entry
        hint = (f"it is a Core ML model already: llmctl imagine {match.reference} PROMPT"
                if entry.format == "coreml" else "--to coreml converts Stable Diffusion "
                "pipelines; text models convert --to mlx")
        raise UsageError(f"{match.reference} is a{'n' if entry.kind == 'image' else ''} "
                         f"{entry.kind} model ({entry.format}), not a diffusers Stable "
                         "Diffusion pipeline", hint=hint)

    def check_source(self, source: Runnable, options: CoremlOptions) -> Pipeline:
        return inspect_pipeline(source, options)

    @contextlib.contextmanager
    def work(self, request: Request) -> Iterator[Product]:
        # Imported here: job.py imports child.py, which `python -m llmctl.convert.coreml.child`
        # runs after importing this package, and runpy warns when the package has imported
        # the module it is about to run.
        from llmctl.convert.coreml.apple import require_apple
        from llmctl.convert.coreml.export import require_libraries
        from llmctl.convert.coreml.job import Job

        options, layout, step = request.options, request.layout, request.step
        if options.via_apple:
            require_apple()
        require_libraries(options.quantize_nbits is not None)
        key = _work_key(request.source, options)
        layout.ensure()
        work = layout.tmp / f"{WORK_PREFIX}{key}"
        with layout.work_lock(f"{WORK_PREFIX}{key}",
                              lambda: step("waiting for another llmctl converting it")):
            if request.force and work.exists():
                shutil.rmtree(work)
            job = Job(request.checked, options, work, step)
            if warning := memory_warning(request.checked):
                step(f"warning: {warning}")
            try:
                job.run()
            except BaseException:
                if any(job.resources.glob("*.ml*")):
                    step(f"stopped; finished components are kept in {work}: the same "
                         "command continues from them (--force starts over)")
                raise
            yield Product(job.resources,
                          {"options": options.recorded(), "versions": job.report["versions"]},
                          {"compiled": job.compiled, "resumed": job.resumed,
                           "notes": job.notes, "warnings": job.warnings, "report": job.report,
                           "peak_memory": peak_memory_bytes(children=True)})
            shutil.rmtree(work, ignore_errors=True)


TARGET = CoremlTarget()


def _work_key(source: Runnable, options: CoremlOptions) -> str:
    """Same source and same shaping options: same work folder, so a re-run continues.
    A folder given by path is identified by its files' names, sizes and times."""
    if source.manifest is not None:
        identity: Any = source.manifest.digest
    else:
        identity = sorted((p.relative_to(source.path).as_posix(), p.stat().st_size,
                           int(p.stat().st_mtime)) for p in source.path.rglob("*")
                          if p.is_file())
    data = json.dumps([identity, options.shaping()], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]

