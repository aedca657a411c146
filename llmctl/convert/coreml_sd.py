"""Stable Diffusion to Core ML: `llmctl convert MODEL --to coreml`.

What Apple's torch2coreml (ml-stable-diffusion) does, on coremltools' public API, with the
current torch, diffusers and transformers, on macOS and Linux alike:

1. The source is a diffusers Stable Diffusion pipeline (stored, a folder, hf://). Its
   model_index.json and configs are checked first, without torch: a text model, a missing
   component or an impossible option stops here with one line (exit 2).
2. Each component (TextEncoder, Unet, VAEDecoder; VAEEncoder and SafetyChecker on request)
   is captured from PyTorch and converted (llmctl/convert/coreml_export.py). The UNet gets
   the chosen attention (llmctl/convert/attention.py), checked against the original
   before export; then it is split into UnetChunk1 + UnetChunk2 when asked (the chunk
   boundary is checked), and the text encoder and the UNet, chunks included, are
   palettized to n bits when asked.
3. The models land in a Resources folder in the layout Apple's Swift and Python pipelines
   read, with vocab.json and merges.txt from the pipeline's own tokenizer and
   conversion.json (options, shapes, sizes, checks, library versions). On macOS the
   models are compiled to .mlmodelc; elsewhere they stay .mlpackage.
4. The folder is registered in the store as a new tag (`sd15:coreml-split_einsum_v2-6bit`).

Work happens in $LLMCTL_HOME/tmp/coreml-<key>/, where <key> is derived from the source and
the options that shape the result. Every model is written under a temporary name and
renamed when complete, so a conversion that is interrupted (Ctrl-C, a crash, the OOM
killer) leaves finished components behind and the same command continues from them;
nothing is registered until everything is done. `one_process_per_component` runs each
component in a fresh Python process, so the peak memory is the largest component's
rather than the sum of what torch and coremltools keep around (Apple's FAQ advice for 8 GB
Macs, made automatic).

Nothing here imports torch or coremltools at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmctl.convert import result_name
from llmctl.convert.attention import MIN_PSNR_DB, QUERY_CHUNK_SIZE, AttentionImplementation
from llmctl.errors import EngineFailure, LlmctlError, UsageError, VerificationFailed
from llmctl.formats import ModelFormat
from llmctl.formats import coreml as coreml_format
from llmctl.store import manifest as manifests
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout, write_atomically
from llmctl.store.lookup import find_stored
from llmctl.store.manifest import Manifest
from llmctl.store.names import NameRef, parse_reference
from llmctl.store.register import OnEvent, PullEvent, register
from llmctl.store.resolve import Runnable, runnable
from llmctl.store.sources import LocalFiles

CORE_ML = ModelFormat("image", "coreml", "coreml")
# Resource names Apple's pipelines look for.
RESOURCE_NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder",
                  "vae_encoder": "VAEEncoder", "safety_checker": "SafetyChecker"}
UNET_CHUNKS = ("UnetChunk1", "UnetChunk2")
NBITS = (1, 2, 4, 6, 8)  # what the Neural Engine reads as palettes (Apple's README)
# 6-bit palettes need the runtime that decompresses weights just in time (iOS 17, macOS 14).
SIX_BIT_TARGETS = ("macOS14", "iOS17")
DEPLOYMENT_TARGETS = ("macOS13", "macOS14", "iOS16", "iOS17")
# coremltools' names of the compute units (llmctl.formats.coreml has both spellings).
COMPUTE_UNITS = tuple(coreml_format.COMPUTE_UNITS.values())
# Apple keeps each UNet chunk under 1 GB of weights for iOS ("--chunk-unet" in its README).
CHUNK_WARN_BYTES = 1_000_000_000
CHUNK_MIN_PSNR_DB = 35.0  # chunked vs whole UNet on macOS, as Apple's chunk check does
REPORT = "conversion.json"
APPLE_MODULE = "python_coreml_stable_diffusion"
APPLE_INSTALL = "pip install git+https://github.com/apple/ml-stable-diffusion"
APPLE_PYTHON_ENV = "LLMCTL_APPLE_PYTHON"
WORK_PREFIX = "coreml-"


@dataclass(frozen=True)
class CoremlOptions:
    """`convert --to coreml`'s options, with torch2coreml's meaning."""

    attention: AttentionImplementation = AttentionImplementation.SPLIT_EINSUM_V2
    chunk_unet: bool | None = None  # None: chunked for iOS targets
    quantize_nbits: int | None = None
    min_deployment_target: str = "macOS13"
    latent_h: int | None = None  # None: the UNet's sample_size
    latent_w: int | None = None
    compute_unit: str = "ALL"
    vae_encoder: bool = False
    safety_checker: bool = False
    one_process_per_component: bool = False
    via_apple: bool = False
    # Not on the command line: for tests and benchmarks.
    query_chunk_size: int = QUERY_CHUNK_SIZE  # SPLIT_EINSUM_V2's query chunks
    palettize_min_elements: int = 2048  # coremltools' weight_threshold: smaller stay fp16

    def check(self) -> None:
        if self.quantize_nbits is not None and self.quantize_nbits not in NBITS:
            raise UsageError(f"--quantize-nbits {self.quantize_nbits} is not supported",
                             hint=f"palettes have {', '.join(map(str, NBITS))} bits")
        if self.min_deployment_target not in DEPLOYMENT_TARGETS:
            raise UsageError(f"--min-deployment-target {self.min_deployment_target} is not "
                             "supported", hint=f"use {', '.join(DEPLOYMENT_TARGETS)}")
        if self.quantize_nbits == 6 and self.min_deployment_target not in SIX_BIT_TARGETS:
            raise UsageError(f"6-bit palettization needs iOS 17 or macOS 14, not "
                             f"{self.min_deployment_target}",
                             hint="add --min-deployment-target macOS14 (or iOS17)")
        if self.compute_unit not in COMPUTE_UNITS:
            raise UsageError(f"--compute-unit {self.compute_unit} is not supported",
                             hint=f"use {', '.join(COMPUTE_UNITS)}")
        for option, value in (("--latent-h", self.latent_h), ("--latent-w", self.latent_w)):
            if value is not None and value < 1:
                raise UsageError(f"{option} must be positive")

    @property
    def chunked(self) -> bool:
        if self.chunk_unet is not None:
            return self.chunk_unet
        return self.min_deployment_target.startswith("iOS")

    @property
    def suffix(self) -> str:
        """The tag of the result: coreml-split_einsum_v2[-6bit][-chunked]."""
        parts = ["coreml", self.attention.value.lower()]
        if self.quantize_nbits:
            parts.append(f"{self.quantize_nbits}bit")
        if self.chunked:
            parts.append("chunked")
        return "-".join(parts)

    @property
    def components(self) -> list[str]:
        chosen = ["text_encoder", "unet", "vae_decoder"]
        if self.vae_encoder:
            chosen.append("vae_encoder")
        if self.safety_checker:
            chosen.append("safety_checker")
        return chosen

    def shaping(self) -> dict[str, Any]:
        """The options that change what is written (the work folder's key)."""
        return {"attention": self.attention.value, "chunked": self.chunked,
                "quantize_nbits": self.quantize_nbits,
                "min_deployment_target": self.min_deployment_target,
                "latent_h": self.latent_h, "latent_w": self.latent_w,
                "query_chunk_size": self.query_chunk_size,
                "palettize_min_elements": self.palettize_min_elements,
                "via": "apple" if self.via_apple else "llmctl"}


@dataclass(frozen=True)
class CoremlConversion:
    manifest: Manifest
    source: str
    seconds: float
    compiled: bool  # .mlmodelc (macOS) rather than .mlpackage
    resumed: list[str]  # components finished by an earlier, interrupted run
    notes: list[str]  # facts for stderr (the models are not compiled here)
    warnings: list[str]  # what may not work as the user wants (a chunk over 1 GB)
    report: dict[str, Any] = field(default_factory=dict)  # conversion.json's content


# -- the source pipeline, checked without torch ------------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    path: Path
    name: str
    geometry: Any  # coreml_export.Geometry
    tokenizer: tuple[Path, Path] | Path  # (vocab.json, merges.txt), or tokenizer.json


REQUIRED = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder",
            "tokenizer": "tokenizer"}


