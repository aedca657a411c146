"""llmctl imagine: text to image; the PNG's path goes to stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llmctl.cli.common import JsonOpt, complete_model
from llmctl.cli.output import Output, step_progress
from llmctl.units import format_bytes

if TYPE_CHECKING:
    from llmctl.engines.image import ImageEngine, ImageLoadOptions
    from llmctl.engines.registry import EngineSpec
    from llmctl.store.resolve import Runnable

DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 7.5

ImageModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="An image model: NAME[:TAG], a diffusers folder (model_index.json), "
    "or an ID prefix.", autocompletion=complete_model, show_default=False)]
Size = Annotated[int | None, typer.Option(
    min=8, help="Pixels, a multiple of 8. [default: the model's]", show_default=False)]


def imagine(
    model: ImageModelArg,
    prompt: Annotated[list[str] | None, typer.Argument(
        metavar="PROMPT", help="What to draw; piped stdin comes first, then this.",
        show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(
        min=1, help="Denoising steps. [default: the model's, else 30]",
        show_default=False)] = None,
    guidance: Annotated[float | None, typer.Option(
        min=0.0, help="How closely to follow the prompt (classifier-free guidance; 0 or 1 "
        "turns it off). [default: the model's, else 7.5]", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(
        min=0, max=2**32 - 1, help="Same seed, model and options: same image on the same "
        "device. [default: random]", show_default=False)] = None,
    width: Size = None,
    height: Size = None,
    negative: Annotated[str, typer.Option(help="What to keep out of the image.")] = "",
    count: Annotated[int, typer.Option(
        "--count", "-n", min=1, help="Images to make, with seeds SEED, SEED+1, ...")] = 1,
    scheduler: Annotated[str | None, typer.Option(
        help="ddim, ddpm, pndm, lms, euler, euler-a, heun, dpm++, dpm++-sde, unipc, lcm. "
        "[default: the model's]", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="A .png file, or a folder. [default: the gallery, see "
        "llmctl ls --images]", show_default=False)] = None,
    preview_every: Annotated[int, typer.Option(
        min=0, help="Write the image as it stands every N steps, beside the output.")] = 0,
    json: JsonOpt = False,
    engine: Annotated[str | None, typer.Option(
        help="diffusers or coreml. [default: by the model's format]", show_default=False)
    ] = None,
    device: Annotated[str | None, typer.Option(
        help="diffusers: cuda, mps or cpu. [default: the first available]",
        show_default=False)] = None,
    low_memory: Annotated[bool, typer.Option(
        "--low-memory", help="Attention slicing, VAE tiling, CPU offload on CUDA: slower, "
        "smaller.")] = False,
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Load pickled weights (.bin, .ckpt); they can run code.")
    ] = False,
    compute_unit: Annotated[str, typer.Option(
        "--compute-unit", metavar="UNIT", help="coreml: all, cpu_and_ne, cpu_and_gpu or "
        "cpu_only (Apple's capitals work too).")] = "all",
    compute_units: Annotated[str | None, typer.Option(
        "--compute-units", hidden=True, help="The old spelling of --compute-unit.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Load the model even when it looks too big for this machine's "
        "memory.")] = False,
) -> None:
    """Generate images from a text prompt and print the paths of the PNG files.

    Each PNG carries its generation parameters (prompt, seed, steps, guidance, size,
    scheduler, model and digest, engine, device, time) in its text chunks and in a JSON
    sidecar beside it. Progress goes to stderr; Ctrl-C stops at the next step and leaves
    no unfinished file. With --json, one line of parameters per image.

    Examples:

    \b
        llmctl imagine sd-turbo "a lighthouse at dusk, oil painting"
        llmctl imagine sd1.5 "a red fox in snow" --seed 42 -n 4 -o foxes/
        llmctl imagine ./my-pipeline "a cat" --steps 20 --preview-every 5 -o cat.png
        llmctl imagine sd1.5:coreml-split_einsum "a castle" --compute-unit cpu_and_ne
    """
    import secrets
    from datetime import datetime

    from llmctl import __version__, gallery
    from llmctl.engines.image import (
        COMPUTE_UNITS,
        DEVICES,
        Image,
        ImageLoadOptions,
        ImageRequest,
        check_request,
    )
    from llmctl.errors import UsageError
    from llmctl.formats.coreml import compute_unit as compute_unit_name
    from llmctl.store.layout import StoreLayout

    out = Output(json_mode=json)
    check_request(width, height, scheduler)
    if device is not None and device not in DEVICES:
        raise UsageError(f"unknown --device '{device}'",
                         hint=f"choose one of: {', '.join(DEVICES)}")
    units = compute_unit_name(compute_units or compute_unit)
    if units is None:
        raise UsageError(f"unknown --compute-unit '{compute_units or compute_unit}'",
                         hint=f"choose one of: {', '.join(COMPUTE_UNITS)}")
    from llmctl.cli.run import _read_prompt

    text = _read_prompt(prompt)
    if not text:
        raise UsageError("no prompt given", hint="pass PROMPT or pipe text on stdin")
    if output is not None and count > 1 and output.suffix.lower() == ".png":
        out.info(f"note: {count} images: {output.stem}-1.png ... {output.stem}-{count}.png")
    options = ImageLoadOptions(device, low_memory, trust_pickle, units)
    target, spec, defaults, llm = open_image_model(out, model, engine, options, width,
                                                   height, force)
    seed = secrets.randbelow(2**32) if seed is None else seed
    requests = [ImageRequest(
        text, seed + i, steps or defaults.get("steps", DEFAULT_STEPS),
        defaults.get("guidance", DEFAULT_GUIDANCE) if guidance is None else guidance,
        negative, width or defaults.get("width"), height or defaults.get("height"),
        scheduler or defaults.get("scheduler"), preview_every) for i in range(count)]
    created = datetime.now()
    ids = [gallery.new_id() for _ in requests]
    paths = gallery.plan_paths(output, StoreLayout.default(), ids, created)
    base = {"model": target.name, "model_digest": target.manifest.digest if target.manifest
            else None, "engine": spec.name, "llmctl": __version__}
    done = 0
    with step_progress(out) as report:
        for event in gallery.render(llm, requests, paths, ids, base):
            if not isinstance(event, Image):
                label = f"image {done + 1}/{count}: " if count > 1 else ""
                report(label, event.index, event.total, event.elapsed, event.eta)
                continue
            done += 1
            if json:
                out.json_line({**event.meta, "path": str(event.path)})
            else:
                out.line(str(event.path))
    llm.close()


def open_image_model(out: Output, model: str, engine: str | None, options: ImageLoadOptions,
                     width: int | None, height: int | None, force: bool
                     ) -> tuple[Runnable, EngineSpec, dict[str, Any], ImageEngine]:
    """Find the model (pulling a catalog model first), check that its engine runs here and
    that it fits in memory, then load it. Also returns the catalog's default parameters."""
    from llmctl.cli.common import open_store
    from llmctl.engines import registry
    from llmctl.engines.image import check_image_fits
    from llmctl.errors import UsageError
    from llmctl.formats.diffusers import default_size
    from llmctl.store.resolve import runnable

    layout, catalog = open_store()
    with out.progress() as report:
        target = runnable(model, layout, catalog,
                          on_event=report)
    if target.kind != "image":
        raise UsageError(f"{target.name} is a text model", hint=f"try: llmctl run {model}")
    spec = registry.choose(target.format, target.kind, engine)
    registry.check_available(spec)
    defaults: dict[str, Any] = {}
    if target.manifest is not None:
        match = catalog.find(target.manifest.name, target.manifest.tag)
        defaults = dict(match.entry.parameters) if match else {}
    size = default_size(target.path) or (512, 512)
    upcast = spec.name == "diffusers" and (options.device or _default_device()) == "cpu"
    estimate, allowed = check_image_fits(target.path, width or defaults.get("width", size[0]),
                                         height or defaults.get("height", size[1]), upcast,
                                         force)
    if allowed is not None and estimate.total > allowed:
        out.warn(f"{target.name} may not fit in memory (need about "
                 f"{format_bytes(estimate.total)}, have {format_bytes(allowed)}); loading "
                 "anyway (--force)")
    return target, spec, defaults, registry.load_image_engine(spec, target.path, options)


def _default_device() -> str:
    """What the diffusers engine will pick, told without importing torch: a CUDA or an
    Apple GPU means half precision; the CPU means float32 (weights count double)."""
    import platform
    import shutil

    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps"
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


