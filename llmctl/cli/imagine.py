"""llmctl imagine: text to image; the PNG's path goes to stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.cli.options import JsonOpt, complete_model
from llmctl.cli.output import Output, step_progress

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

    from llmctl import __version__, gallery, loader
    from llmctl.cli.options import open_store, parse_compute_unit, read_prompt
    from llmctl.engines.image import (
        DEVICES,
        Image,
        ImageLoadOptions,
        ImageRequest,
        check_request,
    )
    from llmctl.errors import UsageError
    from llmctl.store.layout import StoreLayout
    from llmctl.store.names import parse_reference

    out = Output(json_mode=json)
    check_request(width, height, scheduler)
    if device is not None and device not in DEVICES:
        raise UsageError(f"unknown --device '{device}'",
                         hint=f"choose one of: {', '.join(DEVICES)}")
    units = parse_compute_unit(compute_units or compute_unit)
    text = read_prompt(prompt)
    if output is not None and count > 1 and output.suffix.lower() == ".png":
        out.info(f"note: {count} images: {output.stem}-1.png ... {output.stem}-{count}.png")
    options = ImageLoadOptions(device, low_memory, trust_pickle, units)
    with out.progress() as report:
        opened = loader.open_image(parse_reference(model), *open_store(), engine=engine,
                                   options=options, width=width, height=height, force=force,
                                   on_event=report, on_note=out.note)
    target, defaults, llm = opened.model, opened.defaults, opened.engine
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
            else None, "engine": opened.spec.name, "llmctl": __version__}
    done = 0
    with step_progress(out) as report:
        for event in gallery.render(llm, requests, paths, ids, base):
            if not isinstance(event, Image):
                label = f"image {done + 1}/{count}: " if count > 1 else ""
                report(label, event.index, event.total, event.elapsed, event.eta)
                continue
            done += 1
            out.item({**event.meta, "path": str(event.path)}, str(event.path))
    llm.close()