def inspect_pipeline(source: Runnable, options: CoremlOptions) -> Pipeline:
    """The pipeline's shapes, after checking it is a Stable Diffusion pipeline with every
    component the options ask for."""
    from llmctl.convert.coreml_export import Geometry, check_latent

    if source.kind != "image" or source.format != "diffusers":
        what = "an image" if source.kind == "image" else "a text"
        raise UsageError(f"{source.name} is {what} model ({source.format}), not a diffusers "
                         "Stable Diffusion pipeline",
                         hint="--to coreml converts Stable Diffusion pipelines (a diffusers "
                         "folder with model_index.json); text models convert --to mlx")
    folder = source.path
    index = _read_json(folder / "model_index.json", source.name)
    if index.get("text_encoder_2") or index.get("tokenizer_2"):
        raise UsageError(f"{source.name} is a {index.get('_class_name', 'SDXL')} pipeline "
                         "(two text encoders), which llmctl does not convert yet",
                         hint="Stable Diffusion 1.x and 2.x convert; for SDXL run Apple's "
                         "torch2coreml with --xl-version yourself")
    wanted = dict(REQUIRED)
    if options.safety_checker:
        wanted["safety_checker"] = "safety checker"
    for component, label in wanted.items():
        entry = index.get(component)
        if not entry or entry == [None, None] or not (folder / component).is_dir():
            hint = ("leave out --safety-checker" if component == "safety_checker"
                    else "convert a complete Stable Diffusion pipeline")
            raise UsageError(f"{source.name} has no {label} ('{component}' is missing from "
                             "the pipeline)", hint=hint)
    unet = _read_json(folder / "unet" / "config.json", source.name)
    vae = _read_json(folder / "vae" / "config.json", source.name)
    text = _read_json(folder / "text_encoder" / "config.json", source.name)
    tokenizer_config = _read_json(folder / "tokenizer" / "tokenizer_config.json", source.name,
                                  required=False)
    text_length = int(text.get("max_position_embeddings", 77))
    if isinstance(tokenizer_config.get("model_max_length"), int):
        text_length = min(text_length, tokenizer_config["model_max_length"])
    sample_size = unet.get("sample_size", 64)
    sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
    factor = 2 ** (len(unet.get("block_out_channels", [0])) - 1)
    latent_h = options.latent_h or sample_size
    latent_w = options.latent_w or sample_size
    check_latent(latent_h, factor, "--latent-h")
    check_latent(latent_w, factor, "--latent-w")
    safety_size = 224
    if options.safety_checker:
        checker = _read_json(folder / "safety_checker" / "config.json", source.name)
        safety_size = int((checker.get("vision_config") or {}).get("image_size", 224))
    geometry = Geometry(
        latent_h=latent_h, latent_w=latent_w,
        latent_channels=int(vae.get("latent_channels", 4)),
        vae_scale=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
        text_length=text_length, text_hidden=int(text.get("hidden_size", 768)),
        unet_in_channels=int(unet.get("in_channels", 4)),
        cross_attention_dim=int(unet.get("cross_attention_dim") or text.get("hidden_size")),
        safety_image_size=safety_size)
    tokenizer = folder / "tokenizer"
    if (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file():
        tokens: tuple[Path, Path] | Path = (tokenizer / "vocab.json", tokenizer / "merges.txt")
    elif (tokenizer / "tokenizer.json").is_file():
        tokens = tokenizer / "tokenizer.json"
    else:
        raise UsageError(f"{source.name}'s tokenizer has neither vocab.json and merges.txt "
                         "nor tokenizer.json", hint="convert a complete pipeline")
    return Pipeline(folder, source.name, geometry, tokens)


def _read_json(path: Path, model: str, required: bool = True) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if not required:
            return {}
        raise UsageError(f"{model} has no {path.parent.name}/{path.name}"
                         if path.name != "model_index.json" else
                         f"{model} is not a diffusers pipeline (no model_index.json)",
                         hint="--to coreml converts Stable Diffusion pipelines") from None
    except ValueError as exc:
        raise UsageError(f"{model}: {path.name} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def pipeline_files(pipeline: Pipeline, resources: Path) -> None:
    """The files besides the models: vocab.json and merges.txt as the source pipeline's
    tokenizer has them (Apple's script downloads CLIP's; a fine-tuned model's own are the
    right ones; a tokenizer saved only as tokenizer.json gives them from its BPE model),
    and the pipeline's scheduler and VAE configs (scheduler_config.json, vae_config.json:
    the scheduler it was trained with and the VAE's scaling factor, which llmctl's Core ML
    engine reads; Apple's pipelines ignore them)."""
    for config, name in (("scheduler/scheduler_config.json", "scheduler_config.json"),
                         ("vae/config.json", "vae_config.json")):
        if (pipeline.path / config).is_file():
            shutil.copyfile(pipeline.path / config, resources / name)
    if isinstance(pipeline.tokenizer, tuple):
        vocab, merges = pipeline.tokenizer
        shutil.copyfile(vocab, resources / "vocab.json")
        shutil.copyfile(merges, resources / "merges.txt")
        return
    model = json.loads(pipeline.tokenizer.read_text()).get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UsageError(f"{pipeline.name}'s tokenizer.json is not a BPE tokenizer",
                         hint="Apple's pipelines read CLIP's BPE vocab.json and merges.txt")
    (resources / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    lines = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (resources / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in lines))


# -- memory ------------------------------------------------------------------------------

# Converting a component holds its float32 weights in torch, coremltools' copy of them in
# its program and the float16 result: measured at 1.9x the float32 weights on top of what
# torch, diffusers and coremltools take once imported (0.6 GB), for the 220M-parameter
# UNet of benchmarks/convert_coreml.py (2.30 GB at the peak). The factor leans high.
MEMORY_PER_FP32_BYTE = 2.0
MEMORY_BASE = 700_000_000


def conversion_memory(pipeline: Pipeline) -> int:
    """The peak memory the conversion is expected to need: its largest component's."""
    from llmctl.formats.hf import weight_files
    from llmctl.formats.safetensors import tensors as safetensors_tensors

    largest = 0
    for component in ("unet", "text_encoder", "vae", "safety_checker"):
        count = 0
        for path in weight_files(pipeline.path / component):
            if path.suffix == ".safetensors":
                count += sum(n for _, n in safetensors_tensors(path).values())
            else:  # a pickle has no header to count from: assume float32
                count += path.stat().st_size // 4
        largest = max(largest, count)
    return MEMORY_BASE + int(largest * 4 * MEMORY_PER_FP32_BYTE)


def _memory_warning(pipeline: Pipeline) -> str | None:
    from llmctl.host import usable_memory_bytes
    from llmctl.memory import SHARE

    need, usable = conversion_memory(pipeline), usable_memory_bytes()
    if not usable or need <= usable * SHARE:
        return None
    return (f"converting {pipeline.name} needs about {_size(need)} of memory at its peak "
            f"(the UNet), more than the {SHARE:.0%} of {_size(usable)} llmctl plans for; it "
            "may be killed for lack of memory: finished components are kept and the same "
            "command continues from them")


# -- the conversion ------------------------------------------------------------------------


def _quiet(_event: PullEvent) -> None:
    pass


def convert(text: str, layout: StoreLayout, catalog: Catalog, *,
            options: CoremlOptions = CoremlOptions(), name: str | None = None,
            force: bool = False, on_event: OnEvent = _quiet) -> CoremlConversion:
    """Convert the Stable Diffusion pipeline `text` names (stored, a folder, hf://) to
    Core ML and store the result under `name` (default: the model's name, its tag +
    "-coreml-<attention>[-<n>bit][-chunked]")."""
    options.check()
    started = time.perf_counter()
    _refuse_before_pulling(text, layout, catalog)
    source = runnable(text, layout, catalog, on_event=on_event)
    pipeline = inspect_pipeline(source, options)
    # Named as `--to mlx` names its results: the source's name, its tag + the suffix.
    target_name, tag = result_name(source, options.suffix, name)
    reference = f"{target_name}:{tag}"
    if not force and manifests.load(layout, target_name, tag) is not None:
        raise UsageError(f"{reference} is already stored",
                         hint=f"use it: llmctl imagine {reference} PROMPT; convert again "
                         "with --force")
    if options.via_apple:
        _require_apple()
    from llmctl.convert.coreml_export import require_libraries

    require_libraries(options.quantize_nbits is not None)

    def step(status: str) -> None:
        on_event(PullEvent(reference, status))

    key = _work_key(source, options)
    layout.ensure()
    work = layout.tmp / f"{WORK_PREFIX}{key}"
    with layout.work_lock(f"{WORK_PREFIX}{key}",
                          lambda: step("waiting for another llmctl converting it")):
        if force and work.exists():
            shutil.rmtree(work)
        job = _Job(pipeline, options, work, step)
        if warning := _memory_warning(pipeline):
            step(f"warning: {warning}")
        try:
            job.run()
        except BaseException:
            if any(job.resources.glob("*.ml*")):
                step(f"stopped; finished components are kept in {work}: the same command "
                     "continues from them (--force starts over)")
            raise
        origin: dict[str, Any] = {
            "type": "convert", "from": source.name, "to": "coreml",
            "options": options.shaping() | {"components": options.components,
                                            "compute_unit": options.compute_unit},
            "versions": job.report["versions"]}
        if source.manifest is not None:
            origin["from_digest"] = source.manifest.digest
        resources = work / "Resources"
        files = sorted(p for p in resources.rglob("*") if p.is_file())
        step("storing")
        result = register(
            layout, LocalFiles(files, names=[p.relative_to(resources).as_posix()
                                             for p in files], origin=origin, owned=True),
            name=target_name, tag=tag, expected_sha256=None, model_format=CORE_ML,
            overwrite=force,  # refused above unless --force
            # One "verifying <file>" per file of every package would bury the progress.
            on_event=lambda e: None if e.status.startswith("verifying ") else on_event(e))
        shutil.rmtree(work, ignore_errors=True)
    return CoremlConversion(result.manifest, source.name, time.perf_counter() - started,
                            job.compiled, job.resumed, job.notes, job.warnings, job.report)


def _refuse_before_pulling(text: str, layout: StoreLayout, catalog: Catalog) -> None:
    """A catalog model not stored yet would be pulled before inspect_pipeline refuses it:
    say no first when the catalog already tells it is no diffusers pipeline."""
    ref = parse_reference(text)
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
                     f"{entry.kind} model ({entry.format}), not a diffusers Stable Diffusion "
                     "pipeline", hint=hint)


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


class _Job:
    """One conversion's work folder:

        Resources/<Name>.mlpackage    finished components (then .mlmodelc on macOS)
        partial/                      what is being written, renamed into place when done
        stage/Unet.mlpackage          the whole UNet before chunking and palettization
        components/<component>.json   what each finished component's conversion reported
        log.txt                       the libraries' own output (warnings, progress bars)
    """

    def __init__(self, pipeline: Pipeline, options: CoremlOptions, work: Path,
                 step: Callable[[str], None]):
        self.pipeline = pipeline
        self.options = options
        self.work = work
        self.step = step
        self.resources = work / "Resources"
        self.partial = work / "partial"
        self.stage = work / "stage"
        self.facts = work / "components"
        self.log = work / "log.txt"
        self.resumed: list[str] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.compiled = False
        self.report: dict[str, Any] = {}

    def run(self) -> None:
        for folder in (self.resources, self.stage, self.facts):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.partial, ignore_errors=True)  # left by an interrupted run
        self.partial.mkdir()
        components: dict[str, dict[str, Any]] = {}
        if self.options.via_apple:
            self._run_apple()
        for component in self.options.components:
            resource_name = RESOURCE_NAMES[component]
            if self._finished(component):
                self.resumed.append(resource_name)
                self.step(f"{resource_name}: converted by an earlier run, kept")
            else:
                facts = self._convert(component)
                write_atomically(self.facts / f"{component}.json",
                                 json.dumps(facts, default=str).encode())
            components[resource_name] = json.loads(
                (self.facts / f"{component}.json").read_text())
        pipeline_files(self.pipeline, self.resources)
        self._compile_or_note()
        self.report = self._report(components)
        write_atomically(self.resources / REPORT,
                         json.dumps(self.report, indent=2, default=str).encode())

    # -- per component ---------------------------------------------------------------------

    def _outputs(self, component: str) -> list[str]:
        if component == "unet" and self.options.chunked:
            return list(UNET_CHUNKS)
        return [RESOURCE_NAMES[component]]

    def _finished(self, component: str) -> bool:
        if not (self.facts / f"{component}.json").is_file():
            return False
        return all((self.resources / f"{n}.mlpackage").is_dir()
                   or (self.resources / f"{n}.mlmodelc").is_dir()
                   for n in self._outputs(component))

    def _convert(self, component: str) -> dict[str, Any]:
        from llmctl.convert import coreml_export as export

        name = RESOURCE_NAMES[component]
        started = time.perf_counter()
        facts: dict[str, Any] = {}
        if component == "unet":
            whole = self.stage / "Unet.mlpackage"
            if whole.is_dir():
                self.step("Unet: converted by an earlier run; finishing it")
                self.resumed.append("Unet (before chunking)")
            elif self.options.via_apple:
                os.replace(self._apple_package(component), whole)
            else:
                facts = self._capture(component, whole)
            facts |= self._finish_unet(whole)
        else:
            package = self.partial / f"{name}.mlpackage"
            if self.options.via_apple:
                package = self._apple_package(component)
            else:
                facts = self._capture(component, package)
            if self.options.quantize_nbits and component == "text_encoder":
                package = self._palettize(name, package)
            info = export.inspect_package(package)
            facts |= {"models": {name: info.to_dict()}}
            self._place(package, name)
        facts["seconds"] = round(time.perf_counter() - started, 1)
        weights = sum(m["weight_bytes"] for m in facts["models"].values())
        self.step(f"{name}: done in {facts['seconds']:.0f}s ({_size(weights)} of weights)")
        return facts

    def _capture(self, component: str, out: Path) -> dict[str, Any]:
        """Convert `component` into `out` (renamed into place only when complete)."""
        name = RESOURCE_NAMES[component]
        building = self.partial / f"{name}-building.mlpackage"
        if self.options.one_process_per_component:
            facts = self._in_child(component, building)
        else:
            facts = self._in_process(component, building)
        os.replace(building, out)
        return facts

    def _settings(self) -> Any:
        from llmctl.convert.coreml_export import ExportSettings

        return ExportSettings(self.options.attention, self.options.min_deployment_target,
                              self.options.compute_unit, self.options.query_chunk_size)

    def _in_process(self, component: str, out: Path) -> dict[str, Any]:
        from llmctl.convert.coreml_export import convert_component

        name = RESOURCE_NAMES[component]
        with self._libraries_logged():
            return convert_component(component, self.pipeline.path, self.pipeline.geometry,
                                     self._settings(), out,
                                     lambda status: self.step(f"{name}: {status}"))

    def _in_child(self, component: str, out: Path) -> dict[str, Any]:
        """The same conversion in a fresh Python: its memory goes back to the system when
        it exits. It reports progress and its result as JSON lines on stdout."""
        name = RESOURCE_NAMES[component]
        job = {"component": component, "source": str(self.pipeline.path), "out": str(out),
               "geometry": asdict(self.pipeline.geometry),
               "settings": {"attention": self.options.attention.value,
                            "min_deployment_target": self.options.min_deployment_target,
                            "compute_unit": self.options.compute_unit,
                            "query_chunk_size": self.options.query_chunk_size}}
        self.step(f"{name}: starting its own process")
        with open(self.log, "a") as log:
            child = subprocess.Popen([sys.executable, "-m", __name__, json.dumps(job)],
                                     stdout=subprocess.PIPE, stderr=log, text=True)
            result: dict[str, Any] | None = None
            error: dict[str, Any] | None = None
            assert child.stdout is not None
            for line in child.stdout:
                message = json.loads(line)
                if "status" in message:
                    self.step(f"{name}: {message['status']}")
                result = message.get("result", result)
                error = message.get("error", error)
            code = child.wait()
        if error:
            raise _rebuild_error(error)
        if code != 0 or result is None:
            why = "killed, probably for lack of memory" if code in (-9, 137) else f"exit {code}"
            raise EngineFailure(f"converting {name} failed in its process ({why}); its "
                                f"output: {self.log}")
        return result

    @contextlib.contextmanager
    def _libraries_logged(self) -> Iterator[None]:
        """torch, diffusers and coremltools print warnings and progress bars of their own:
        into the log, not onto the user's terminal (LLMCTL_DEBUG=1 shows them)."""
        if os.environ.get("LLMCTL_DEBUG"):
            yield
            return
        with open(self.log, "a") as log, contextlib.redirect_stderr(log), \
                contextlib.redirect_stdout(log), _warnings_to_log():
            yield

    def _finish_unet(self, whole: Path) -> dict[str, Any]:
        from llmctl.convert import coreml_export as export

        nbits = self.options.quantize_nbits
        if not self.options.chunked:
            package = self._palettize("Unet", whole) if nbits else whole
            info = export.inspect_package(package)
            if package is whole:  # keep the stage for a re-run until it is in place
                shutil.copytree(whole, self.partial / "Unet.mlpackage")
                package = self.partial / "Unet.mlpackage"
            self._place(package, "Unet")
            return {"models": {"Unet": info.to_dict()}}
        self.step("Unet: chunking into two halves of about equal weight size")
        with self._libraries_logged():
            first, second = export.bisect(whole, self.partial / "chunks")
        full_info = export.inspect_package(whole)
        first_info, second_info = export.inspect_package(first), export.inspect_package(second)
        export.check_chunks(full_info, first_info, second_info)
        facts: dict[str, Any] = {"chunk_boundary": sorted(f[0] for f in first_info.outputs)}
        if export.can_compile():  # Core ML predicts on macOS only
            self.step("Unet: comparing the chunked UNet with the whole one (Core ML)")
            with self._libraries_logged():
                value = export.compare_chunks_on_macos(whole, first, second)
            facts["chunked_vs_whole_psnr_db"] = round(value, 1)
            if value < CHUNK_MIN_PSNR_DB:
                raise VerificationFailed("Unet chunks", f"the chunked UNet's output differs "
                                         f"from the whole UNet's (PSNR {value:.1f} dB, minimum "
                                         f"{CHUNK_MIN_PSNR_DB:.0f} dB)")
        else:
            facts["chunked_vs_whole_psnr_db"] = None  # needs Core ML predictions (macOS)
        models = {}
        for name, chunk in zip(UNET_CHUNKS, (first, second), strict=True):
            package = self._palettize(name, chunk) if nbits else chunk
            info = export.inspect_package(package)
            models[name] = info.to_dict()
            self._place(package, name)
        sizes = {n: m["weight_bytes"] for n, m in models.items()}
        self.step("Unet: chunk weights " + ", ".join(f"{n} {_size(s)}" for n, s in sizes.items()))
        for name, size in sizes.items():
            if size > CHUNK_WARN_BYTES:
                self.warnings.append(f"{name} has {_size(size)} of weights, over the 1 GB Apple "
                                  "recommends per model on iOS; palettize (--quantize-nbits 6)")
        return facts | {"models": models}

    def _palettize(self, name: str, package: Path) -> Path:
        from llmctl.convert.coreml_export import palettize

        nbits = self.options.quantize_nbits
        assert nbits
        self.step(f"{name}: palettizing to {nbits} bits (k-means)")
        out = self.partial / f"{name}-{nbits}bit.mlpackage"
        shutil.rmtree(out, ignore_errors=True)
        with self._libraries_logged():
            palettize(package, out, nbits, self.options.palettize_min_elements)
        return out

    def _place(self, package: Path, name: str) -> None:
        """Move a finished model into Resources under its final name (a rename: the
        folder appears whole or not at all)."""
        final = self.resources / f"{name}.mlpackage"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(package, final)

    # -- the finished folder ---------------------------------------------------------------

    def _compile_or_note(self) -> None:
        from llmctl.convert import coreml_export as export

        packages = sorted(self.resources.glob("*.mlpackage"))
        if not export.can_compile():
            if packages:
                self.notes.append("Core ML models are compiled (.mlmodelc) only on macOS; "
                                  "stored as .mlpackage, which Core ML compiles when it loads "
                                  "them")
            return
        for package in packages:
            name = package.name.removesuffix(".mlpackage")
            self.step(f"{name}: compiling to .mlmodelc (xcrun coremlcompiler)")
            compiled = export.compile_package(package, self.partial / "compiled")
            final = self.resources / f"{name}.mlmodelc"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(compiled, final)
            shutil.rmtree(package)
        self.compiled = True

    def _report(self, components: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from llmctl.convert.coreml_export import library_versions

        return {
            "schema": 1,
            "source": self.pipeline.name,
            "converter": "apple torch2coreml" if self.options.via_apple else "llmctl",
            "options": self.options.shaping() | {"components": self.options.components,
                                                 "compute_unit": self.options.compute_unit},
            "geometry": asdict(self.pipeline.geometry),
            "attention_min_psnr_db": MIN_PSNR_DB,
            "compiled": self.compiled,
            "components": components,
            "versions": library_versions(self.options.quantize_nbits is not None),
        }

    # -- Apple's torch2coreml ----------------------------------------------------------------

    def _run_apple(self) -> None:
        out = self.work / "apple"
        done = out / "done"
        if done.exists():
            self.step("Apple's torch2coreml: ran in an earlier run, kept")
            return
        out.mkdir(exist_ok=True)
        command = apple_command(self.pipeline.path, out, self.options)
        self.step("running Apple's torch2coreml (its own progress goes to the log)")
        with open(self.log, "a") as log:
            code = subprocess.run(command, stdout=log, stderr=log).returncode
        if code != 0:
            raise EngineFailure(f"Apple's torch2coreml failed (exit {code}); its output: "
                                f"{self.log}")
        done.touch()

    def _apple_package(self, component: str) -> Path:
        """The package Apple's script wrote for a component: Stable_Diffusion_version_
        <model>_<component>.mlpackage, with Apple's component names."""
        found = sorted((self.work / "apple").glob(f"*_{component}.mlpackage"))
        if not found:
            raise EngineFailure(f"Apple's torch2coreml wrote no {component} model; its "
                                f"output: {self.log}")
        return found[0]


def apple_python() -> str:
    """The Python that runs Apple's torch2coreml: LLMCTL_APPLE_PYTHON, else this one.
    Apple's package pins old torch, diffusers, transformers, huggingface_hub and numpy,
    which llmctl's own dependencies exclude, so it usually lives in a venv of its own."""
    return os.environ.get(APPLE_PYTHON_ENV) or sys.executable


def apple_command(source: Path, out: Path, options: CoremlOptions) -> list[str]:
    """torch2coreml's command line for the same conversion of each component. Chunking,
    palettization (chunks included), the tokenizer files, compiling and the resource
    folder are llmctl's, afterwards: Apple's bundling step downloads CLIP's tokenizer, and
    its --chunk-unet with --quantize-nbits leaves the chunks unpalettized."""
    command = [apple_python(), "-m", f"{APPLE_MODULE}.torch2coreml",
               "--model-version", str(source), "-o", str(out),
               "--convert-text-encoder", "--convert-unet", "--convert-vae-decoder",
               "--attention-implementation", options.attention.value,
               "--min-deployment-target", options.min_deployment_target,
               "--compute-unit", options.compute_unit]
    if options.vae_encoder:
        command.append("--convert-vae-encoder")
    if options.safety_checker:
        command.append("--convert-safety-checker")
    if options.latent_h:
        command += ["--latent-h", str(options.latent_h)]
    if options.latent_w:
        command += ["--latent-w", str(options.latent_w)]
    return command


def _require_apple() -> None:
    python = apple_python()
    probe = ("import importlib.util, sys; "
             f"sys.exit(importlib.util.find_spec('{APPLE_MODULE}') is None)")
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
    except OSError:
        found = False
    if not found:
        where = f"{APPLE_PYTHON_ENV}={python}" if os.environ.get(APPLE_PYTHON_ENV) else python
        raise EngineFailure(
            f"--via apple needs Apple's {APPLE_MODULE}, which {where} cannot import (it is "
            f"not on PyPI); install it from its repository into a venv of its own "
            f"({APPLE_INSTALL}) and set {APPLE_PYTHON_ENV} to that venv's python")


def _size(size: int) -> str:
    from llmctl.units import format_bytes

    return format_bytes(size)


@contextlib.contextmanager
def _warnings_to_log() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        yield


# -- errors across the process boundary --------------------------------------------------------


def _error_message(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, UsageError):
        return {"type": "usage", "message": str(exc), "hint": exc.hint}
    if isinstance(exc, VerificationFailed):
        return {"type": "verification", "path": exc.path, "reason": exc.reason}
    return {"type": "failure", "message": f"{type(exc).__name__}: {exc}"}


def _rebuild_error(error: dict[str, Any]) -> LlmctlError:
    if error["type"] == "usage":
        return UsageError(error["message"], hint=error.get("hint"))
    if error["type"] == "verification":
        return VerificationFailed(error["path"], error["reason"])
    return EngineFailure(error["message"])


def _child_main(argv: list[str]) -> int:
    """`python -m llmctl.convert.coreml_sd JOB`: convert one component (see _in_child)."""
    from llmctl.convert.coreml_export import ExportSettings, Geometry, convert_component

    job = json.loads(argv[0])
    stdout = sys.stdout

    def send(message: dict[str, Any]) -> None:
        stdout.write(json.dumps(message, default=str) + "\n")
        stdout.flush()

    settings = job["settings"]
    try:
        # The libraries' chatter goes to stderr, which the parent sends to its log.
        with contextlib.redirect_stdout(sys.stderr):
            result = convert_component(
                job["component"], Path(job["source"]), Geometry(**job["geometry"]),
                ExportSettings(AttentionImplementation(settings["attention"]),
                               settings["min_deployment_target"], settings["compute_unit"],
                               settings["query_chunk_size"]),
                Path(job["out"]), lambda status: send({"status": status}))
    except LlmctlError as exc:
        send({"error": _error_message(exc)})
        return 1
    send({"result": result})
    return 0


def conversion_peak_memory_bytes() -> int:
    """The largest resident size of this process or of any child it waited for (the
    components converted with --low-memory)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB here
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * scale


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
