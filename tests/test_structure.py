"""The layout holds: modules of at most 400 lines, at most 10 at the top of catdog_cache/, no import cycle (imports
inside functions and under TYPE_CHECKING count, and so does the package __init__ that importing a submodule runs),
no `_private` name imported from another module, no re-export shims. Read from the source with ast: nothing is
imported."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "catdog_cache"
MAX_LINES = 400
MAX_TOP = 10


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Module -> the package modules it imports (anywhere in it), and every (importer, module, _name) imported."""
    edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in mods else (base, a.name)
                           for a in node.names]
            else:
                continue
            for target, what in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if not target.startswith("catdog_cache") or target == name:
                    continue
                edges[name].add(target)
                # importing a.b.c runs a/__init__ and a/b/__init__ first (unless they are this module's own)
                dotted = target.split(".")
                for k in range(2, len(dotted)):
                    parent = ".".join(dotted[:k])
                    if parent in mods and not (name + ".").startswith(parent + "."):
                        edges[name].add(parent)
                if what and what.startswith("_") and not what.startswith("__"):
                    private.append((name, target, what))
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_modules_are_short_and_few_at_the_top():
    mods = modules()
    long = {name: n for name, path in mods.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
    top = [name for name, path in mods.items() if path.parent == PACKAGE and path.name != "__init__.py"]
    assert len(top) <= MAX_TOP, sorted(top)


def test_no_import_cycle_and_no_private_import():
    edges, private = imports(modules())
    assert cycles(edges) == []
    assert private == []


def test_the_check_sees_a_late_import_cycle(tmp_path):
    """The checker itself: a cycle closed by a function-level import, and a private name, are found."""
    edges = {"catdog_cache.a": {"catdog_cache.b"}, "catdog_cache.b": {"catdog_cache.a"}}
    assert cycles(edges) == [["catdog_cache.a", "catdog_cache.b"]]
    global PACKAGE
    real = PACKAGE
    try:
        PACKAGE = tmp_path / "catdog_cache"
        PACKAGE.mkdir()
        (PACKAGE / "__init__.py").write_text("")
        (PACKAGE / "a.py").write_text("from .b import _hidden\n")
        (PACKAGE / "b.py").write_text("def f():\n    from . import a\n_hidden = 1\n")
        edges, private = imports(modules())
        assert cycles(edges) == [["catdog_cache.a", "catdog_cache.b"]]
        assert private == [("catdog_cache.a", "catdog_cache.b", "_hidden")]
    finally:
        PACKAGE = real


def test_no_reexport_shims():
    """A name imported only to be imported from here again is a second home for it: import it from its own."""
    shims = [f"{path.relative_to(PACKAGE.parent)}:{n}" for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if "re-export" in line and "noqa" in line]
    assert shims == []
