"""llmctl convert: turn a model into another engine's format and store the result."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

import typer

from llmctl.cli.options import JsonOpt, ModelArg
from llmctl.cli.output import Output
from llmctl.convert.coreml.attention import AttentionImplementation  # an enum; no torch
from llmctl.convert.onnx import Provider  # an enum; no onnxruntime
from llmctl.units import format_bytes

# `-q` may be given without a value (`--to mlx -q`, `--to onnx -q`): the app then passes "".
OPTIONAL_VALUES = {"-q": "", "--quantize": ""}


class Target(StrEnum):
    """`--to`: one member per row of llmctl.convert.TARGETS."""

    mlx = "mlx"
    onnx = "onnx"
    coreml = "coreml"


class Via(StrEnum):
    llmctl = "llmctl"
    apple = "apple"


def convert(
    model: ModelArg,
    to: Annotated[Target, typer.Option(
        "--to", help="The format to convert to.", case_sensitive=False,
        show_default=False)],
    quantize: Annotated[str | None, typer.Option(
        "--quantize", "-q", metavar="[PRECISION]", help="Quantize the weights. mlx: bare -q "
        "is 4 bits, -q 8 (or --q-bits 8) other bits; onnx: int4 (bare -q, and the default), "
        "int8, fp16 or fp32.", show_default=False)] = None,
    q_bits: Annotated[int | None, typer.Option(
        "--q-bits", metavar="BITS", help="Bits per weight when quantizing: 2, 3, 4, 5, 6 "
        "or 8; implies -q. [default: 4]", show_default=False)] = None,
    q_group_size: Annotated[int | None, typer.Option(
        "--q-group-size", metavar="SIZE", help="Weights per quantization group: 32, 64 or "
        "128; implies -q. [default: 64; 32 for a GGUF model, whose own blocks are 32 wide]",
        show_default=False)] = None,
    provider: Annotated[Provider | None, typer.Option(
        "--execution-provider", case_sensitive=False, help="onnx: where the result will run: "
        "cpu, cuda or dml (DirectML). [default: cpu]", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(
        "--name", metavar="NAME[:TAG]", help="Store the result under this name. [default: "
        "the model's name, its tag + -mlx-q4, -onnx-int4, -coreml-split_einsum_v2...]",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Convert again even if the result is stored.")] = False,
    json: JsonOpt = False,
    attention: Annotated[AttentionImplementation | None, typer.Option(
        "--attention-implementation", case_sensitive=False,
        help="coreml: SPLIT_EINSUM_V2 or SPLIT_EINSUM (the Neural Engine's layout), or "
        "ORIGINAL. [default: SPLIT_EINSUM_V2]", show_default=False)] = None,
    chunk_unet: Annotated[bool | None, typer.Option(
        "--chunk-unet/--no-chunk-unet", help="coreml: split the UNet in two "
        "of about equal weight size. [default: on for iOS targets]", show_default=False)
    ] = None,
    quantize_nbits: Annotated[int | None, typer.Option(
        "--quantize-nbits", metavar="BITS", help="coreml: palettize the text "
        "encoder and the UNet (chunks too): 1, 2, 4, 6 or 8 bits.")] = None,
    target: Annotated[str | None, typer.Option(
        "--min-deployment-target", metavar="TARGET", help="coreml: macOS13, "
        "macOS14, iOS16 or iOS17 (6 bits need macOS14/iOS17). [default: macOS13]",
        show_default=False)] = None,
    latent_h: Annotated[int | None, typer.Option(
        "--latent-h", metavar="N", help="coreml: latent height (image height"
        " / 8). [default: the UNet's sample size]", show_default=False)] = None,
    latent_w: Annotated[int | None, typer.Option(
        "--latent-w", metavar="N", help="coreml: latent width.",
        show_default=False)] = None,
    compute_unit: Annotated[str | None, typer.Option(
        "--compute-unit", metavar="UNIT", help="coreml: all, cpu_and_gpu, cpu_only or "
        "cpu_and_ne (Apple's capitals work too). [default: all]", show_default=False)] = None,
    vae_encoder: Annotated[bool, typer.Option(
        "--vae-encoder", help="coreml: also convert the VAE encoder.")] = False,
    safety_checker: Annotated[bool, typer.Option(
        "--safety-checker", help="coreml: also convert the safety checker.")
    ] = False,
    low_memory: Annotated[bool, typer.Option(
        "--low-memory", help="coreml: convert each component in a process of "
        "its own: the peak memory is the largest component's.")] = False,
    via: Annotated[Via, typer.Option(
        "--via", case_sensitive=False, help="coreml: convert with llmctl, or "
        "with Apple's torch2coreml where installed.")] = Via.llmctl,
) -> None:
    """Convert a model to another engine's format and store the result.

    --to coreml takes a diffusers Stable Diffusion pipeline and writes the Core ML resource
    folder Apple's pipelines read (TextEncoder, Unet or UnetChunk1/2, VAEDecoder, vocab.json,
    merges.txt); an interrupted conversion keeps its finished components for the next run.

    --to mlx and --to onnx take a text model, GGUF (dequantized through transformers first)
    or a Hugging Face safetensors checkpoint, from the store, the catalog, hf:// or a path;
    mlx-lm converts to MLX, onnxruntime-genai's model builder to ONNX (int4 unless -q says
    otherwise, for the CPU unless --execution-provider says otherwise). The work happens
    under $LLMCTL_HOME/tmp; the result is stored only when complete, so an interrupted
    conversion leaves nothing behind. stdout gets the new model's name (--json: its
    manifest); progress goes to stderr.

    Examples:

    \b
        llmctl convert smollm2 --to mlx -q           # stored as smollm2:135m-mlx-q4
        llmctl run smollm2:135m-mlx-q4 "Hello"       # runs on the mlx engine
        llmctl convert ./my-hf-checkpoint --to mlx --q-bits 8 --name mine:8bit
        llmctl convert smollm2 --to onnx             # stored as smollm2:135m-onnx-int4
        llmctl convert smollm2 --to onnx -q fp16 --execution-provider cuda
        llmctl convert sd15 --to coreml --quantize-nbits 6 --min-deployment-target iOS17
    """
    from llmctl.cli.options import open_store
    from llmctl.convert import convert as run_conversion
    from llmctl.errors import UsageError

    coreml = {"--attention-implementation": attention, "--chunk-unet": chunk_unet,
              "--quantize-nbits": quantize_nbits, "--min-deployment-target": target,
              "--latent-h": latent_h, "--latent-w": latent_w, "--compute-unit": compute_unit,
              "--vae-encoder": vae_encoder or None, "--safety-checker": safety_checker or None,
              "--low-memory": low_memory or None, "--via": via if via is Via.apple else None}
    options: Any
    if to is not Target.coreml and (given := [o for o, v in coreml.items() if v is not None]):
        raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                         "--to coreml")
    if provider is not None and to is not Target.onnx:
        raise UsageError("--execution-provider is for --to onnx")
    if to is Target.coreml:
        if quantize is not None or q_bits is not None or q_group_size is not None:
            raise UsageError("-q, --q-bits and --q-group-size are for --to mlx and onnx",
                             hint="--to coreml palettizes with --quantize-nbits")
        from llmctl.convert.coreml.options import CoremlOptions

        defaults = CoremlOptions()
        options = CoremlOptions(
            attention=attention or defaults.attention, chunk_unet=chunk_unet,
            quantize_nbits=quantize_nbits, latent_h=latent_h, latent_w=latent_w,
            min_deployment_target=target or defaults.min_deployment_target,
            compute_unit=_compute_unit(compute_unit) or defaults.compute_unit,
            vae_encoder=vae_encoder, safety_checker=safety_checker,
            one_process_per_component=low_memory, via_apple=via is Via.apple)
    elif to is Target.onnx:
        from llmctl.convert.onnx import options_from_cli

        options = options_from_cli(quantize, provider, q_bits, q_group_size)
    else:
        options = _mlx_options(quantize, q_bits, q_group_size)
    out = Output(json_mode=json)
    layout, catalog = open_store()
    with out.progress() as report:
        result = run_conversion(model, to.value, layout, catalog, options=options, name=name,
                                force=force, on_event=report)
    for warning in result.warnings:
        out.warn(warning)
    for note in result.notes:
        out.info(f"note: {note}")
    manifest = result.manifest
    bits = f", {result.bits_per_weight:g} bits per weight" if result.bits_per_weight else ""
    peak = f" (peak memory {format_bytes(result.peak_memory)})" if result.peak_memory else ""
    out.info(f"{manifest.reference}: {format_bytes(manifest.size)}{bits}, converted from "
             f"{result.source} in {result.seconds:.0f}s{peak}")
    out.item(manifest.to_dict(), manifest.reference)


def _mlx_options(quantize: str | None, q_bits: int | None, q_group_size: int | None) -> Any:
    """-q (bare: 4 bits; -q 8, -q int8, -q 8bit: those bits), --q-bits, --q-group-size."""
    from llmctl.convert.mlx import DEFAULT_BITS, MlxOptions
    from llmctl.errors import UsageError

    named = re.fullmatch(r"(?:int|q)?(\d+)(?:-?bits?)?", (quantize or "").strip().lower())
    if quantize and named is None:
        raise UsageError(f"-q {quantize} is not a number of bits",
                         hint="use -q (4 bits), -q 8 or --q-bits 8")
    if named and q_bits not in (None, int(named[1])):
        raise UsageError(f"-q {quantize} and --q-bits {q_bits} disagree",
                         hint="give the bits once")
    bits = int(named[1]) if named else q_bits
    return MlxOptions(quantize=quantize is not None or bits is not None or q_group_size
                      is not None, bits=DEFAULT_BITS if bits is None else bits,
                      group_size=q_group_size)


def _compute_unit(text: str | None) -> str | None:
    """coremltools' name (CPU_AND_NE) of a compute unit given in either spelling; an
    unknown one is passed on for CoremlOptions to refuse."""
    from llmctl.formats.coreml import COMPUTE_UNITS, compute_unit

    if text is None:
        return None
    key = compute_unit(text)
    return COMPUTE_UNITS[key] if key else text
