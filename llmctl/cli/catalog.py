"""llmctl catalog: your own catalog entries, beside the shipped ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from llmctl.cli.options import JsonOpt, QuietOpt
from llmctl.cli.output import Output
from llmctl.units import format_bytes

if TYPE_CHECKING:
    from llmctl.store.user_catalog import Change

ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Replace an entry of the same name, even a shipped one.")]


def catalog() -> None:
    """Manage the catalog: add your own models, list, export and import entries.

    Your entries are kept in $LLMCTL_HOME/catalog/user.json and win over the shipped
    ones; `llmctl pull NAME` and `llmctl ls --available` see them like any other.

    Examples:

    \b
        llmctl catalog add mymodel:q4 --url https://host/mymodel-Q4_K_M.gguf --sha256 HEX
        llmctl catalog add qwen:7b --hf Qwen/Qwen2.5-7B-Instruct-GGUF \\
            --file qwen2.5-7b-instruct-q4_k_m.gguf
        llmctl catalog ls --user
        llmctl catalog export mine.json && llmctl catalog import mine.json
    """


def add(
    model: Annotated[str, typer.Argument(metavar="NAME[:TAG]", help="The name to pull it by.",
                                         show_default=False)],
    url: Annotated[str | None, typer.Option(help="Download from this http(s) URL.")] = None,
    sha256: Annotated[str | None, typer.Option(help="The file's sha256, checked on pull.")] = None,
    alternative_url: Annotated[list[str] | None, typer.Option(
        help="Another URL of the same file, tried in turn (repeat the option).")] = None,
    unzip: Annotated[bool, typer.Option(
        "--unzip", help="The URL is an archive (.zip, .tar.gz) to unpack.")] = False,
    auth: Annotated[bool, typer.Option(
        "--auth", help="The URL needs a token: LLMCTL_TOKEN, sent to its host only.")] = False,
    hf: Annotated[str | None, typer.Option(
        metavar="ORG/REPO", help="Download from this Hugging Face repository.")] = None,
    file: Annotated[str | None, typer.Option(help="With --hf: the file in the repo.")] = None,
    revision: Annotated[str | None, typer.Option(help="With --hf: a branch or commit.")] = None,
    kind: Annotated[str | None, typer.Option(help="text or image.")] = None,
    engine: Annotated[str | None, typer.Option(help="llama, mlx, diffusers, coreml.")] = None,
    format: Annotated[str | None, typer.Option(
        help="gguf, safetensors, mlx, diffusers, coreml (default: from the file name).")] = None,
    size: Annotated[str, typer.Option(help="Bytes (or 1.5G); shown by ls --available.")] = "0",
    min_ram: Annotated[str, typer.Option(help="Memory needed to run it (bytes, or 4G).")] = "0",
    description: Annotated[str, typer.Option(help="One line about the model.")] = "",
    force: ForceOpt = False,
) -> None:
    """Add a model of your own to the catalog.

    A .gguf URL is a text model for llama.cpp; for anything else give --format. Tokens
    are never stored: --auth marks an entry whose download reads LLMCTL_TOKEN.

    Examples:

    \b
        llmctl catalog add mymodel --url https://host/mymodel-Q4_K_M.gguf --size 4.1G
        llmctl catalog add sd:v1 --url https://host/sd.mlmodelc.zip --unzip --format coreml
        llmctl catalog add phi3:mine --hf microsoft/Phi-3-mini-4k-instruct-gguf \\
            --file Phi-3-mini-4k-instruct-q4.gguf
    """
    from llmctl.cli.options import open_store
    from llmctl.store import user_catalog

    entry = user_catalog.build_entry(
        model, url=url, hf=hf, sha256=sha256, alternative_urls=alternative_url, unpack=unzip,
        auth=auth, file=file, revision=revision, kind=kind, engine=engine, format=format,
        size=size, min_ram=min_ram, description=description)
    layout, _ = open_store()
    _report(Output(), user_catalog.save(layout, [entry], force=force))


def rm(
    models: Annotated[list[str], typer.Argument(metavar="NAME[:TAG]", show_default=False,
                                                help="Entries of yours to remove.")],
) -> None:
    """Remove entries of yours from the catalog (stored models stay).

    Examples:

    \b
        llmctl catalog rm mymodel:q4
    """
    from llmctl.cli.options import open_store
    from llmctl.store import user_catalog

    layout, _ = open_store()
    _report(Output(), user_catalog.remove(layout, models))


def ls(
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    user: Annotated[bool, typer.Option("--user", help="Only your own entries.")] = False,
) -> None:
    """List catalog entries and where each comes from.

    Examples:

    \b
        llmctl catalog ls
        llmctl catalog ls --user --json
    """
    from llmctl.cli.options import open_store

    out = Output(json_mode=json, quiet=quiet)
    _, known = open_store()
    entries = [e for e in known.entries if not (user and known.is_shipped(e))]
    out.records(
        entries, record=lambda e: dict(e.to_dict(), origin=str(known.origin(e)),
                                       shipped=known.is_shipped(e)),
        name=lambda e: e.reference,
        columns=("NAME", "KIND", "ENGINE", "FORMAT", "SIZE", "SOURCES", "FROM"),
        row=lambda e: (e.reference, e.kind or "?", e.engine or "?", e.format or "?",
                       format_bytes(e.size) if e.size else "-",
                       ", ".join(s.type for s in e.sources), known.label(e)))


def export(
    file: Annotated[str, typer.Argument(metavar="FILE", help="Where to write; - is stdout.")
                    ] = "-",
) -> None:
    """Write your entries as registry JSON, to a file or stdout.

    The shape other model managers read ({"custom": [{"id", "name", "url", ...}]}),
    plus llmctl's own fields, so that `catalog import` gives back the same entries.

    Examples:

    \b
        llmctl catalog export > mine.json
        llmctl catalog export mine.json
    """
    from pathlib import Path

    from llmctl.cli.options import open_store
    from llmctl.store import user_catalog

    out = Output()
    _, known = open_store()
    data = user_catalog.to_registry(user_catalog.own_entries(known))
    if file == "-":
        out.json(data)
    else:
        user_catalog.write_registry(Path(file).expanduser(), data)
        out.line(file)
    out.info(f"exported {len(data['custom'])} entr{'y' if len(data['custom']) == 1 else 'ies'}")


def import_(
    file: Annotated[str, typer.Argument(metavar="FILE", help="Registry JSON; - is stdin.",
                                        show_default=False)],
    force: ForceOpt = False,
) -> None:
    """Add entries from a registry JSON file, or stdin.

    The shape: {"custom": [{"id", "name", "url", "sha256", "requiresUnzip",
    "requiresAuth", "alternativeURLs"}]}; an id becomes NAME:TAG ("my-model" is
    my-model:latest), requiresUnzip unpacks, requiresAuth sends LLMCTL_TOKEN.
    Entries of yours with the same name are replaced; shipped ones only with --force.
    Every entry is checked first: one bad entry and nothing is imported.

    Examples:

    \b
        llmctl catalog import models.json
        curl -s https://host/models.json | llmctl catalog import -
    """
    from llmctl.cli.options import open_store
    from llmctl.store import user_catalog

    entries = user_catalog.read_registry(file)
    layout, _ = open_store()
    _report(Output(), user_catalog.save(layout, entries, force=force, replace_own=True))


def _report(out: Output, changes: list[Change]) -> None:
    """stdout: each entry's name; stderr: what happened to it."""
    for change in changes:
        out.line(change.entry.reference)
        note = ""
        if change.shadows:
            note = (f" (the entry in {change.shadows} is back in effect)"
                    if change.status == "removed" else f" (in place of {change.shadows})")
        out.info(f"{change.entry.reference}: {change.status}{note}")


SUBCOMMANDS = {"add": add, "rm": rm, "ls": ls, "export": export, "import": import_}
