"""llmctl convert: turn a model into another engine's format and store the result."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

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
    executorch = "executorch"
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
        "int8, fp16 or fp32; executorch: 8da4w (bare -q: int8 activations, int4 weights) or "
        "fp32 (the default); coreml language models: fp16 (the default) or int4 "
        "(block-wise).", show_default=False)] = None,
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
    backend: Annotated[str | None, typer.Option(
        "--backend", metavar="BACKEND", help="executorch: the backend the program is lowered "
        "to: xnnpack (the CPU's fast kernels) or portable. [default: xnnpack]",
        show_default=False)] = None,
    context_length: Annotated[int | None, typer.Option(
        "--ctx", metavar="TOKENS", help="executorch and coreml (language models): the "
        "longest context the program holds (its KV cache is this long). [default: 512 "
        "for executorch, 512 for coreml]", show_default=False)] = None,
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
        "macOS14, iOS16 or iOS17 (6 bits need macOS14/iOS17) for Stable Diffusion; macOS15 "
        "or iOS18 for language models (their KV cache is Core ML state). [default: macOS13; "
        "macOS15]",
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
    Given a text model, --to coreml writes a Core ML language model instead: one
    Model.mlpackage whose KV cache is Core ML state (macOS 15 / iOS 18), fp16 or block-wise
    int4 weights, the tokenizer files beside it; it runs on macOS.

    --to mlx, --to onnx and --to executorch take a text model, GGUF (dequantized through
    transformers first) or a Hugging Face safetensors checkpoint, from the store, the
    catalog, hf:// or a path; mlx-lm converts to MLX, onnxruntime-genai's model builder to
    ONNX (int4 unless -q says otherwise, for the CPU unless --execution-provider says
    otherwise), transformers' ExecuTorch export and ExecuTorch's lowering to a .pte
    program (XNNPACK unless --backend says otherwise). The work happens
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
        llmctl convert smollm2 --to executorch -q 8da4w   # smollm2:135m-executorch-8da4w
        llmctl convert smollm2 --to coreml -q int4 --ctx 1024 --min-deployment-target iOS18
        llmctl convert sd15 --to coreml --quantize-nbits 6 --min-deployment-target iOS17
    """
    from llmctl.cli.options import open_store
    from llmctl.convert import convert as run_conversion
    from llmctl.convert import options_from_cli

    options = options_from_cli(to.value, {
        "-q": quantize, "--q-bits": q_bits, "--q-group-size": q_group_size,
        "--execution-provider": provider, "--backend": backend, "--ctx": context_length,
        "--attention-implementation": attention, "--chunk-unet": chunk_unet,
        "--quantize-nbits": quantize_nbits, "--min-deployment-target": target,
        "--latent-h": latent_h, "--latent-w": latent_w, "--compute-unit": compute_unit,
        "--vae-encoder": vae_encoder or None, "--safety-checker": safety_checker or None,
        "--low-memory": low_memory or None, "--via": via.value if via is Via.apple else None})
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
