"""The files made from the app: the completion spec the fast path reads
(`llmctl/data/completion.json`), the completion scripts (`completions/`) and the manual
pages (`man/`). Run after changing a command, an option or a help text:

    .venv/bin/python -m llmctl.cli.shell_files          # rewrite them
    .venv/bin/python -m llmctl.cli.shell_files --check  # exit 1 if any is stale

`tests/test_shell.py` fails while a checked-in file differs from what this makes.
Builds every command (imports typer and the command modules): never on a user's path.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from typer._click import Command, Context

from llmctl import __version__
from llmctl.cli import app as application
from llmctl.cli.completion import SCRIPTS, SHELLS

ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "completion.json"
SCRIPT_NAMES = {"bash": "llmctl.bash", "zsh": "_llmctl", "fish": "llmctl.fish"}

# What a command's model argument offers: run and chat run text models, imagine image
# models, show and rm only stored ones, pull names from the catalog; all take paths too.
MODEL_ARGUMENTS = {"pull": "catalog", "run": "text-model", "chat": "text-model",
                   "imagine": "image-model", "show": "stored-model", "rm": "stored-model",
                   "convert": "model", "bench": "model", "catalog rm": "catalog"}
PATH_ARGUMENTS = {"catalog export": "path", "catalog import": "path"}


def _choices() -> dict[str, list[str]]:
    """Option values by "command --option" (or "--option" for every command), from the
    library's own tables."""
    from llmctl.bench.formats import FORMATS
    from llmctl.bench.settings import prompt_set
    from llmctl.engines.image import COMPUTE_UNITS, DEVICES, SCHEDULERS
    from llmctl.engines.registry import ENGINES
    from llmctl.formats import FORMATS as MODEL_FORMATS

    text = [n for n, s in ENGINES.items() if "text" in s.kinds]
    image = [n for n, s in ENGINES.items() if "image" in s.kinds]
    return {
        "--engine": [*ENGINES], "run --engine": text, "chat --engine": text,
        "imagine --engine": image, "bench --engine": [*ENGINES, "all"],
        "--kind": ["text", "image"], "--scheduler": [*SCHEDULERS], "--device": [*DEVICES],
        "--compute-unit": [*COMPUTE_UNITS], "--compute-units": [*COMPUTE_UNITS],
        "bench --output": [*FORMATS], "bench --prompt-set": [*prompt_set()],
        "bench --compare": ["last"], "catalog add --format": [*MODEL_FORMATS],
        "completion SHELL": [*SHELLS], "--format": ["json"],
    }


def build_spec() -> dict[str, Any]:
    choices = _choices()
    commands = {}
    for name in application.COMMANDS:
        command = application._build(name)
        node = _node(name, command, choices)
        group = getattr(command, "commands", None)
        if group:
            node["subcommands"] = {sub: _node(f"{name} {sub}", c, choices)
                                   for sub, c in group.items()}
        commands[name] = node
    top = application.typer.main.get_command(application.app)
    return {"prog": "llmctl", "version": __version__,
            "options": _options("", top, choices), "commands": commands}


def _node(path: str, command: Command, choices: dict[str, list[str]]) -> dict[str, Any]:
    arguments = []
    for param in command.params:
        if param.param_type_name != "argument":
            continue
        kind = MODEL_ARGUMENTS.get(path) if param.name in ("model", "models") else None
        kind = kind or PATH_ARGUMENTS.get(path)
        key = f"{path} {param.human_readable_name}"
        value = ({"kind": "choices", "choices": choices[key]} if key in choices
                 else {"kind": kind or _type_kind(param) or "none"})
        arguments.append({"name": param.human_readable_name, "many": param.nargs == -1,
                          "value": value})
    return {"help": (command.short_help or (command.help or "").split("\n")[0]).strip(),
            "options": _options(path, command, choices), "arguments": arguments}


def _options(path: str, command: Command, choices: dict[str, list[str]]
             ) -> list[dict[str, Any]]:
    found = []
    for param in command.params:
        if param.param_type_name != "option" or getattr(param, "hidden", False):
            continue
        help = _first_sentence(getattr(param, "help", None) or "")
        if getattr(param, "is_flag", False):
            found.append({"names": list(param.opts), "help": help, "value": None})
            if param.secondary_opts:
                found.append({"names": list(param.secondary_opts), "help": help,
                              "value": None})
            continue
        found.append({"names": list(param.opts), "help": help,
                      "value": _option_value(path, param, choices)})
    found.append({"names": ["-h", "--help"], "help": "Show the help and exit.", "value": None})
    return found


def _option_value(path: str, param: Any, choices: dict[str, list[str]]) -> dict[str, Any]:
    long = max(param.opts, key=len)
    for key in (f"{path} {long}", long):
        if key in choices:
            return {"kind": "choices", "choices": choices[key]}
    if long == "--resume":
        return {"kind": "conversation"}
    if long == "--json-schema":  # a file, mostly (or the schema itself, or -)
        return {"kind": "path"}
    if hasattr(param.type, "choices"):
        return {"kind": "choices", "choices": [str(c) for c in param.type.choices]}
    return {"kind": _type_kind(param) or "none"}


