"""The import layers of docs/architecture.md: no cycles, nothing imported from a higher layer.

Imports are read with `ast` from every module of the installed package (imports inside functions included: they
hide a cycle, they do not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import stm

PACKAGE = Path(stm.__file__).resolve().parent

# layer of each module, by its longest matching prefix (docs/architecture.md, "Which way the imports go")
LAYERS = {
    "stm.constants": 0,
    "stm.memory.base": 0,
    "stm.memory": 1,
    "stm.models": 1,
    "stm.loop": 2,
    "stm.data": 2,
    "stm.metrics": 2,
    "stm.tasks": 3,
    "stm.app": 4,
    "stm.analysis": 4,
    "stm": 5,  # the package's own __init__ (the version) and nothing else
}

# The debt this layout still carries (issue 12): each entry goes when it is fixed, and the tests below fail
# both on a new violation and on a fixed one still listed here.
KNOWN_CYCLES = []
KNOWN_UPWARD = []


def module_name(path: Path) -> str:
    parts = ("stm", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The stm modules `path` imports (a `from package import name` of a submodule counts as that submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "stm")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "stm":
            submodules = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in the module itself (or its __init__)
                found.add(node.module)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def layer(name: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{name} is in no layer of tests/test_layers.py LAYERS (add it, and to docs/architecture.md)")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_cycle_finder_finds_a_cycle_and_only_that():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [f"{a} -> {b}" for a, targets in sorted(edges.items()) for b in sorted(targets)
            if layer(b) > layer(a) and not b.startswith(a + ".")]  # a package may re-export its own modules


def test_the_layer_check_sees_an_upward_import():
    assert upward({"stm.memory.rmt": {"stm.tasks.lm", "stm.memory.base"}, "stm.tasks.lm": {"stm.loop.segments"}}) == [
        "stm.memory.rmt -> stm.tasks.lm"]


def test_import_cycles_are_the_known_ones_only():
    assert cycles(graph()) == KNOWN_CYCLES


def test_imports_from_a_higher_layer_are_the_known_ones_only():
    assert upward(graph()) == KNOWN_UPWARD


@pytest.mark.parametrize("name", ["stm.memory.armt", "stm.loop.segments", "stm.app.run", "stm.data.chunking"])
def test_modules_sit_where_the_architecture_puts_them(name):
    assert name in modules(), f"{name} is missing: docs/architecture.md and the layout disagree"
    layer(name)
