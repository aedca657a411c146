"""ExecuTorch programs as llmctl stores them: a folder holding model.pte (the program,
with the constant methods ExecuTorch's LLM runner reads: get_max_seq_len, get_vocab_size,
get_bos_id, get_eos_ids, use_kv_cache, enable_dynamic_shape), the tokenizer files, and
executorch.json, the record `convert --to executorch` writes of what it exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.formats import hf

PROGRAM = "model.pte"
RECORD = "executorch.json"


def program(folder: Path) -> Path | None:
    """The folder's program: model.pte, else its one .pte file; None when there is none
    or several."""
    if (folder / PROGRAM).is_file():
        return folder / PROGRAM
    found = sorted(folder.glob("*.pte"))
    return found[0] if len(found) == 1 else None


def read_record(folder: Path) -> dict[str, Any]:
    """executorch.json, or {} where it is missing or unreadable."""
    return hf.read_config(folder, RECORD)


def cache_context(folder: Path) -> int:
    """The tokens the program's static KV cache holds, as executorch.json records it (0:
    not said)."""
    value = read_record(folder).get("context_length")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
