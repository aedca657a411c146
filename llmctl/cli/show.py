"""llmctl show: what a stored model is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from llmctl.cli.options import JsonOpt, ModelArg
from llmctl.cli.output import Output
from llmctl.errors import UsageError
from llmctl.units import format_bytes, format_count

if TYPE_CHECKING:
    from llmctl.store.details import ModelDetails


def show(
    model: ModelArg,
    json: JsonOpt = False,
    template: Annotated[bool, typer.Option("--template", help="Print only the chat template."
                                           )] = False,
    metadata: Annotated[bool, typer.Option("--metadata", help="Print every GGUF metadata key."
                                           )] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Hash the model's files now and check them against their sha256 "
                         "(exit 4 if one differs).")] = False,
) -> None:
    """Show a stored model: its files, source and the metadata in its GGUF header.

    Also its format and engine, and a speech model's dimensions where its layout states
    them.

    Examples:

    \b
        llmctl show smollm2
        llmctl show smollm2 --json | jq .summary.context_length
        llmctl show smollm2 --template
        llmctl show smollm2 --verify
    """
    from llmctl.cli.options import open_store
    from llmctl.store.details import describe
    from llmctl.store.lookup import resolve_stored
    from llmctl.store.model_files import verify_files
    from llmctl.store.register import PullEvent

    out = Output(json_mode=json)
    layout, catalog = open_store()
    if verify:
        stored = resolve_stored(layout, catalog, model)
        with out.progress() as report:
            verify_files(layout, stored, on_progress=lambda name, done, total: report(
                PullEvent(stored.reference, f"verifying {name}", done, total)))
    details = describe(layout, catalog, model)
    manifest = details.manifest
    if template:
        chat_template = details.metadata.get("tokenizer.chat_template")
        if chat_template is None:
            raise UsageError(f"{manifest.reference} has no chat template",
                             hint="its prompts are sent as plain text")
        out.line(chat_template)
        return
    from llmctl.engines import registry

    engine = manifest.engine_here
    backend = (registry.backend(registry.ENGINES[engine])
               if engine in registry.ENGINES else "unknown engine")
    out.document(dict(manifest.to_dict(), engine=engine, path=str(details.path),
                      verified=details.verified,
                      backend=backend,
                      summary=details.summary, gguf=details.metadata,
                      tensor_types=details.tensor_types, dims=details.dims),
                 lambda: _lines(details, metadata, backend))


def _lines(details: ModelDetails, metadata: bool, backend: str) -> Iterator[str]:
    """`show` for a person: sections of aligned keys and values."""
    manifest = details.manifest
    s = details.summary
    sections = {
        "Model": [
            ("name", manifest.reference),
            ("id", manifest.id),
            ("architecture", s["architecture"]),
            # 0: the files state no count llmctl reads (CTranslate2's model.bin, ggml).
            ("parameters", format_count(s["parameters"]) if s["parameters"] else None),
            ("quantization", s["quantization"]),
            ("context length", s["context_length"]),
            ("embedding length", s["embedding_length"]),
            ("layers", s["block_count"]),
            ("chat template", "yes" if s["chat_template"] else "no"),
            ("licence", s["license"]),
        ],
        "Store": [
            ("engine", manifest.engine_here),
            ("backend", backend),
            ("format", manifest.format),
            ("size", format_bytes(manifest.size)),
            ("verified", "yes (every file's sha256 checked by llmctl)" if details.verified
             else f"no; check it: llmctl show {manifest.reference} --verify"),
            ("created", manifest.created),
            ("source", ", ".join(f"{k}={v}" for k, v in manifest.source.items())),
            *[(f.name, f"{f.digest} ({format_bytes(f.size)})") for f in manifest.files],
            ("path", str(details.path)),
        ],
    }
    if details.dims:
        # Whisper's own names (n_mels, n_audio_layer, ...), as its layouts state them.
        sections["Dimensions"] = [(k, str(v)) for k, v in details.dims.items()]
    if metadata:
        sections["Metadata"] = [(k, _short(v)) for k, v in details.metadata.items()]
    for title, rows in sections.items():
        yield f"  {title}"
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            if value is not None:
                yield f"    {key.ljust(width)}    {value}"
        yield ""


def _short(value: object) -> str:
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= 80 else text[:77] + "..."
