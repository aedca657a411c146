"""Text models to MLX: `llmctl convert MODEL --to mlx [-q]`.

A Hugging Face safetensors checkpoint goes straight to mlx-lm's `convert`. A GGUF model is
first dequantized into such a checkpoint by transformers (which reads GGUF, with
accelerate); transformers refuses to save a model it loaded from GGUF, so its weights go
into a fresh model built from the same config, and that one is saved, with the tokenizer
and chat template the GGUF carries. mlx-lm then converts (and quantizes) the checkpoint.
Everything is written to a work folder under $LLMCTL_HOME/tmp; the frame (llmctl.convert)
moves the result into the store, as format "mlx", only once it is complete.

torch, transformers and mlx are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.convert import Product, Request, Target, work_folder
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError
from llmctl.formats import ModelFormat, hf
from llmctl.store.layout import reference_part
from llmctl.store.resolve import Runnable

# What MLX's affine quantization takes (mx.quantize).
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64  # mlx-lm's
# GGUF quantizes weights in blocks of 32 (Q4_0, Q4_1, Q8_0, and the sub-blocks of the
# k-quants). Re-quantizing in groups of 32 keeps those blocks' own scales and offsets;
# groups of 64 quantize once more, and on SmolLM2 135M turned "The capital of France is
# Paris." into "Le Bourget, la Rochel,".
GGUF_GROUP_SIZE = 32
MLX = ModelFormat("text", "mlx", "mlx")
# GGUF general.file_type -> the dtype the dequantized weights are written in: all-f32
# and bf16 files keep theirs, quantized and f16 ones become float16.
_FILE_TYPE_DTYPES = {0: "float32", 32: "bfloat16"}


@dataclass(frozen=True)
class MlxOptions:
    quantize: bool = False
    bits: int = DEFAULT_BITS
    group_size: int | None = None  # None: 64, or 32 for a GGUF model (see GGUF_GROUP_SIZE)

    def check(self) -> None:
        if self.bits not in BITS:
            raise UsageError(f"--q-bits {self.bits} is not supported",
                             hint=f"MLX quantizes to {', '.join(map(str, BITS))} bits")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise UsageError(f"--q-group-size {self.group_size} is not supported",
                             hint=f"use {', '.join(map(str, GROUP_SIZES))}")

    @property
    def suffix(self) -> str:
        """The tag suffix of the result: `mlx`, `mlx-q4`."""
        return f"mlx-q{self.bits}" if self.quantize else "mlx"


class MlxTarget(Target):
    to = "mlx"
    model_format = MLX
    options = MlxOptions
    use = "run it with: llmctl run {reference}"
    flags = ("-q", "--q-bits", "--q-group-size")

    def options_from_cli(self, given: dict[str, Any]) -> MlxOptions:
        """-q (bare: 4 bits; -q 8, -q int8, -q 8bit: those bits), --q-bits,
        --q-group-size (either of the two implies -q)."""
        quantize, q_bits = given.get("-q"), given.get("--q-bits")
        group_size = given.get("--q-group-size")
        named = re.fullmatch(r"(?:int|q)?(\d+)(?:-?bits?)?", (quantize or "").strip().lower())
        if quantize and named is None:
            raise UsageError(f"-q {quantize} is not a number of bits",
                             hint="use -q (4 bits), -q 8 or --q-bits 8")
        if named and q_bits not in (None, int(named[1])):
            raise UsageError(f"-q {quantize} and --q-bits {q_bits} disagree",
                             hint="give the bits once")
        bits = int(named[1]) if named else q_bits
        return MlxOptions(quantize=bool(given), bits=DEFAULT_BITS if bits is None else bits,
                          group_size=group_size)

    def check_source(self, source: Runnable, options: MlxOptions) -> None:
        if source.kind != "text" or source.format not in ("gguf", "safetensors", "mlx"):
            raise UsageError(f"{source.name} is "
                             f"{'an image' if source.kind == 'image' else 'a'} "
                             f"{source.format} model",
                             hint="--to mlx converts text models: GGUF, or Hugging Face "
                             "safetensors checkpoints")
        if source.format != "gguf":
            config = hf.read_config(source.path)
            if config.get("quantization") or config.get("quantization_config"):
                raise UsageError(f"{source.name} is already quantized",
                                 hint="convert the unquantized checkpoint, or run this one: "
                                 f"llmctl run {source.name} --engine mlx")
            if source.format == "mlx" and not options.quantize:
                raise UsageError(f"{source.name} is already an MLX model",
                                 hint="add -q to quantize it")

    @contextlib.contextmanager
    def work(self, request: Request) -> Iterator[Product]:
        source, options, layout, step = (request.source, request.options, request.layout,
                                          request.step)
        group_size = options.group_size or (
            GGUF_GROUP_SIZE if source.format == "gguf" else DEFAULT_GROUP_SIZE)
        with layout.work_lock(f"convert-{reference_part(request.reference)}"), \
                work_folder(layout) as work:
            hf_folder, dtype = hf_checkpoint(source, work, step)
            out = work / "mlx"
            report = _MlxLmReport(step, options.bits, group_size)
            step("converting to MLX (mlx-lm)")
            _mlx_convert(hf_folder, out, options, group_size, dtype, report)
            origin: dict[str, Any] = {
                "quantization": {"bits": options.bits, "group_size": group_size}
                if options.quantize else None}
            if report.bits_per_weight is not None:
                origin["bits_per_weight"] = report.bits_per_weight
            yield Product(out, origin, {"bits_per_weight": report.bits_per_weight})


TARGET = MlxTarget()


def hf_checkpoint(source: Runnable, work: Path, step: Callable[..., None]
                  ) -> tuple[Path, str | None]:
    """The source as a Hugging Face checkpoint folder, what mlx-lm and onnxruntime-genai's
    builder read: a GGUF model dequantized into work/hf (with progress steps), a
    checkpoint as it is; and the dtype a dequantized one was written in."""
    if source.format != "gguf":
        return source.path, None
    quantization = source.header.quantization if source.header else None
    status = f"dequantizing the {quantization or 'GGUF'} weights (transformers)"
    step(status)
    return dequantize_gguf(source, work,
                           on_progress=lambda done, total: step(status, done, total))


def dequantize_gguf(source: Runnable, work: Path,
                    on_progress: Callable[[int, int], None] | None = None) -> tuple[Path, str]:
    """Write the GGUF model as a Hugging Face checkpoint (config.json, model.safetensors,
    tokenizer files, chat_template.jinja) in work/hf; returns it and the dtype used.
    `on_progress(tensors done, tensors total)` follows the dequantization."""
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading needs it)
        import torch
        import transformers
    except ImportError as exc:
        raise EngineFailure(
            f"converting a GGUF model needs transformers, accelerate and torch ({exc.name} "
            "is not installed); install them: pip install 'llmctl[convert]'") from None

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # llmctl reports the steps itself
    file_type = source.header.metadata.get("general.file_type") if source.header else None
    dtype_name = _FILE_TYPE_DTYPES.get(file_type, "float16")
    dtype = getattr(torch, dtype_name)
    # transformers opens GGUF files by name in a folder; the store names blobs by digest.
    folder = work / "gguf"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(source.path.resolve())
    # transformers draws its own tqdm bar for the tensors on stderr: read it as progress.
    bar = _TextWatch(lambda text: _tensor_progress(text, on_progress))
    try:
        with contextlib.redirect_stderr(bar):
            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file="model.gguf")
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder,
                                                                   gguf_file="model.gguf")
    except (ValueError, KeyError, NotImplementedError) as exc:
        # An architecture or tensor type transformers cannot read from GGUF.
        raise UsageError(f"transformers cannot read {source.name} ({exc})",
                         hint="convert the model's Hugging Face checkpoint instead") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype_name
    # Built on the meta device (no memory, no random initialisation) and given the loaded
    # tensors, cast, in place of its empty ones.
    with torch.device("meta"):
        fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {key: value.to(dtype) for key, value in loaded.state_dict().items()}
    del loaded
    fresh.load_state_dict(state, strict=True, assign=True)
    fresh.tie_weights()
    out = work / "hf"
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, dtype_name


class _TextWatch(io.TextIOBase):
    """A stand-in for stdout or stderr that hands what a library prints to a function
    instead of the terminal."""

    def __init__(self, on_text: Callable[[str], None]):
        self.on_text = on_text

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.on_text(text)
        return len(text)


def _tensor_progress(text: str, on_progress: Callable[[int, int], None] | None) -> None:
    """tqdm's "...: 15%|█▌   | 41/272 [00:00<00:03, 63.19it/s]" -> on_progress(41, 272)."""
    if on_progress and (found := re.search(r"\|\s*(\d+)/(\d+)\s*\[", text)):
        on_progress(int(found[1]), int(found[2]))


