"""What `show` tells of a stored model: its summary, metadata and tensor types, from the
GGUF header or, for folder models, config.json and the safetensors headers; for speech
models, the dimensions their layout states (llmctl.formats.whisper.model_dims)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.formats import exported_context, hf, safetensors
from llmctl.store.layout import StoreLayout
from llmctl.store.manifest import Manifest
from llmctl.store.model_files import check_file, is_verified, model_folder

if TYPE_CHECKING:
    from llmctl.store.catalog import Catalog


@dataclass(frozen=True)
class ModelDetails:
    manifest: Manifest
    path: Path
    verified: bool  # every file read back and found to hold its digest
    summary: dict[str, Any]  # architecture, parameters, quantization, context length, ...
    metadata: dict[str, Any]  # every key of the GGUF header; long arrays summarised
    tensor_types: dict[str, int]
    # A speech model's dimensions (n_mels, n_text_layer, ...); {} when its layout states
    # none (CTranslate2 keeps them inside model.bin).
    dims: dict[str, int] = field(default_factory=dict)


def describe(layout: StoreLayout, catalog: Catalog | None, reference: str) -> ModelDetails:
    from llmctl.formats.gguf import ArraySummary
    from llmctl.store.lookup import resolve_stored

    manifest = resolve_stored(layout, catalog, reference)
    if manifest.format != "gguf":
        folder = model_folder(layout, manifest)
        dims: dict[str, int] = {}
        if manifest.kind == "speech":
            from llmctl.formats.whisper import model_dims

            # A one-file model (whisper.cpp's) is read as that file, not as the folder.
            single = manifest.format == "ggml" and len(manifest.files) == 1
            dims = model_dims(folder / manifest.files[0].name if single else folder)
        return ModelDetails(manifest, folder, is_verified(layout, manifest),
                            *_folder_details(folder, exported_context(manifest.format, folder)),
                            dims=dims)
    path, header = check_file(layout, manifest)
    metadata = {k: (str(v) if isinstance(v, ArraySummary) else v)
                for k, v in header.metadata.items()}
    return ModelDetails(manifest, path, is_verified(layout, manifest), header.summary(),
                        metadata, header.tensor_types)


def _folder_details(folder: Path, context: int = 0
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """Summary, metadata and tensor types of a folder model, from its config.json and the
    headers of its .safetensors files (read as JSON: no library, no weights); `context`,
    where not 0, is the context it runs with. The chat template is kept under the key GGUF
    uses for it, so `show --template` finds it."""
    config = hf.read_config(folder)
    settings = hf.text_settings(config)

    def get(key: str) -> Any:  # the model's own (a VLM's architecture), else its text's
        return config.get(key, settings.get(key))

    quantization = config.get("quantization") or {}
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    parameters = 0
    tensor_types: dict[str, int] = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for name, (dtype, count) in safetensors.tensors(path).items():
            if name.endswith((".scales", ".biases")) and bits:
                continue  # MLX quantization's per-group scales and offsets, not parameters
            # MLX packs quantized weights `bits` at a time into uint32 words.
            parameters += count * 32 // bits if bits and dtype == "U32" else count
            tensor_types[dtype] = tensor_types.get(dtype, 0) + 1
    metadata = dict(config)
    template = hf.chat_template(folder)
    if template:
        metadata["tokenizer.chat_template"] = template
    summary = {
        "architecture": get("model_type"),
        "parameters": parameters,
        "quantization": f"{bits}-bit, groups of {quantization.get('group_size')}" if bits
        else get("dtype") or get("torch_dtype"),
        "context_length": context or get("max_position_embeddings"),
        "embedding_length": get("hidden_size"),
        "block_count": get("num_hidden_layers"),
        "chat_template": template is not None,
        "model_name": get("_name_or_path") or get("_model_name_or_path"),
        "license": None,
    }
    return summary, metadata, tensor_types
