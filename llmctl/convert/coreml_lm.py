"""Text models to Core ML: `llmctl convert MODEL --to coreml [-q fp16|int4] [--ctx N]
[--min-deployment-target macOS15|iOS18]`, for a language model (llmctl.convert.coreml's
`for_source` sends text models here; Stable Diffusion pipelines stay there).

The result is one stateful ML program on coremltools' public API, with the interface
llmctl.engines.coreml_text runs (and Apple's stateful Llama and Mistral examples use):
inputIds (1, N) and causalMask (1, 1, N, P + N) in, logits (1, N, vocabulary) out, the KV
cache held in Core ML state (keyCache, valueCache: layers x 1 x kv_heads x --ctx x
head_dim, float16), which needs the iOS 18 / macOS 15 runtime.

How, in a child process (`python -m llmctl.convert.coreml_lm`, so that torch's and
coremltools' output never reaches llmctl's, a Ctrl-C stops it too, and its memory goes
back when it ends):

1. transformers loads the checkpoint in float32 (a GGUF model is dequantized into one
   first, as `--to mlx` does). `stateful_model` wraps its modules (embeddings, attention
   projections, MLPs, norms, LM head: the weights and code of the architecture) in a
   forward of llmctl's own that reads and writes the KV cache as two registered buffers,
   in place, at the positions the mask's shape gives. Its own forward rather than
   transformers' (whose cache classes change from release to release), and its own
   RMSNorm: see `_rms_norm`.
2. torch.jit.trace captures it, with flexible N and P (the traced graph keeps the shape
   arithmetic), as coremltools' stateful-model guide does.
3. The check, before any export: the traced model is run as the engine runs it (the
   prompt in two predictions, then one token at a time) against transformers' own model
   recomputing the whole sequence at each step, for CHECK_STEPS greedy tokens; every next
   token must be the same (EngineFailure otherwise), and the largest logit difference is
   recorded. Then the same wrapper in float16, which is what Core ML computes in, must
   give finite logits (it records how many tokens agree).
4. ct.convert to an ML program, FLOAT16 compute precision, with the states; for `-q int4`
   coremltools' block-wise linear quantization (symmetric int4, blocks of 32 along each
   weight's input axis). On macOS the package is compiled to Model.mlmodelc and, where
   Core ML loads it, run greedily once more, recorded but not required to agree (float16
   and int4 round differently from float32).

The folder the frame (llmctl.convert) registers, as format "coreml" (kind text), once
complete: Model.mlpackage (or Model.mlmodelc), tokenizer.json, tokenizer_config.json,
special_tokens_map.json and chat_template.jinja where present, config.json,
generation_config.json where present, and conversion.json (options, interface, the
check, seconds, library versions). The package is written under a temporary name and
renamed when complete; the work folder goes when the conversion ends, however it ends.

Nothing here imports torch, transformers or coremltools at module level.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmctl.convert import Product, Request, Target, work_folder
from llmctl.convert.coreml.options import CoremlLmOptions
from llmctl.convert.process import killed_for_memory, read_pieces, stop
from llmctl.engines.coreml_text import (
    CAUSAL_MASK,
    COMPILED,
    INPUT_IDS,
    KEY_CACHE,
    LOGITS,
    PACKAGE,
    VALUE_CACHE,
    prediction_inputs,
)
from llmctl.errors import EngineFailure, EngineUnavailable, UsageError
from llmctl.formats import ModelFormat, hf
from llmctl.formats.coreml import REPORT
from llmctl.host import peak_memory_bytes
from llmctl.store.catalog import Catalog
from llmctl.store.layout import StoreLayout, reference_part
from llmctl.store.lookup import find_stored
from llmctl.store.names import NameRef, Reference
from llmctl.store.resolve import Runnable

CORE_ML_TEXT = ModelFormat("text", "coreml", "coreml")
# The architectures whose modules `stateful_model` knows: Llama's decoder (SmolLM2 is
# one), and the two that differ from it only in what the modules hold (Qwen2's biased
# projections) or in a sliding window llmctl refuses to exceed (Mistral).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# GGUF's general.architecture -> the checkpoint transformers dequantizes it into.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM"}
NEEDS = ("torch", "transformers", "coremltools", "tokenizers")
INSTALL = "pip install 'llmctl[coreml]'"
CHILD = "llmctl.convert.coreml_lm"
INT4_BLOCK = 32  # values per int4 block (one scale each)
CHECK_STEPS = 16
CHECK_PROMPT = "The capital of France is"
# The files beside the model the engine reads (and apps on Apple's tokenizers).
FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "config.json", "generation_config.json")
# coremltools' progress bars (in the child's output) -> the step they are part of.
BARS = {"Converting PyTorch Frontend ==> MIL Ops": "converting to Core ML: PyTorch ops to "
        "MIL", "Running MIL default pipeline": "optimizing the ML program",
        "Running compression pass linear_quantize_weights":
            f"quantizing the weights to int4 (blocks of {INT4_BLOCK})"}


class CoremlLmTarget(Target):
    to = "coreml"
    model_format = CORE_ML_TEXT
    options = CoremlLmOptions
    use = "run it on macOS with: llmctl run {reference}"
    flags = ("-q", "--ctx", "--min-deployment-target")

    def options_from_cli(self, given: dict[str, Any]) -> CoremlLmOptions:
        """-q fp16|int4 (fp16 when not given), --ctx, --min-deployment-target."""
        defaults = CoremlLmOptions()
        return CoremlLmOptions(
            quantize=(given.get("-q") or defaults.quantize).strip().lower(),
            context_length=given.get("--ctx", defaults.context_length),
            min_deployment_target=given.get("--min-deployment-target",
                                            defaults.min_deployment_target))

    def refuse_before_pulling(self, ref: Reference, layout: StoreLayout,
                              catalog: Catalog) -> None:
        if not isinstance(ref, NameRef) or find_stored(layout, catalog, ref) is not None:
            return
        match = catalog.find(ref.name, ref.tag)
        if match is not None and match.entry.kind != "text":
            raise UsageError(f"{match.reference} is a{'n' if match.entry.kind == 'image' else ''}"
                             f" {match.entry.kind} model", hint=_TAKES)

    def check_source(self, source: Runnable, options: CoremlLmOptions) -> str:
        """The architecture the conversion will wrap; UsageError for a source it does not
        convert, or a --ctx beyond the model's trained context."""
        if source.kind != "text" or source.format not in ("gguf", "safetensors"):
            hint = _TAKES
            if source.format == "coreml":
                hint = f"it is a Core ML model already: llmctl run {source.name}"
            article = "an" if source.kind == "image" else "a"
            raise UsageError(f"{source.name} is {article} {source.kind} model "
                             f"({source.format})", hint=hint)
        if source.format == "gguf":
            header = source.header
            found = header.architecture if header else None
            architecture = GGUF_ARCHITECTURES.get(found or "")
            if architecture is None:
                raise UsageError(f"{source.name} is a {found or 'GGUF model of no stated'} "
                                 "architecture, which llmctl does not convert to Core ML",
                                 hint=f"--to coreml takes {', '.join(ARCHITECTURES)}")
            trained = header.arch_value("context_length") if header else None
            check_context(source.name, options, trained if isinstance(trained, int) else 0)
        else:
            config = hf.read_config(source.path)
            if hf.mlx_quantized(config) or config.get("quantization_config"):
                raise UsageError(f"{source.name} is quantized"
                                 f"{' for MLX' if hf.mlx_quantized(config) else ''}",
                                 hint="convert the unquantized checkpoint")
            architecture = check_config(source.name, config, options)
            if not (source.path / "tokenizer.json").is_file():
                raise UsageError(f"{source.name} has no tokenizer.json",
                                 hint="the Core ML engine reads the tokenizer from "
                                 "tokenizer.json: convert a checkpoint that has one")
        missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
        if missing:
            raise EngineUnavailable("coreml", f"the conversion needs {', '.join(missing)}, "
                                    "which is not installed", INSTALL)
        return architecture

    @contextlib.contextmanager
    def work(self, request: Request) -> Iterator[Product]:
        source, options, layout, step = (request.source, request.options, request.layout,
                                          request.step)
        started = time.perf_counter()
        with layout.work_lock(f"convert-{reference_part(request.reference)}"), \
                work_folder(layout) as work:
            from llmctl.convert.mlx import hf_checkpoint

            hf_folder, _dtype = hf_checkpoint(source, work, step)
            check_config(source.name, hf.read_config(hf_folder), options)
            out = work / "coreml"
            out.mkdir()
            facts = convert_in_child(hf_folder, out, work / "partial", options, step)
            for name in FOLDER_FILES:
                if (hf_folder / name).is_file():
                    shutil.copy2(hf_folder / name, out / name)
            report = {"schema": 1, "source": source.name, **facts,
                      "seconds": facts["seconds"] | {
                          "total": round(time.perf_counter() - started, 1)}}
            (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
            origin = {"options": report["options"], "architecture": facts["architecture"],
                      "versions": facts["versions"]}
            yield Product(out, origin, {"peak_memory": peak_memory_bytes(children=True),
                                        "notes": _notes(report)})


TARGET = CoremlLmTarget()
_TAKES = ("--to coreml converts text models (GGUF, or Hugging Face safetensors "
          "checkpoints) and Stable Diffusion pipelines")


def check_config(name: str, config: dict[str, Any], options: CoremlLmOptions) -> str:
    """The checkpoint's architecture, when `stateful_model` wraps it and --ctx fits it;
    UsageError naming what does not."""
    text = hf.text_settings(config)
    architectures = config.get("architectures") or []
    found = architectures[0] if architectures else config.get("model_type", "unknown")
    if found not in ARCHITECTURES:
        raise UsageError(f"{name} is a {found}, which llmctl does not convert to Core ML",
                         hint=f"--to coreml takes {', '.join(ARCHITECTURES)}")
    check_context(name, options, hf.trained_context(config))
    window = text.get("sliding_window")
    sliding = found == "MistralForCausalLM" or "sliding_attention" in (
        text.get("layer_types") or [])
    if sliding and isinstance(window, int) and 0 < window < options.context_length:
        raise UsageError(f"--ctx {options.context_length} is more than {name}'s attention "
                         f"window of {window} tokens", hint=f"use --ctx {window} or less")
    return found


def check_context(name: str, options: CoremlLmOptions, trained: int) -> None:
    if trained and options.context_length > trained:
        raise UsageError(f"--ctx {options.context_length} is more than the {trained} tokens "
                         f"{name} was trained for", hint=f"use --ctx {trained} or less")


def _notes(report: dict[str, Any]) -> list[str]:
    check = report["check"]
    notes = [f"checked before export: {check['steps']} greedy tokens the same as "
             f"transformers' (largest logit difference {check['max_logit_difference']:.1e}"
             f"); in float16 {report['float16_check']['same']}/{check['steps']} the same"]
    if not report["compiled"]:
        notes.append("Core ML models are compiled (.mlmodelc) only on macOS; stored as "
                     ".mlpackage, which Core ML compiles when it loads it")
    return notes


# -- the parent's side of the child -------------------------------------------------------

def convert_in_child(hf_folder: Path, out: Path, partial: Path, options: CoremlLmOptions,
                     step: Callable[..., None]) -> dict[str, Any]:
    """Run the conversion child on `hf_folder`, writing the model into `out`; its facts.
    Its steps and coremltools' progress bars become progress events; an llmctl error it
    reports is raised here as the same error, any other failure as EngineFailure with its
    last error line."""
    command = [sys.executable, "-m", CHILD, str(hf_folder), str(out), str(partial),
               "--quantize", options.quantize, "--ctx", str(options.context_length),
               "--target", options.min_deployment_target]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    progress = ChildProgress(step)
    step(f"converting to Core ML, {options.quantize} with a {options.context_length}-token "
         "KV cache as state")
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, cwd=out.parent, env=env)
    try:
        read_pieces(child, progress.read)
        code = child.wait()
    except BaseException:  # Ctrl-C (or anything else): the child stops too
        stop(child)
        raise
    if progress.error is not None:
        raise progress.error
    if code != 0 or progress.done is None:
        why = ("killed, probably for lack of memory" if killed_for_memory(code)
               else progress.error_line())
        raise EngineFailure(f"the Core ML conversion failed: {why}")
    return progress.done


