"""llmctl convert: turn a model into another engine's format and store the result."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from llmctl.cli.common import JsonOpt, ModelArg
from llmctl.cli.output import Output, format_bytes


class Target(StrEnum):
    """`--to`: every target the command knows; those not implemented yet say so (exit 2)."""

    mlx = "mlx"
    coreml = "coreml"


def convert(
    model: ModelArg,
    to: Annotated[Target, typer.Option(
        "--to", help="The format to convert to.", case_sensitive=False,
        show_default=False)],
    quantize: Annotated[bool, typer.Option(
        "--quantize", "-q", help="Quantize the weights (mlx: 4 bits unless --q-bits).")
    ] = False,
    q_bits: Annotated[int | None, typer.Option(
        "--q-bits", metavar="BITS", help="Bits per weight when quantizing: 2, 3, 4, 5, 6 "
        "or 8; implies -q. [default: 4]", show_default=False)] = None,
    q_group_size: Annotated[int | None, typer.Option(
        "--q-group-size", metavar="SIZE", help="Weights per quantization group: 32, 64 or "
        "128; implies -q. [default: 64; 32 for a GGUF model, whose own blocks are 32 wide]",
        show_default=False)] = None,
    name: Annotated[str | None, typer.Option(
        "--name", metavar="NAME[:TAG]", help="Store the result under this name. [default: "
        "the model's name, its tag + -mlx or -mlx-q4]", show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Convert again even if the result is stored.")] = False,
    json: JsonOpt = False,
) -> None:
    """Convert a model to another engine's format and store the result.

    --to mlx takes a text model, GGUF (dequantized through transformers first) or a Hugging
    Face safetensors checkpoint, from the store, the catalog, hf:// or a path, and converts
    it with mlx-lm. The work happens under $LLMCTL_HOME/tmp; the result is stored only when
    complete, so an interrupted conversion leaves nothing behind. stdout gets the new
    model's name (--json: its manifest); progress goes to stderr.

    Examples:

    \b
        llmctl convert smollm2 --to mlx -q           # stored as smollm2:135m-mlx-q4
        llmctl run smollm2:135m-mlx-q4 "Hello"       # runs on the mlx engine
        llmctl convert ./my-hf-checkpoint --to mlx --q-bits 8 --name mine:8bit
    """
    from llmctl.cli.common import open_store
    from llmctl.errors import UsageError

    if to is not Target.mlx:
        raise UsageError(f"converting to {to.value} is not in this version of llmctl yet",
                         hint="available: --to mlx")
    from llmctl.convert.mlx import DEFAULT_BITS, MlxOptions
    from llmctl.convert.mlx import convert as convert_to_mlx

    options = MlxOptions(quantize=quantize or q_bits is not None or q_group_size is not None,
                         bits=DEFAULT_BITS if q_bits is None else q_bits,
                         group_size=q_group_size)
    out = Output(json_mode=json)
    layout, catalog = open_store()
    with out.progress() as report:
        result = convert_to_mlx(
            model, layout, catalog, options=options, name=name, force=force,
            on_event=lambda e: report(e.model, e.status, e.completed, e.total))
    manifest = result.manifest
    bits = f", {result.bits_per_weight:g} bits per weight" if result.bits_per_weight else ""
    out.info(f"{manifest.reference}: {format_bytes(manifest.size)}{bits}, converted from "
             f"{result.source} in {result.seconds:.0f}s")
    if json:
        out.json_line(manifest.to_dict())
    else:
        out.line(manifest.reference)
