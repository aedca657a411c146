"""The house's shape, kept: llmctl's modules import each other in layers, never in a circle
and never up a floor; command modules stay short. Read from the source with ast, so every
import counts, also the ones inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llmctl"

# Floors, from the top down: a module may import its own floor (without circles) and the
# floors below it, never one above.
FLOORS: list[tuple[str, ...]] = [
    ("llmctl.__main__", "llmctl.cli"),
    ("llmctl.loader", "llmctl.chat", "llmctl.gallery", "llmctl.transcript", "llmctl.convert",
     "llmctl.bench", "llmctl.batch"),
    ("llmctl.engines",),
    ("llmctl.store",),
    ("llmctl.formats", "llmctl.units", "llmctl.host", "llmctl.errors", "llmctl.data",
     "llmctl"),
]
# A command module parses, calls one library function and renders: this many lines at
# most. app.py (the dispatcher), output.py (the one output module), errors.py (the one
# error table), options.py (shared option types), complete.py (tab completion's fast
# path, which must not import the app) and shell_files.py (what is generated from the app:
# completion table, scripts, man pages) are not command modules.
COMMAND_LINES = 200
NOT_COMMANDS = {"app.py", "output.py", "errors.py", "options.py", "__init__.py",
                "complete.py", "shell_files.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The llmctl modules `name` imports (a package, when its submodule is not one)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


def floor(name: str) -> int:
    best = None
    for index, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                length = len(prefix)
                if best is None or length > best[1]:
                    best = (index, length)
    assert best is not None, f"{name} is on no floor: add it to FLOORS"
    return best[0]


GRAPH = {name: imports_of(name) for name in MODULES}


def test_no_module_imports_from_a_floor_above() -> None:
    upward = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
                    if floor(t) < floor(m))
    assert not upward, "imports that run back up a floor:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not circles, "modules that import each other in a circle: " + repr(circles)


@pytest.mark.parametrize("path", sorted(p for p in (PACKAGE / "cli").glob("*.py")
                                         if p.name not in NOT_COMMANDS),
                         ids=lambda p: p.name)
def test_command_modules_stay_short(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= COMMAND_LINES, (
        f"{path.name} has {lines} lines: what is not parsing, one library call and "
        "rendering belongs below cli/")


def test_the_checker_sees_imports_inside_functions() -> None:
    """The walk must see lazy imports (most of cli/'s are), or it proves nothing."""
    assert "llmctl.store.pull" in GRAPH["llmctl.cli.pull"]
    assert floor("llmctl.cli.pull") < floor("llmctl.store.pull")
