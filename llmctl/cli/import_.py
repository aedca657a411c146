"""llmctl import: register models that Ollama or the Hugging Face cache already hold."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from llmctl.cli.options import JsonOpt, QuietOpt
from llmctl.cli.output import Output
from llmctl.units import format_bytes


class Source(StrEnum):
    ollama = "ollama"
    hf_cache = "hf-cache"


def import_(
    source: Annotated[Source, typer.Option(
        "--from", help="Where the models are: ollama, or hf-cache.", show_default=False)],
    models: Annotated[list[str] | None, typer.Argument(
        metavar="[MODEL]...", help="Only these (NAME or NAME:TAG as they would be stored).",
        show_default=False)] = None,
    ollama_dir: Annotated[Path | None, typer.Option(
        help="Ollama's models folder (default: $OLLAMA_MODELS, ~/.ollama/models).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(
        help="The Hugging Face cache (default: $HF_HUB_CACHE, $HF_HOME/hub, "
             "~/.cache/huggingface/hub).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would be imported; change nothing.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Register models already on disk (Ollama's store, the Hugging Face cache).

    Files are linked into the store, never copied: an import takes no space. Ollama's
    GGUF models keep their names (llama3.2:3b); from the Hugging Face cache, each GGUF
    file is NAME:QUANT (org/repo:q4_k_m), a safetensors (MLX) or diffusers repository
    org/repo:latest. Models already imported are skipped. stdout gets the imported names.

    Examples:

    \b
        llmctl import --from ollama --dry-run
        llmctl import --from ollama llama3.2:3b
        llmctl import --from hf-cache --cache-dir /data/hf/hub --json
    """
    from llmctl.cli.errors import FAILURE, describe
    from llmctl.errors import UsageError
    from llmctl.store.imports import import_models, scan, select
    from llmctl.store.layout import StoreLayout

    if (ollama_dir and source != Source.ollama) or (cache_dir and source != Source.hf_cache):
        raise UsageError("--ollama-dir goes with --from ollama, --cache-dir with "
                         "--from hf-cache")
    out = Output(json_mode=json, quiet=quiet)
    root, found = scan(source.value, ollama_dir or cache_dir)
    found = select(found, models or [])
    out.info(f"{root}: {len(found)} model{'s' if len(found) != 1 else ''} found")
    with out.progress() as report:
        results = import_models(
            StoreLayout.default(), found, dry_run=dry_run,
            on_event=report)
    out.records(results, record=lambda r: r.to_dict(), name=lambda r: r.found.reference,
                listed=lambda r: r.status in ("imported", "would import"))
    for result in results:
        ref = result.found.reference
        if result.status == "imported":
            out.info(f"{ref}: imported, {format_bytes(result.found.size)} "
                     f"{'linked' if result.reason != 'copy' else 'written'}")
        elif result.status == "would import":
            out.info(f"{ref}: would import {format_bytes(result.found.size)} from "
                     f"{result.found.origin.get('model') or result.found.origin.get('repo')}")
        elif result.status == "exists":
            out.info(f"{ref}: already in the store")
        elif result.status == "skipped":
            out.warn(f"skipped {ref}: {result.reason}")
    codes = []
    for result in results:
        if result.status == "failed":  # told like any error; the others were imported
            code, message = describe(result.error) or (FAILURE, result.reason)
            out.error(f"{result.found.reference}: {message}")
            codes.append(code)
    if codes:
        raise typer.Exit(codes[0])
