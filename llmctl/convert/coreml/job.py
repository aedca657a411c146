"""The resumable work of `convert --to coreml`: one work folder per source and shaping
options, in which each component is converted, finished (chunked, palettized, compiled)
and renamed into place when complete, so that an interrupted conversion (Ctrl-C, a crash,
the OOM killer) leaves its finished components for the same command to continue from."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmctl.convert.coreml import apple, export
from llmctl.convert.coreml.attention import MIN_PSNR_DB
from llmctl.convert.coreml.child import convert_in_child
from llmctl.convert.coreml.options import RESOURCE_NAMES, CoremlOptions
from llmctl.convert.coreml.pipeline import Pipeline, pipeline_files
from llmctl.errors import VerificationFailed
from llmctl.store.layout import write_atomically
from llmctl.units import format_bytes

UNET_CHUNKS = ("UnetChunk1", "UnetChunk2")
# Apple keeps each UNet chunk under 1 GB of weights for iOS ("--chunk-unet" in its README).
CHUNK_WARN_BYTES = 1_000_000_000
CHUNK_MIN_PSNR_DB = 35.0  # chunked vs whole UNet on macOS, as Apple's chunk check does
REPORT = "conversion.json"


class Job:
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
        self.apple = work / "apple"
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
            apple.run_torch2coreml(self.pipeline.path, self.apple, self.options, self.log,
                                   self.step)
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
        name = RESOURCE_NAMES[component]
        started = time.perf_counter()
        facts: dict[str, Any] = {}
        if component == "unet":
            whole = self.stage / "Unet.mlpackage"
            if whole.is_dir():
                self.step("Unet: converted by an earlier run; finishing it")
                self.resumed.append("Unet (before chunking)")
            elif self.options.via_apple:
                os.replace(apple.written_package(self.apple, component, self.log), whole)
            else:
                facts = self._capture(component, whole)
            facts |= self._finish_unet(whole)
        else:
            package = self.partial / f"{name}.mlpackage"
            if self.options.via_apple:
                package = apple.written_package(self.apple, component, self.log)
            else:
                facts = self._capture(component, package)
            if self.options.quantize_nbits and component == "text_encoder":
                package = self._palettize(name, package)
            info = export.inspect_package(package)
            facts |= {"models": {name: info.to_dict()}}
            self._place(package, name)
        facts["seconds"] = round(time.perf_counter() - started, 1)
        weights = sum(m["weight_bytes"] for m in facts["models"].values())
        self.step(f"{name}: done in {facts['seconds']:.0f}s ({format_bytes(weights)} of "
                  "weights)")
        return facts

    def _capture(self, component: str, out: Path) -> dict[str, Any]:
        """Convert `component` into `out` (renamed into place only when complete)."""
        name = RESOURCE_NAMES[component]
        building = self.partial / f"{name}-building.mlpackage"
        if self.options.one_process_per_component:
            facts = convert_in_child(component, self.pipeline, self._settings(), building,
                                     self.log, self.step)
        else:
            facts = self._in_process(component, building)
        os.replace(building, out)
        return facts

    def _settings(self) -> export.ExportSettings:
        return export.ExportSettings(self.options.attention, self.options.min_deployment_target,
                              self.options.compute_unit, self.options.query_chunk_size)

    def _in_process(self, component: str, out: Path) -> dict[str, Any]:
        name = RESOURCE_NAMES[component]
        with self._libraries_logged():
            return export.convert_component(
                component, self.pipeline.path, self.pipeline.geometry, self._settings(), out,
                lambda status: self.step(f"{name}: {status}"))

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
        self.step("Unet: chunk weights "
                  + ", ".join(f"{n} {format_bytes(s)}" for n, s in sizes.items()))
        for name, size in sizes.items():
            if size > CHUNK_WARN_BYTES:
                self.warnings.append(f"{name} has {format_bytes(size)} of weights, over the 1 GB "
                                     "Apple recommends per model on iOS; palettize "
                                     "(--quantize-nbits 6)")
        return facts | {"models": models}

    def _palettize(self, name: str, package: Path) -> Path:
        nbits = self.options.quantize_nbits
        assert nbits
        self.step(f"{name}: palettizing to {nbits} bits (k-means)")
        out = self.partial / f"{name}-{nbits}bit.mlpackage"
        shutil.rmtree(out, ignore_errors=True)
        with self._libraries_logged():
            export.palettize(package, out, nbits, self.options.palettize_min_elements)
        return out

    def _place(self, package: Path, name: str) -> None:
        """Move a finished model into Resources under its final name (a rename: the
        folder appears whole or not at all)."""
        final = self.resources / f"{name}.mlpackage"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(package, final)

    # -- the finished folder ---------------------------------------------------------------

    def _compile_or_note(self) -> None:
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
        return {
            "schema": 1,
            "source": self.pipeline.name,
            "converter": "apple torch2coreml" if self.options.via_apple else "llmctl",
            "options": self.options.recorded(),
            "geometry": asdict(self.pipeline.geometry),
            "attention_min_psnr_db": MIN_PSNR_DB,
            "compiled": self.compiled,
            "components": components,
            "versions": export.library_versions(self.options.quantize_nbits is not None),
        }


@contextlib.contextmanager
def _warnings_to_log() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        yield