class _MlxLmReport(_TextWatch):
    """Stands in for stdout while mlx-lm's convert runs: it prints its steps there
    ("[INFO] Quantizing", "Quantized model with 4.503 bits per weight."), and stdout is
    for llmctl's payload. The steps become progress events; the rest is dropped."""

    def __init__(self, step: Callable[[str], None], bits: int, group_size: int):
        super().__init__(self._read)
        self.step = step
        self.quantizing = f"quantizing to {bits} bits (groups of {group_size})"
        self.bits_per_weight: float | None = None

    def _read(self, text: str) -> None:
        if "[INFO] Quantizing" in text:
            self.step(self.quantizing)
        if found := re.search(r"([\d.]+) bits per weight", text):
            self.bits_per_weight = float(found[1])


def _mlx_convert(hf_folder: Path, out: Path, options: MlxOptions, group_size: int,
                 dtype: str | None, report: _MlxLmReport) -> None:
    try:
        from mlx_lm import convert as mlx_lm_convert
    except ImportError as exc:
        raise EngineUnavailable("mlx", f"mlx-lm cannot be imported ({exc})",
                                "pip install 'llmctl[mlx]'") from None
    try:
        with contextlib.redirect_stdout(report):
            mlx_lm_convert(str(hf_folder), str(out), quantize=options.quantize,
                           q_bits=options.bits, q_group_size=group_size, dtype=dtype)
    except ValueError as exc:  # mlx-lm's words for a model type it does not support
        raise EngineFailure(f"mlx-lm could not convert the model: {exc}") from None