class ChildProgress:
    """Reads the child's output, a piece at a time: its `llmctl-step`, `llmctl-done` and
    `llmctl-error` lines, coremltools' progress bars, and the rest kept for an error
    message."""

    def __init__(self, step: Callable[..., None]):
        self.step = step
        self.done: dict[str, Any] | None = None
        self.error: Exception | None = None
        self.last: collections.deque[str] = collections.deque(maxlen=50)

    def read(self, piece: str) -> None:
        piece = piece.strip()
        if not piece:
            return
        kind, _, data = piece.partition(" ")
        if kind == "llmctl-step":
            self.step(json.loads(data)["status"])
        elif kind == "llmctl-done":
            self.done = json.loads(data)
        elif kind == "llmctl-error":
            self.error = _rebuild_error(json.loads(data))
        elif bar := re.match(r"(.+?):\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[", piece):
            if bar[1] in BARS:
                self.step(BARS[bar[1]], int(bar[2]), int(bar[3]))
        else:
            self.last.append(piece)

    def error_line(self) -> str:
        """The child's last words on what went wrong: a Python exception's line, else its
        last line."""
        for line in reversed(self.last):
            if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", line):
                return line
        return self.last[-1] if self.last else "no output"


def _rebuild_error(error: dict[str, Any]) -> Exception:
    if error.get("type") == "usage":
        return UsageError(error["message"], hint=error.get("hint"))
    return EngineFailure(error["message"])


