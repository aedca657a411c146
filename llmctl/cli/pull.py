"""llmctl pull: bring models into the store."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.cli.options import JsonOpt, QuietOpt, complete_model
from llmctl.cli.output import Output
from llmctl.errors import UsageError
from llmctl.units import format_bytes


def _rate(text: str) -> int:
    """Bytes per second from "500K", "10M", "1.5G" (binary units, as curl's --limit-rate)."""
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    number, unit = text.strip().upper().removesuffix("B"), ""
    if number and number[-1] in "KMG":
        number, unit = number[:-1], number[-1]
    import math

    try:
        amount = float(number) * units[unit]
        if not math.isfinite(amount):  # "inf", "nan": no speed at all
            raise ValueError(text)
        value = int(amount)
    except ValueError:
        raise UsageError(f"--rate-limit '{text}' is not a speed",
                         hint="use e.g. 500K, 10M, 1G") from None
    if value <= 0:
        raise UsageError("--rate-limit must be above zero", hint="use e.g. 500K, 10M, 1G")
    return value


def pull(
    models: Annotated[list[str], typer.Argument(
        metavar="MODEL", help="Catalog names (NAME[:TAG]), hf://ORG/REPO[:QUANT][@REV], "
        "https:// URLs (#sha256=HEX to verify) or paths to .gguf files.",
        autocompletion=complete_model, show_default=False)],
    name: Annotated[str | None, typer.Option(
        "--name", help="Store a model pulled from a path, hf:// or a URL as NAME[:TAG].")
    ] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Pull again even if the model is stored.")] = False,
    parts: Annotated[int, typer.Option(
        "--parts", min=1, max=16, help="Parts of a file downloaded at once (URLs).")] = 4,
    rate_limit: Annotated[str | None, typer.Option(
        "--rate-limit", metavar="RATE", help="Cap the download speed, e.g. 500K or 10M "
        "(bytes per second).")] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Store models from the catalog, Hugging Face, a URL or a local file.

    Files already on this machine (a path, a pip package, the Hugging Face cache) are
    linked into the store, never copied. An interrupted download continues where it
    stopped when the same command runs again. stdout gets the name of each stored model
    (--json: its manifest, one JSON line per model); progress goes to stderr.

    Examples:

    \b
        llmctl pull smollm2
        llmctl pull hf://HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_K_M
        llmctl pull https://example.com/model.gguf#sha256=3f9a... --rate-limit 10M
        llmctl pull ./models/mistral-7b-instruct.Q4_K_M.gguf --name mistral:7b
        llmctl pull -q smollm2 gemma3
    """
    from llmctl.cli.options import open_store
    from llmctl.store.pull import pull as pull_model
    from llmctl.store.sources import PullOptions

    if name and len(models) > 1:
        raise UsageError("--name needs exactly one MODEL",
                         hint="pull the others without --name")
    options = PullOptions(parts=parts, rate_limit=_rate(rate_limit) if rate_limit else None)
    out = Output(json_mode=json, quiet=quiet)
    layout, catalog = open_store()
    with out.progress() as report:
        for text in models:
            result = pull_model(
                text, layout, catalog, name=name, force=force, options=options,
                on_event=report,
            )
            manifest = result.manifest
            if result.status == "exists":
                out.info(f"{manifest.reference}: already in the store")
            else:
                how = {"hardlink": "linked", "symlink": "linked (symbolic link)",
                       "copy": "written", "existing": "reused a stored file",
                       "downloaded": "downloaded and verified"}[result.how]
                out.info(f"{manifest.reference}: {format_bytes(manifest.size)}, {how}")
            out.item(manifest.to_dict(), manifest.reference)
