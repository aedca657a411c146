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

A text model (GGUF, safetensors) given to `--to coreml` goes on to llmctl.convert.coreml_lm,
which makes a stateful Core ML language model: `for_source` picks, once the source is known,
and refuses the options only the other kind takes.

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
from llmctl.convert.coreml.options import CoremlLmOptions, CoremlOptions
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
# The command line's options for each kind of source; --min-deployment-target for both.
IMAGE_FLAGS = ("--attention-implementation", "--chunk-unet", "--quantize-nbits",
               "--latent-h", "--latent-w", "--compute-unit", "--vae-encoder",
               "--safety-checker", "--low-memory", "--via")
TEXT_FLAGS = ("-q", "--ctx")
TEXT_FORMATS = ("gguf", "safetensors")  # the text models coreml_lm converts


@dataclass(frozen=True)
class CoremlChoice:
    """`--to coreml`'s options as the command line gives them, before the source tells
    which conversion it is: a Stable Diffusion pipeline's (`image`) or a language
    model's (`text`), and the flags given, to refuse those of the other kind."""

    image: CoremlOptions
    text: Any  # llmctl.convert.coreml_lm.CoremlLmOptions
    given: frozenset[str]

    def check(self) -> None:
        """Nothing yet: the one chosen is checked once the source has chosen it."""

    @property
    def suffix(self) -> str:
        raise AssertionError("for_source replaces a CoremlChoice before it is named")


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
    flags = (*IMAGE_FLAGS, *TEXT_FLAGS, "--min-deployment-target")

    def options_from_cli(self, given: dict[str, Any]) -> CoremlChoice:
        defaults, text = CoremlOptions(), CoremlLmOptions()
        target = given.get("--min-deployment-target")
        image = CoremlOptions(
            attention=given.get("--attention-implementation", defaults.attention),
            chunk_unet=given.get("--chunk-unet"), quantize_nbits=given.get("--quantize-nbits"),
            latent_h=given.get("--latent-h"), latent_w=given.get("--latent-w"),
            min_deployment_target=target or defaults.min_deployment_target,
            compute_unit=_compute_unit(given.get("--compute-unit")) or defaults.compute_unit,
            vae_encoder=bool(given.get("--vae-encoder")),
            safety_checker=bool(given.get("--safety-checker")),
            one_process_per_component=bool(given.get("--low-memory")),
            via_apple=given.get("--via") == "apple")
        text = CoremlLmOptions(
            quantize=(given.get("-q") or text.quantize).strip().lower(),
            context_length=given.get("--ctx", text.context_length),
            min_deployment_target=target or text.min_deployment_target)
        return CoremlChoice(image, text, frozenset(given))

    def for_source(self, source: Runnable, options: Any) -> tuple[Target, Any]:
        text = source.kind == "text"
        if isinstance(options, CoremlChoice):
            other = IMAGE_FLAGS if text else TEXT_FLAGS
            if wrong := [flag for flag in other if flag in options.given]:
                said = f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} for"
                if text:
                    raise UsageError(f"{said} Stable Diffusion pipelines, and {source.name} "
                                     "is a text model", hint="a language model takes -q "
                                     "int4|fp16, --ctx N and --min-deployment-target "
                                     "macOS15|iOS18")
                raise UsageError(f"{said} language models, and {source.name} is not one",
                                 hint="a Stable Diffusion pipeline palettizes with "
                                 "--quantize-nbits")
            return (_text_target(), options.text) if text else (self, options.image)
        if text and isinstance(options, CoremlOptions):  # a library call's defaults
            return _text_target(), CoremlLmOptions()
        return self, options

    def refuse_before_pulling(self, ref: Reference, layout: StoreLayout,
                              catalog: Catalog) -> None:
        """A catalog model not stored yet would be pulled before inspect_pipeline refuses
        it: say no first when the catalog already tells it is neither a diffusers
        pipeline nor a text model coreml_lm converts."""
        if not isinstance(ref, NameRef) or find_stored(layout, catalog, ref) is not None:
            return
        match = catalog.find(ref.name, ref.tag)
        if match is None or match.entry.format in ("diffusers", ""):  # "": the files decide
            return
        entry = match.entry
        if entry.kind == "text" and entry.format in TEXT_FORMATS:
            _text_target()  # refused here when this version has none
            return
        hint = ("it is a Core ML model already: llmctl "
                f"{'imagine' if entry.kind == 'image' else 'run'} {match.reference}"
                if entry.format == "coreml" else "--to coreml converts Stable Diffusion "
                "pipelines and text models in GGUF or safetensors")
        raise UsageError(f"{match.reference} is a{'n' if entry.kind == 'image' else ''} "
                         f"{entry.kind} model ({entry.format}): --to coreml does not "
                         "convert it", hint=hint)

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


def _text_target() -> Target:
    """The language-model target (llmctl.convert.coreml_lm), where this version has it."""
    import importlib.util

    if importlib.util.find_spec("llmctl.convert.coreml_lm") is None:
        raise UsageError("this version of llmctl does not convert language models to Core "
                         "ML yet", hint="convert them --to executorch, --to onnx or --to mlx")
    from llmctl.convert.coreml_lm import TARGET as TEXT_TARGET

    return TEXT_TARGET


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



def _compute_unit(text: str | None) -> str | None:
    """coremltools' name (CPU_AND_NE) of a compute unit given in either spelling; an
    unknown one is passed on for CoremlOptions to refuse."""
    from llmctl.formats.coreml import COMPUTE_UNITS, compute_unit

    if text is None:
        return None
    key = compute_unit(text)
    return COMPUTE_UNITS[key] if key else text