# -- the child: the model wrapped, traced, checked, converted -------------------------------

def send(kind: str, data: dict[str, Any]) -> None:
    print(f"llmctl-{kind} " + json.dumps(data, default=str), flush=True)


def status(text: str) -> None:
    send("step", {"status": text})


def cache_shape(config: Any, context_length: int, head_dim: int) -> tuple[int, ...]:
    """The keyCache's and valueCache's shape: (layers, 1, kv_heads, context, head_dim)."""
    return (config.num_hidden_layers, 1, config.num_key_value_heads, context_length,
            head_dim)


def _rms_norm(x: Any, norm: Any) -> Any:
    """`norm` (an RMSNorm module) applied to `x`, computed so that float16 holds every
    value on the way. transformers' RMSNorm squares the hidden state in float32; Core ML's
    FLOAT16 compute precision computes that in float16, where SmolLM2's hidden states (up
    to about 25,000 in its middle layers) square to infinity: in float16 it got none of 16
    greedy tokens right. RMS norm does not change when x is scaled, so x is divided by its
    largest magnitude first (eps scaled alike): squares of at most 1, a mean of at least
    1 / hidden size."""
    import torch

    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-2)
    scaled = x / scale
    mean = (scaled * scaled).mean(dim=-1, keepdim=True)
    return norm.weight * (scaled * torch.rsqrt(mean + eps / (scale * scale)))