def _type_kind(param: Any) -> str | None:
    kind = type(param.type).__name__
    if "Path" in kind:
        return "dir" if not getattr(param.type, "file_okay", True) else "path"
    return None


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    return re.split(r"(?<=[.;])\s", text, maxsplit=1)[0].rstrip(".;")


# -- manual pages ----------------------------------------------------------------------------

ENVIRONMENT = [
    ("LLMCTL_HOME", "The store. Default: the platform's user data folder "
                    "(~/.local/share/llmctl on Linux)."),
    ("LLMCTL_DEBUG", "Set to 1: tracebacks for errors, and llama.cpp's own log on stderr."),
    ("LLMCTL_MEMORY_LIMIT", "The memory llmctl plans for instead of the detected one: bytes, "
                            "or with K/M/G or Ki/Mi/Gi, e.g. 8G."),
    ("LLMCTL_TOKEN", "The bearer token for catalog url entries with auth = true; sent to the "
                     "entry's own origin only."),
    ("NO_COLOR", "No colour or progress bars, even on a terminal."),
    ("HF_TOKEN", "The Hugging Face token for gated or private repositories."),
    ("HF_ENDPOINT", "Another Hugging Face Hub (a mirror)."),
    ("HF_HUB_OFFLINE", "Set to 1: no network for hf:// models (cached files only)."),
    ("HF_HOME", "The Hugging Face folder; its hub/ cache is where pull hf:// downloads and "
                "import --from hf-cache reads."),
]
FILES = [
    ("$LLMCTL_HOME/blobs/", "every model file once, named by its content (sha256-<hex>)"),
    ("$LLMCTL_HOME/manifests/NAME/TAG.json", "one per stored model: files, engine, format, "
                                             "source"),
    ("$LLMCTL_HOME/models/ID/", "a folder model as engines open it (links to its blobs)"),
    ("$LLMCTL_HOME/catalog/", "your catalog entries (user.json, *.toml)"),
    ("$LLMCTL_HOME/conversations/ID.json", "chat conversations"),
    ("$LLMCTL_HOME/gallery/", "imagine's images and their .json sidecars"),
    ("$LLMCTL_HOME/bench/history.db", "bench's runs (SQLite)"),
    ("$LLMCTL_HOME/tmp/", "work in progress: downloads, conversions"),
]
EXIT_CODES = [
    ("0", "success"), ("1", "runtime failure"), ("2", "usage error"),
    ("3", "model not found"), ("4", "verification failed (checksum, corrupt file)"),
    ("5", "not enough disk space or memory"), ("130", "interrupted (Ctrl-C)"),
]
SPECIAL = {"—": r"\(em", "–": r"\(en", "×": r"\(mu", "±": r"\(+-", "…": "...", "→": r"\(->",
           "≈": "~", "≤": "<=", "≥": ">=", "‘": "'", "’": "'", "“": '"', "”": '"'}


def roff(text: str) -> str:
    """Text for a roff line: backslashes and dashes escaped, other than ASCII as groff's
    named or Unicode characters."""
    text = text.replace("\\", r"\e").replace("-", r"\-")
    out = []
    for char in text:
        if char in SPECIAL:
            out.append(SPECIAL[char])
        elif ord(char) > 127:
            out.append(rf"\[u{ord(char):04X}]")
        else:
            out.append(char)
    return "".join(out)


def _line(text: str) -> str:
    text = roff(text)
    return r"\&" + text if text.startswith((".", "'")) else text


def _split_help(text: str) -> tuple[list[str], list[str]]:
    """(description paragraphs, example lines) of a command's docstring."""
    body, _, examples = text.partition("Examples:")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body.strip()) if p.strip()]
    paragraphs = [p for p in paragraphs if p != "\b"]
    lines = [line.strip() for line in examples.splitlines()
             if line.strip() and line.strip() != "\b"]
    return paragraphs[1:] if paragraphs else [], lines


