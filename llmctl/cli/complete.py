"""Tab completion's fast path: `llmctl __complete SHELL INDEX -- WORD...` prints what the
word at INDEX can become, one `value<TAB>description` per line after a first line that
says how the shell should take them (`words`, or `files` / `dirs` for the shell's own
path completion).

It answers from `llmctl/data/completion.json` (the commands, options and argument kinds,
generated from the app by `llmctl.cli.shell_files`) and reads the store and the catalog
for model names, without importing typer, an engine, huggingface_hub or httpx: a
completion has to come back before the user notices it was asked for.

The shell scripts (`llmctl completion SHELL`) hand over the words as the user sees them,
split at spaces only: `smollm2:1` is one word here whatever bash's COMP_WORDBREAKS does
with the colon, and each value is the whole word (`smollm2:135m`). The bash script cuts
off what bash treats as words of their own before it shows them, so nothing is typed twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

Spec = dict[str, Any]


def spec() -> Spec:
    return json.loads(resources.files("llmctl.data").joinpath("completion.json")
                      .read_text("utf-8"))


def main(argv: list[str]) -> int:
    """`__complete SHELL INDEX -- WORD...`: the candidates on stdout; never an error (a
    completion that fails offers nothing)."""
    try:
        _shell, index, separator, *words = argv
        if separator != "--":
            return 2
        mode, values = complete(spec(), words, int(index))
    except (ValueError, OSError):
        return 1
    out = [mode, *(f"{value}\t{help}" if help else value for value, help in values)]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def complete(data: Spec, words: list[str], index: int) -> tuple[str, list[tuple[str, str]]]:
    """(mode, [(value, description)]) for words[index]; words[0] is the program."""
    words = words + [""] * (index + 1 - len(words))
    current, before = words[index], words[1:index]
    command, node, rest = _command(data, before)
    if node is None:  # no command yet: commands, or the program's own options
        if current.startswith("-"):
            return "words", _options(data["options"], current)
        return "words", _matching(((n, c["help"]) for n, c in data["commands"].items()),
                                  current)
    options = node["options"]
    if node.get("subcommands") and not rest and not current.startswith("-"):
        return "words", _matching(((n, c["help"]) for n, c in node["subcommands"].items()),
                                  current)
    if current.startswith("--") and "=" in current:  # --engine=ll
        name, _, partial = current.partition("=")
        option = _option(options, name)
        if option and option.get("value"):
            mode, values = _values(option["value"], partial)
            return mode, [(f"{name}={v}", h) for v, h in values]
        return "words", []
    position, waiting = _scan(options, rest)
    if waiting is not None:  # the value of the option before
        return _values(waiting["value"], current)
    if current.startswith("-"):
        return "words", _options(options, current)
    arguments = node["arguments"]
    if not arguments:
        return "words", []
    argument = arguments[min(position, len(arguments) - 1)]
    if position >= len(arguments) and not arguments[-1].get("many"):
        return "words", []
    return _values(argument["value"], current)


def _command(data: Spec, before: list[str]) -> tuple[str | None, Spec | None, list[str]]:
    """The command (and subcommand) the words name, and the words after it."""
    commands = data["commands"]
    for position, word in enumerate(before):
        if word.startswith("-"):
            continue
        node = commands.get(word)
        if node is None:
            return word, {"options": [], "arguments": []}, []
        rest = before[position + 1:]
        subcommands = node.get("subcommands") or {}
        for sub_position, sub in enumerate(rest):
            if sub.startswith("-"):
                continue
            if sub in subcommands:
                return f"{word} {sub}", subcommands[sub], rest[sub_position + 1:]
            break
        return word, node, rest
    return None, None, []


def _option(options: list[Spec], name: str) -> Spec | None:
    return next((o for o in options if name in o["names"]), None)


def _scan(options: list[Spec], rest: list[str]) -> tuple[int, Spec | None]:
    """How many arguments (not options, not option values) the words after the command
    hold, and the option still waiting for its value after them, if any."""
    count = 0
    waiting: Spec | None = None
    for word in rest:
        if waiting is not None:
            waiting = None
        elif word.startswith("-"):
            option = _option(options, word) if "=" not in word else None
            waiting = option if option and option.get("value") else None
        else:
            count += 1
    return count, waiting


def _options(options: list[Spec], current: str) -> list[tuple[str, str]]:
    pairs = [(name, option.get("help", "")) for option in options for name in option["names"]]
    if current == "-":  # a lone dash: the short options, then the long ones
        return sorted(_matching(pairs, current), key=lambda p: (p[0].startswith("--"), p[0]))
    return _matching(pairs, current)


def _matching(pairs: Iterable[tuple[str, str]], current: str) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for value, help in pairs:
        if value.startswith(current) and value not in seen:
            seen[value] = help
    return list(seen.items())


# -- values ----------------------------------------------------------------------------------

def _values(value: Spec, current: str) -> tuple[str, list[tuple[str, str]]]:
    kind = value["kind"]
    if kind == "choices":
        return "words", _matching(((c, "") for c in value["choices"]), current)
    if kind in ("path", "dir"):
        return ("files" if kind == "path" else "dirs"), []
    if kind == "conversation":
        return "words", _matching(_conversations(), current)
    if kind in MODEL_KINDS:
        if current.startswith((".", "/", "~")):  # a model given by path
            return "files", []
        return "words", _models(kind, current)
    return "words", []  # free text: nothing to offer


# What each kind of model argument offers: stored models of a kind, catalog models too.
MODEL_KINDS = {
    "model": (None, True),
    "text-model": ("text", True),
    "image-model": ("image", True),
    "stored-model": (None, False),
    "catalog": (None, True),
}


def _models(kind: str, current: str) -> list[tuple[str, str]]:
    """name:tag of stored models (and of catalog models where the kind pulls), and their
    bare names while no tag is typed."""
    from llmctl.store.layout import default_home

    wanted, catalog = MODEL_KINDS[kind]
    home = default_home()
    found = list(_stored(home, wanted))
    if catalog:
        found += [(ref, help) for ref, model_kind, help in _catalog_models(home)
                  if wanted is None or model_kind == wanted]
    if ":" not in current:
        names = [(ref.partition(":")[0], help) for ref, help in found]
        found = names + found
    return _matching(found, current)


def _stored(home: Path, wanted: str | None) -> Iterable[tuple[str, str]]:
    """The stored models, read straight from their manifests' JSON (what `ls` lists, less
    its checks: a completion only offers names)."""
    root = home / "manifests"
    for folder, folders, files in os.walk(root):
        folders.sort()
        for name in sorted(files):
            if name.startswith(".") or not name.endswith(".json"):
                continue
            try:
                data = json.loads(Path(folder, name).read_bytes())
                model, tag, kind = data["name"], data["tag"], data.get("kind")
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(model, str) and isinstance(tag, str) and wanted in (None, kind):
                yield f"{model}:{tag}", f"stored, {data.get('format', '')}"


def _catalog_models(home: Path) -> list[tuple[str, str, str]]:
    """(reference, kind, description) of every catalog model and variant. Loading the
    catalog costs more than the rest of a completion, so the list is kept in
    `tmp/completion-catalog.json` until a catalog file (or llmctl) changes."""
    from llmctl import __version__
    from llmctl.store.catalog_files import catalog_files

    try:
        key = [__version__, *([str(p), p.stat().st_mtime_ns, p.stat().st_size]
                              for p in catalog_files(home))]
    except OSError:
        key = None
    cache = home / "tmp" / "completion-catalog.json"
    try:
        kept = json.loads(cache.read_bytes())
        if kept["key"] == key:
            return [tuple(model) for model in kept["models"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    models = _load_catalog(home)
    if key is not None and (home / "tmp").is_dir():  # never make a store to keep a cache
        from llmctl.store.layout import write_atomically

        with contextlib.suppress(OSError):
            write_atomically(cache, json.dumps({"key": key, "models": models}).encode(),
                             sync=False)
    return models


def _load_catalog(home: Path) -> list[tuple[str, str, str]]:
    with warnings.catch_warnings():  # a bad entry must not print into the command line
        warnings.simplefilter("ignore")
        from llmctl.store.catalog import Catalog

        try:
            catalog = Catalog.default(home)
            entries = {e.reference: e for e in catalog.entries}
            refs = catalog.references()
        except Exception:  # a broken user catalog must not break completion
            return []
    models = []
    for ref in refs:
        entry = entries.get(ref) or entries.get(ref.rpartition("-")[0])
        if entry is not None:
            models.append((ref, entry.kind,
                           entry.description if entry.reference == ref else "variant"))
    return models


def _conversations() -> list[tuple[str, str]]:
    from llmctl.store.layout import default_home

    folder = default_home() / "conversations"
    try:
        return [(p.stem, "") for p in sorted(folder.glob("*.json"))]
    except OSError:
        return []