def stateful_model(model: Any, context_length: int) -> Any:
    """The causal LM `model` (transformers, an architecture of ARCHITECTURES) as a module
    with the engine's interface: forward(input_ids (1, N), causal_mask (1, 1, N, P + N))
    -> logits (1, N, vocabulary), writing the N tokens' keys and values into the
    keyCache and valueCache buffers at positions P..P+N-1 and attending over 0..P+N-1.

    Grouped-query attention without repeating the cache: the queries of the heads that
    share a key/value head are grouped against it (one matmul per group of heads), so no
    copy of the cache is made per query head."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    inner = model.model
    first = inner.layers[0].self_attn
    head_dim = first.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    groups = heads // kv_heads
    half = head_dim // 2  # a constant: a size read from a tensor would be traced as an op

    def rotate(x: Any, cos: Any, sin: Any) -> Any:
        turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + turned * sin

    class StatefulCausalLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            shape = cache_shape(config, context_length, head_dim)
            self.register_buffer(KEY_CACHE, torch.zeros(shape, dtype=torch.float32))
            self.register_buffer(VALUE_CACHE, torch.zeros(shape, dtype=torch.float32))
            # The rotary tables of every position, from the model's own rotary module
            # (whatever rope scaling it has), sliced per prediction.
            positions = torch.arange(context_length).unsqueeze(0)
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
            self.register_buffer("cos", cos[0], persistent=False)
            self.register_buffer("sin", sin[0], persistent=False)

        def forward(self, input_ids: Any, causal_mask: Any) -> Any:
            end = causal_mask.shape[-1]
            begin = end - input_ids.shape[-1]
            cos = self.cos[begin:end]
            sin = self.sin[begin:end]
            mask = causal_mask.unsqueeze(2)  # (1, 1, 1, N, P + N): one for every group
            keys_cache, values_cache = getattr(self, KEY_CACHE), getattr(self, VALUE_CACHE)
            hidden = inner.embed_tokens(input_ids)
            for i, layer in enumerate(inner.layers):
                attention = layer.self_attn
                x = _rms_norm(hidden, layer.input_layernorm)
                q = attention.q_proj(x).view(1, -1, heads, head_dim).transpose(1, 2)
                k = attention.k_proj(x).view(1, -1, kv_heads, head_dim).transpose(1, 2)
                v = attention.v_proj(x).view(1, -1, kv_heads, head_dim).transpose(1, 2)
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
                keys_cache[i:i + 1, :, :, begin:end, :] = k.unsqueeze(0)
                values_cache[i:i + 1, :, :, begin:end, :] = v.unsqueeze(0)
                keys = keys_cache[i, :, :, :end, :].unsqueeze(2)  # (1, kv, 1, P + N, d)
                values = values_cache[i, :, :, :end, :].unsqueeze(2)
                grouped = q.view(1, kv_heads, groups, -1, head_dim)
                scores = torch.matmul(grouped, keys.transpose(-1, -2)) * attention.scaling
                weights = torch.softmax(scores + mask, dim=-1)
                out = torch.matmul(weights, values).view(1, heads, -1, head_dim)
                out = out.transpose(1, 2).reshape(1, -1, heads * head_dim)
                hidden = hidden + attention.o_proj(out)
                hidden = hidden + layer.mlp(_rms_norm(hidden, layer.post_attention_layernorm))
            return model.lm_head(_rms_norm(hidden, inner.norm))

    return StatefulCausalLM().eval()


def _run(module: Any, tokens: list[int], past: int, dtype: Any = None) -> Any:
    """One prediction of `module` as the engine makes it: the logits of `tokens` after
    `past` cached positions (the engine's own inputs, as torch tensors)."""
    import torch

    inputs = prediction_inputs(tokens, past)
    mask = torch.from_numpy(inputs[CAUSAL_MASK]).to(dtype or torch.float32)
    return module(torch.from_numpy(inputs[INPUT_IDS]), mask)


def check_against(reference: Any, traced: Any, prompt: list[int], steps: int
                  ) -> dict[str, Any]:
    """Greedy tokens of `traced` (the stateful model) as the engine runs it, against
    `reference` (transformers' model, the whole sequence recomputed at each step): the
    prompt in two predictions (the second one after cached positions, as a reply after a
    kept cache is), then one token per prediction. Each step is fed the reference's token,
    so that every step is compared, not only those before a first difference."""
    import torch

    split = max(1, len(prompt) // 2)
    logits = _run(traced, prompt[:split], 0)
    if split < len(prompt):
        logits = _run(traced, prompt[split:], split)
    sequence, wanted, got, largest = list(prompt), [], [], 0.0
    for _ in range(steps):
        expected = reference(torch.tensor([sequence])).logits[0, -1]
        row = logits[0, -1]
        largest = max(largest, float((row - expected).abs().max()))
        wanted.append(int(expected.argmax()))
        got.append(int(row.argmax()))
        sequence.append(wanted[-1])
        logits = _run(traced, [wanted[-1]], len(sequence) - 1)
    return {"prompt": CHECK_PROMPT, "prompt_tokens": prompt,
            "predictions": [split, len(prompt) - split] if split < len(prompt) else [split],
            "steps": steps, "reference_tokens": wanted, "tokens": got, "same": got == wanted,
            "max_logit_difference": largest}


def check_float16(wrapper: Any, prompt: list[int], wanted: list[int]) -> dict[str, Any]:
    """The wrapper in float16, every value as Core ML's FLOAT16 precision holds it: the
    prompt and the reference tokens in one prediction, the next token after each."""
    import torch

    wrapper.half()
    logits = _run(wrapper, prompt + wanted[:-1], 0, torch.float16)[0, len(prompt) - 1:]
    got = [int(t) for t in logits.float().argmax(dim=-1)]
    return {"finite": bool(torch.isfinite(logits).all()), "tokens": got,
            "same": sum(a == b for a, b in zip(got, wanted, strict=True))}


def interface(spec: Any) -> dict[str, list[dict[str, Any]]]:
    """The model's inputs, outputs and states as its spec says them: name, shape (the
    default), the range of each flexible dimension, element type."""
    from coremltools.proto import FeatureTypes_pb2

    names = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType

    def array(name: str, kind: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": name, "shape": [int(d) for d in kind.shape],
                                 "dtype": names.Name(kind.dataType).lower()}
        ranges = [[int(r.lowerBound), int(r.upperBound)] for r in
                  kind.shapeRange.sizeRanges] if kind.HasField("shapeRange") else []
        if ranges:
            entry["ranges"] = ranges
        return entry

    description = spec.description
    return {"inputs": [array(f.name, f.type.multiArrayType) for f in description.input],
            "outputs": [array(f.name, f.type.multiArrayType) for f in description.output],
            "states": [array(f.name, f.type.stateType.arrayType) for f in description.state]}


def op_counts(spec: Any) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            counts.update(op.type for op in block.operations)
    return dict(counts)


def versions() -> dict[str, str]:
    import importlib.metadata
    import platform

    from llmctl import __version__

    found = {"llmctl": __version__, "python": platform.python_version(),
             "platform": f"{platform.system()}-{platform.machine()}"}
    for package in ("torch", "transformers", "coremltools", "numpy", "tokenizers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def convert(hf_folder: Path, out: Path, partial: Path, quantize: str, context_length: int,
            target: str) -> dict[str, Any]:
    """The conversion itself (in the child): Model.mlpackage written into `out` through
    `partial`; the facts conversion.json records."""
    import logging
    import warnings

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import numpy as np
    import torch
    import transformers
    from tokenizers import Tokenizer

    torch.set_grad_enabled(False)
    transformers.logging.set_verbosity_error()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    status("loading the checkpoint in float32 (transformers)")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_folder, dtype=torch.float32).eval()
    architecture = (model.config.architectures or [type(model).__name__])[0]
    if architecture not in ARCHITECTURES:  # check_config said yes to the config: the class
        raise UsageError(f"{hf_folder.name} loads as a {type(model).__name__}, which llmctl "
                         "does not convert to Core ML", hint=f"--to coreml takes "
                         f"{', '.join(ARCHITECTURES)}")
    wrapper = stateful_model(model, context_length)
    text = model.config.get_text_config()
    head_dim = model.model.layers[0].self_attn.head_dim
    shape = cache_shape(text, context_length, head_dim)
    lap("load")

    status(f"tracing the model with its KV cache as state (torch.jit.trace, "
           f"{context_length} positions)")
    example = (torch.zeros(1, 3, dtype=torch.int32),
               torch.from_numpy(prediction_inputs([0, 0, 0], 2)[CAUSAL_MASK]).float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about shape arithmetic
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    lap("trace")

    tokenizer = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    prompt = list(tokenizer.encode(CHECK_PROMPT).ids)
    steps = max(0, min(CHECK_STEPS, context_length - len(prompt)))
    status(f"checking the traced model against transformers' ({steps} greedy tokens)")
    check = check_against(model, traced, prompt, steps)
    if not check["same"]:
        first = next(i for i, (a, b) in enumerate(
            zip(check["tokens"], check["reference_tokens"], strict=True)) if a != b)
        raise EngineFailure(f"the traced model's greedy token {first + 1} differs from "
                            f"transformers' ({check['tokens'][first]} instead of "
                            f"{check['reference_tokens'][first]}); llmctl's wrapper does not "
                            f"compute {architecture} as transformers does")
    lap("check")

    import coremltools as ct

    status(f"converting to Core ML (coremltools {ct.__version__}, float16, "
           f"{target})")
    tokens = ct.RangeDim(lower_bound=1, upper_bound=context_length, default=1)
    positions = ct.RangeDim(lower_bound=1, upper_bound=context_length, default=1)
    mlmodel = ct.convert(
        traced, convert_to="mlprogram",
        inputs=[ct.TensorType(name=INPUT_IDS, shape=(1, tokens), dtype=np.int32),
                ct.TensorType(name=CAUSAL_MASK, shape=(1, 1, tokens, positions),
                              dtype=np.float16)],
        outputs=[ct.TensorType(name=LOGITS, dtype=np.float16)],
        states=[ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16),
                             name=name) for name in (KEY_CACHE, VALUE_CACHE)],
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    del traced
    lap("convert")
    if quantize == "int4":
        from coremltools.optimize.coreml import (
            OpLinearQuantizerConfig,
            OptimizationConfig,
            linear_quantize_weights,
        )

        status(f"quantizing the weights to int4 (blocks of {INT4_BLOCK})")
        config = OptimizationConfig(global_config=OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block",
            block_size=INT4_BLOCK))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's, for blocks of zeros
            mlmodel = linear_quantize_weights(mlmodel, config)
        lap("quantize")
    mlmodel.short_description = (f"{architecture} language model, {quantize}, a "
                                 f"{context_length}-token KV cache as state; converted by "
                                 "llmctl")
    mlmodel.input_description[INPUT_IDS] = "token ids to process (1, N)"
    mlmodel.input_description[CAUSAL_MASK] = ("additive mask (1, 1, N, P + N): P positions "
                                              "already cached, 0 where a token attends")
    mlmodel.output_description[LOGITS] = "next-token scores after each token (1, N, vocab)"
    mlmodel.user_defined_metadata["llmctl.context_length"] = str(context_length)
    mlmodel.user_defined_metadata["llmctl.quantize"] = quantize
    mlmodel.user_defined_metadata["llmctl.architecture"] = architecture

    status("saving the ML program")
    partial.mkdir(parents=True, exist_ok=True)
    building = partial / PACKAGE
    shutil.rmtree(building, ignore_errors=True)
    mlmodel.save(str(building))
    spec = mlmodel.get_spec()
    del mlmodel
    package = out / PACKAGE
    os.replace(building, package)  # whole, or not there at all
    lap("save")

    # After the export, with the traced model gone: the wrapper goes to float16 in place.
    status("checking the model in float16, as Core ML computes it")
    float16 = check_float16(wrapper, prompt, check["reference_tokens"]) if steps else {
        "finite": True, "tokens": [], "same": 0}
    if not float16["finite"]:
        raise EngineFailure("the model overflows float16 (its logits are not finite), the "
                            "precision Core ML computes it in")
    lap("float16_check")

    weights = package / "Data/com.apple.CoreML/weights/weight.bin"
    weight_bytes = weights.stat().st_size if weights.exists() else None
    compiled = False
    coreml_check: dict[str, Any] | None = None
    if sys.platform == "darwin":
        status("compiling to .mlmodelc (Core ML)")
        compiled_path = Path(ct.utils.compile_model(str(package), str(partial / COMPILED)))
        os.replace(compiled_path, out / COMPILED)
        coreml_check = _coreml_check(ct, out / COMPILED, prompt, check["reference_tokens"])
        shutil.rmtree(package)
        compiled = True
        lap("compile")

    return {
        "architecture": architecture,
        "options": {"quantize": quantize, "context_length": context_length,
                    "min_deployment_target": target},
        "model": {"layers": text.num_hidden_layers, "heads": text.num_attention_heads,
                  "kv_heads": text.num_key_value_heads, "head_dim": head_dim,
                  "hidden_size": text.hidden_size, "vocabulary": text.vocab_size},
        **interface(spec),
        "specification_version": spec.specificationVersion,
        "quantized_ops": op_counts(spec).get("constexpr_blockwise_shift_scale", 0),
        "weight_bytes": weight_bytes,
        "check": check, "float16_check": float16, "coreml_check": coreml_check,
        "compiled": compiled, "seconds": seconds, "versions": versions(),
    }


