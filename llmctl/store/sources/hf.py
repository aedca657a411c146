"""Hugging Face repositories, through huggingface_hub and its cache.

NOT IMPLEMENTED YET: a helper session is writing this module (see fetch below).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmctl.store.names import HubRef, sanitize_name
from llmctl.store.sources import LocalFiles, SourceMissing

# (file name, bytes done, bytes total)
FileProgress = Callable[[str, int, int], None]


def model_name(ref: HubRef) -> tuple[str, str]:
    """The name and tag a pull of `ref` is stored under: hf://Org/Repo:Q4_K_M@rev becomes
    org/repo:q4_k_m-rev (a revision other than main is part of the tag, so that two
    revisions of a repository can be kept side by side)."""
    org, repo = ref.repo.split("/")
    tag = sanitize_name(ref.selector.removesuffix(".gguf")) if ref.selector else "latest"
    if ref.revision and ref.revision != "main":
        tag = f"{tag}-{sanitize_name(ref.revision)[:12]}"
    return f"{sanitize_name(org)}/{sanitize_name(repo)}", tag


def fetch(ref: HubRef, *, on_progress: FileProgress) -> LocalFiles:
    raise SourceMissing("downloading from Hugging Face is not in this version of llmctl yet")


def fetch_catalog_source(options: dict[str, Any], quantization: str | None, *,
                         on_progress: FileProgress) -> LocalFiles:
    raise SourceMissing(f"hf://{options['repo']}: downloading from Hugging Face is not in "
                        "this version of llmctl yet")
