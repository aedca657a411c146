"""Option types and helpers shared by the command modules: model arguments and their
completion, the generation options of run and chat, reading a prompt, opening the store.

Imported by every command at start-up: it must stay light (no engine, no store code at
import time).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from llmctl.engines.text import LoadOptions
    from llmctl.store.catalog import Catalog
    from llmctl.store.layout import StoreLayout


def complete_model(incomplete: str) -> list[str]:
    """Stored models first, then catalog models: what `llmctl run <TAB>` offers."""
    from llmctl.store import manifest
    from llmctl.store.catalog import Catalog
    from llmctl.store.layout import StoreLayout

    layout = StoreLayout.default()
    stored = [m.reference for m in manifest.iter_manifests(layout)]
    try:
        known = Catalog.default(layout.root).references()
    except Exception:  # a broken user catalog must not break completion
        known = []
    seen: dict[str, None] = dict.fromkeys(r for r in stored + known if r.startswith(incomplete))
    return list(seen)


def complete_stored_model(incomplete: str) -> list[str]:
    from llmctl.store import manifest
    from llmctl.store.layout import StoreLayout

    return [m.reference for m in manifest.iter_manifests(StoreLayout.default())
            if m.reference.startswith(incomplete)]


ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="A model: NAME[:TAG], a path to a .gguf file, or an ID prefix.",
    autocompletion=complete_model, show_default=False)]
StoredModelsArg = Annotated[list[str], typer.Argument(
    metavar="MODEL", help="Stored models: NAME[:TAG] or an ID prefix.",
    autocompletion=complete_stored_model, show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only names; no progress.")]


def open_store() -> tuple[StoreLayout, Catalog]:
    from llmctl.store.catalog import Catalog
    from llmctl.store.layout import StoreLayout

    layout = StoreLayout.default()
    return layout, Catalog.default(layout.root)


# -- run and chat ----------------------------------------------------------------------
# The bounds of the numeric options are checked in one place, GenerationOptions.validate
# and LoadOptions.validate (llmctl.engines.text), for every command and engine; the
# minimums here only show the range in --help.
SystemOpt = Annotated[str | None, typer.Option(help="A system prompt.")]
TemperatureOpt = Annotated[float, typer.Option(
    min=0.0, help="0 picks the likeliest token every time; at most 100.")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0)]
TopKOpt = Annotated[int, typer.Option(min=0, help="0 turns it off.")]
SeedOpt = Annotated[int | None, typer.Option(
    min=0, help="Same seed and options, same output; 0 to 4294967294. [default: random]",
    show_default=False)]
MaxTokensOpt = Annotated[int | None, typer.Option(
    min=1, help="Stop after this many tokens. [default: until the model stops]",
    show_default=False)]
CtxOpt = Annotated[int | None, typer.Option(
    min=16, help="Context length in tokens, at most the model's trained context. "
    "[default: the model's, at most 4096]", show_default=False)]
ThreadsOpt = Annotated[int | None, typer.Option(
    min=1, help="CPU threads, at most the CPUs this process may use. [default: the physical "
    "cores other processes leave free]", show_default=False)]
EngineOpt = Annotated[str | None, typer.Option(
    help="Engine to use. [default: chosen by the model's format]", show_default=False)]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Load time, tokens/s and peak memory on stderr.")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Load the model even when it looks too big for this machine's memory.")]
StopOpt = Annotated[list[str] | None, typer.Option(
    "--stop", metavar="SEQ", help="End the reply before this text (not printed); repeat for "
    "more.", show_default=False)]
SystemFileOpt = Annotated[Path | None, typer.Option(
    "--system-file", metavar="FILE", help="The system prompt, read from FILE.",
    show_default=False, dir_okay=False)]
FileOpt = Annotated[list[Path] | None, typer.Option(
    "--file", "-f", metavar="FILE", help="Prompt text from FILE, after piped stdin and "
    "before PROMPT; repeat for more.", show_default=False, dir_okay=False)]
PromptCacheOpt = Annotated[Path | None, typer.Option(
    "--prompt-cache", metavar="FILE", help="Load the prompt's KV state from FILE when it "
    "starts with the same tokens (only the rest is processed), and save it there after.",
    show_default=False, dir_okay=False)]
PromptCacheRoOpt = Annotated[bool, typer.Option(
    "--prompt-cache-ro", help="Load --prompt-cache FILE without updating it.")]


def prompt_cache_file(path: Path | None, read_only: bool) -> Path | None:
    from llmctl.errors import UsageError

    if read_only and path is None:
        raise UsageError("--prompt-cache-ro goes with --prompt-cache FILE",
                         hint="e.g. --prompt-cache doc.kv --prompt-cache-ro")
    return path


GpuLayersOpt = Annotated[str | None, typer.Option(
    "--gpu-layers", metavar="N|all", help="Model layers to run on the GPU (llama.cpp). "
    "[default: all when llama.cpp has a GPU backend, else none]", show_default=False)]


TorchDeviceOpt = Annotated[str | None, typer.Option(
    help="transformers: cuda, cuda:N, mps or cpu. [default: the first available]",
    show_default=False)]
DtypeOpt = Annotated[str | None, typer.Option(
    help="transformers: float32, float16, bfloat16 (fp32, fp16, bf16) or auto. [default: "
    "bfloat16 on CUDA, float16 on MPS, float32 on a CPU]", show_default=False)]
TrustPickleOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="transformers: load pickled weights (.bin); they can run code.")]
ComputeUnitOpt = Annotated[str | None, typer.Option(
    "--compute-unit", "--compute-units", metavar="UNIT", help="coreml: cpu_and_gpu, "
    "cpu_only, cpu_and_ne or all. [default: cpu_and_gpu]", show_default=False)]


def load_options(ctx: int | None, threads: int | None, gpu_layers: str | None,
                 device: str | None = None, dtype: str | None = None,
                 trust_pickle: bool = False, compute_unit: str | None = None
                 ) -> LoadOptions:
    """run's and chat's engine options, as loader.open_text takes them."""
    from llmctl.engines.text import LoadOptions

    unit = None if compute_unit is None else parse_compute_unit(compute_unit)
    return LoadOptions(ctx, threads, parse_gpu_layers(gpu_layers), device,
                       None if dtype == "auto" else dtype, trust_pickle, compute_unit=unit)


def parse_compute_unit(text: str) -> str:
    """--compute-unit in llmctl's spelling (Apple's capitals accepted); UsageError naming
    the choices for anything else."""
    from llmctl.errors import UsageError
    from llmctl.formats.coreml import COMPUTE_UNITS, compute_unit

    unit = compute_unit(text)
    if unit is None:
        raise UsageError(f"unknown --compute-unit '{text}'",
                         hint=f"choose one of: {', '.join(COMPUTE_UNITS)}")
    return unit


def parse_gpu_layers(text: str | None) -> int | None:
    """--gpu-layers as LoadOptions takes it: None (the default), a count, or ALL_LAYERS."""
    from llmctl.engines.text import ALL_LAYERS
    from llmctl.errors import UsageError

    if text is None:
        return None
    if text == "all":
        return ALL_LAYERS
    try:
        count = int(text)
    except ValueError:
        raise UsageError(f"--gpu-layers takes a number or all, not '{text}'",
                         hint="e.g. --gpu-layers all, or --gpu-layers 0 for the CPU") from None
    if count < 0:
        raise UsageError(f"--gpu-layers {count} is below 0", hint="use 0 or more, or all")
    return count


FormatOpt = Annotated[str | None, typer.Option(
    "--format", metavar="json", help="The reply is JSON that parses, enforced while "
    "sampling.", show_default=False)]
JsonSchemaOpt = Annotated[str | None, typer.Option(
    "--json-schema", metavar="FILE|JSON|-", help="The reply is JSON valid against this "
    "schema (a file, the schema itself, or - for stdin), enforced while sampling.",
    show_default=False)]


def output_format(format: str | None, schema: str | None) -> tuple[object | None, bool]:
    """(the OutputFormat asked for or None, whether the schema took stdin)."""
    from llmctl.errors import UsageError

    if format is not None and format != "json":
        raise UsageError(f"unknown --format '{format}'", hint="--format json, or "
                         "--json-schema for JSON of a given shape")
    if format is not None and schema is not None:
        raise UsageError("--format json and --json-schema both give the reply's format",
                         hint="use --json-schema alone: its JSON is JSON too")
    from llmctl.engines.constraint import OutputFormat, parse_schema, schema_from

    if schema is None:
        return (OutputFormat().check() if format else None), False
    if schema == "-":
        text_stdin()
        return parse_schema(sys.stdin.read(), "stdin"), True
    return schema_from(schema, "--json-schema"), False


def read_text_file(path: Path, option: str) -> str:
    """A prompt file's text (UTF-8, other bytes as U+FFFD); UsageError naming it when it
    cannot be read."""
    from llmctl.errors import UsageError

    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror or exc}",
                         hint="check the path") from None


def system_prompt(system: str | None, system_file: Path | None) -> str | None:
    """--system or --system-file (not both)."""
    from llmctl.errors import UsageError

    if system is not None and system_file is not None:
        raise UsageError("--system and --system-file both give the system prompt",
                         hint="use one of them")
    if system_file is not None:
        return read_text_file(system_file, "--system-file").strip()
    return system


def text_stdin() -> None:
    """Read stdin as UTF-8 whatever the locale, bytes that are not UTF-8 becoming U+FFFD:
    piped text with a stray byte (or a binary file) is still a prompt, instead of a
    UnicodeEncodeError on the surrogates Python would otherwise decode it to. No-op when
    stdin is closed (then `sys.stdin` is None)."""
    if sys.stdin is not None and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="replace")


def read_input(path: str, name: str) -> list[str]:
    """The lines of a text file, or of stdin for `-` (UTF-8, other bytes as U+FFFD);
    UsageError naming the file when it cannot be read."""
    from llmctl.errors import UsageError

    if path == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError(f"{name} - reads stdin, which is a terminal",
                             hint="pipe the prompts in, or give a file")
        text_stdin()
        return sys.stdin.read().splitlines()
    return read_text_file(Path(path), name).splitlines()


def read_prompt(words: list[str] | None, files: list[Path] | None = None,
                stdin: bool = True) -> str:
    """stdin first (when it is not a terminal, and not taken by --json-schema -), then
    each --file, then the arguments, as Ollama puts stdin before the argument; a
    UsageError when all are empty."""
    from llmctl.errors import UsageError

    parts = []
    if stdin and sys.stdin is not None and not sys.stdin.isatty():
        text_stdin()
        piped = sys.stdin.read().strip()
        if piped:
            parts.append(piped)
    for path in files or ():
        if text := read_text_file(path, "--file").strip():
            parts.append(text)
    if words:
        parts.append(" ".join(words))
    if not parts:
        raise UsageError("no prompt given", hint="pass PROMPT, --file FILE or pipe text on "
                         "stdin")
    return "\n\n".join(parts)