def _coreml_check(ct: Any, path: Path, prompt: list[int], wanted: list[int]
                  ) -> dict[str, Any]:
    """macOS only: the compiled model run as the engine runs it, the reference tokens fed
    in; how many next tokens agree. Recorded, not required (float16 and int4 round
    otherwise than float32). Not run where llmctl is tested (Linux)."""
    import numpy as np

    try:
        model = ct.models.CompiledMLModel(str(path), compute_units=ct.ComputeUnit.CPU_AND_GPU)
        state = model.make_state()
        logits = model.predict(prediction_inputs(prompt, 0), state=state)[LOGITS]
        got, past = [], len(prompt)
        for token in wanted:
            got.append(int(np.asarray(logits).reshape(-1, np.shape(logits)[-1])[-1].argmax()))
            logits = model.predict(prediction_inputs([token], past), state=state)[LOGITS]
            past += 1
    except Exception as exc:  # noqa: BLE001 (a record of what Core ML said, not a failure)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"tokens": got, "same": sum(a == b for a, b in zip(got, wanted, strict=True))}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {CHILD}")
    parser.add_argument("hf_folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("partial", type=Path)
    parser.add_argument("--quantize", choices=("fp16", "int4"), default="fp16")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--target", default="macOS15")
    args = parser.parse_args(argv)
    try:
        facts = convert(args.hf_folder, args.out, args.partial, args.quantize, args.ctx,
                        args.target)
    except UsageError as exc:
        send("error", {"type": "usage", "message": str(exc), "hint": exc.hint})
        return 2
    except EngineFailure as exc:
        send("error", {"type": "failure", "message": str(exc)})
        return 1
    send("done", facts)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
