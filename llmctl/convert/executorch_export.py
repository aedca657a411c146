"""The ExecuTorch export of one Hugging Face text checkpoint, in a process of its own:

    python -m llmctl.convert.executorch_export HF_FOLDER OUT_FILE --quantize fp32|8da4w
        --backend xnnpack|portable --ctx TOKENS

llmctl.convert.executorch runs it so that torch.export's warnings and logs never reach
llmctl's output, a Ctrl-C reaches it too, and its memory is returned when it ends. It
prints `llmctl-step <json>` lines for progress and ends with one `llmctl-done <json>` line
(the program's methods and sizes); anything else it prints is kept for an error message.

The work is the libraries' own: transformers loads the checkpoint with a static KV cache
of `--ctx` tokens and exports it (`TorchExportableModuleForDecoderOnlyLM`, one token and
its cache position per call), torchao quantizes it first for 8da4w (int8 dynamic
activations, int4 weights in groups of 32), and ExecuTorch lowers the exported program
to XNNPACK (or keeps its portable kernels) and writes the .pte, with the constant methods
ExecuTorch's own LLM runner reads (max context, vocabulary, BOS and EOS ids).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

GROUP_SIZE = 32  # 8da4w's int4 weight groups


def step(status: str, **facts: Any) -> None:
    print("llmctl-step " + json.dumps({"status": status, **facts}), flush=True)


def export(hf_folder: Path, out: Path, quantize: str, backend: str, ctx: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    step("loading the checkpoint (transformers)")
    cache = GenerationConfig(use_cache=True, cache_implementation="static", max_length=ctx,
                             cache_config={"batch_size": 1, "max_cache_len": ctx})
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32,
                                                 generation_config=cache).eval()
    config = model.config
    if quantize == "8da4w":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        step("quantizing: int8 activations, int4 weights (torchao)")
        quantize_(model, Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE)))
    step("exporting with a static KV cache (torch.export)")
    with torch.no_grad():
        exported = TorchExportableModuleForDecoderOnlyLM(model).export(
            input_ids=torch.tensor([[1]], dtype=torch.long),
            cache_position=torch.tensor([0], dtype=torch.long))
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    partitioners = []
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )

        partitioners.append(XnnpackPartitioner())
    eos = config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    methods = {"get_max_seq_len": ctx, "get_max_context_len": ctx,
               "get_vocab_size": int(config.vocab_size),
               "get_bos_id": int(config.bos_token_id or 0), "get_eos_ids": eos_ids,
               "use_kv_cache": True, "enable_dynamic_shape": False}
    step(f"lowering to {backend} (ExecuTorch)")
    program = to_edge_transform_and_lower(
        exported, partitioner=partitioners, constant_methods=methods,
        compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    step("writing the program")
    part = out.with_name(out.name + ".partial")
    with open(part, "wb") as file:
        file.write(program.buffer)
    os.replace(part, out)
    return {"methods": methods, "size": out.stat().st_size,
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--quantize", choices=("fp32", "8da4w"), default="fp32")
    parser.add_argument("--backend", choices=("xnnpack", "portable"), default="xnnpack")
    parser.add_argument("--ctx", type=int, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    facts = export(args.hf_folder, args.out, args.quantize, args.backend, args.ctx)
    facts["seconds"] = round(time.perf_counter() - started, 1)
    print("llmctl-done " + json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