def _page(page: str, title: str, summary: str, synopsis: str, paragraphs: list[str],
          options: list[tuple[str, str]], examples: list[str], see_also: list[str],
          commands: list[tuple[str, str]] | None = None,
          arguments: list[tuple[str, str]] | None = None) -> str:
    out = [f'.TH {page.upper()} 1 "" "llmctl {__version__}" "llmctl manual"',
           ".SH NAME", f"{roff(title)} \\- {roff(summary)}",
           ".SH SYNOPSIS", f".B {roff(synopsis)}"]
    out.append(".SH DESCRIPTION")
    for index, paragraph in enumerate(paragraphs or [summary]):
        if index:
            out.append(".PP")
        out.append(_line(paragraph))
    if commands:
        out.append(".SH COMMANDS")
        for name, help in commands:
            out += [".TP", f".B {roff(name)}", _line(help)]
    if arguments:
        out.append(".SH ARGUMENTS")
        for names, help in arguments:
            out += [".TP", f".B {roff(names)}", _line(help or "")]
    if options:
        out.append(".SH OPTIONS")
        for names, help in options:
            out += [".TP", f".B {roff(names)}", _line(help or "")]
    if examples:
        out += [".SH EXAMPLES", ".nf", ".RS 4"]
        out += [_line(line) for line in examples]
        out += [".RE", ".fi"]
    out.append(".SH ENVIRONMENT")
    for name, help in ENVIRONMENT:
        out += [".TP", f".B {roff(name)}", _line(help)]
    out.append(".SH FILES")
    for name, help in FILES:
        out += [".TP", f".I {roff(name)}", _line(help)]
    out.append(".SH EXIT STATUS")
    for code, help in EXIT_CODES:
        out += [".TP", f".B {code}", _line(help)]
    out.append(".SH SEE ALSO")
    out.append(",\n".join(rf"\fB{roff(name)}\fR(1)" for name in see_also))
    return "\n".join(out) + "\n"


def _option_records(command: Command, ctx: Context, kind: str = "option"
                    ) -> list[tuple[str, str]]:
    records = []
    for param in command.get_params(ctx):
        if param.param_type_name != kind:
            continue
        record = param.get_help_record(ctx)
        if record is not None:
            records.append((" ".join(record[0].split()), " ".join(record[1].split())))
    return records


def man_pages() -> dict[str, str]:
    """File name -> page: llmctl.1, llmctl-NAME.1 per command, llmctl-NAME-SUB.1 per
    subcommand."""
    top = application.typer.main.get_command(application.app)
    names = list(application.COMMANDS)
    pages: dict[str, str] = {}
    all_pages = ["llmctl"]
    entries: list[tuple[str, Command, str]] = []
    for name in names:
        command = application._build(name)
        entries.append((name, command, f"llmctl-{name}"))
        for sub, subcommand in (getattr(command, "commands", None) or {}).items():
            entries.append((f"{name} {sub}", subcommand, f"llmctl-{name}-{sub}"))
    all_pages += [page for _, _, page in entries]
    for path, command, page in entries:
        parent = Context(top, info_name="llmctl")
        for part in path.split(" ")[:-1]:
            parent = Context(application._build(part), info_name=part, parent=parent)
        ctx = Context(command, info_name=path.split(" ")[-1], parent=parent)
        usage = " ".join(command.collect_usage_pieces(ctx))
        paragraphs, examples = _split_help(command.help or "")
        summary = (command.help or "").strip().split("\n")[0].rstrip(".")
        subcommands = getattr(command, "commands", None)
        listed = ([(f"{path} {s}", (c.help or "").split("\n")[0]) for s, c in
                   subcommands.items()] if subcommands else None)
        related = ["llmctl", *(p for p in all_pages if p.startswith(page + "-"))]
        if "-" in page.removeprefix("llmctl-"):
            related.append(page.rsplit("-", 1)[0])
        pages[f"{page}.1"] = _page(page, page, summary, f"llmctl {path} {usage}",
                                   paragraphs, _option_records(command, ctx), examples,
                                   related, listed, _option_records(command, ctx, "argument"))
    ctx = Context(top, info_name="llmctl")
    commands = list(application.COMMANDS.items())
    pages["llmctl.1"] = _page(
        "llmctl", "llmctl", "run AI models on your own machine",
        "llmctl [--version] [-h] COMMAND [ARGS]...",
        ["A git-style command line for running AI models on your own machine: text models "
         "on llama.cpp and Apple MLX, image models on PyTorch/diffusers and Core ML, over "
         "one content-addressed model store. Each command has its own page; "
         "`llmctl COMMAND --help` says the same."],
        _option_records(top, ctx), [
            'llmctl run smollm2 "What is the capital of France?"',
            'cat notes.txt | llmctl run smollm2 "Summarise this."',
            "llmctl ls", "llmctl bench smollm2"],
        [p for p in all_pages if p != "llmctl"], commands)
    return pages


# -- writing ---------------------------------------------------------------------------------

def expected_files() -> dict[Path, str]:
    files = {SPEC_PATH: json.dumps(build_spec(), indent=1, ensure_ascii=False) + "\n"}
    for shell, name in SCRIPT_NAMES.items():
        files[ROOT / "completions" / name] = SCRIPTS[shell]
    for name, text in man_pages().items():
        files[ROOT / "man" / name] = text
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in expected_files().items():
        if not path.exists() or path.read_text("utf-8") != text:
            stale.append(path)
            if not check:
                path.write_text(text, "utf-8")
    for path in stale:
        print(f"{'stale' if check else 'wrote'}: {path.relative_to(ROOT)}", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
