"""The package's shape: imports point down (no cycle among glassgpt modules, function-level imports
included), no module re-exports names through a module `__getattr__`, and the engines keep to the
size budget.

    python tests/test_layout.py        # prints the import graph's cycles (none) and the budget
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "glassgpt"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The glassgpt modules a file imports anywhere in it (top level, inside functions, under
    TYPE_CHECKING): `from glassgpt.trace import spans` counts as glassgpt.trace.spans."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path) if path.is_relative_to(ROOT) else path.stem
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in known:  # glassgpt.x.y where y is a name in module glassgpt.x
                n = n.rpartition(".")[0]
            if n and n != me and n.startswith("glassgpt"):
                out.add(n)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def module_getattrs() -> list[str]:
    """Modules defining a module-level `__getattr__` (a re-export hiding a seam)."""
    found = []
    for m, p in modules().items():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
            found.append(m)
    return found


def long_functions() -> list[tuple[str, str, int]]:
    out = []
    for m, p in modules().items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append((m, node.name, n))
    return out


def long_modules() -> list[tuple[str, int]]:
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in modules().items()}
    return [(m, n) for m, n in sizes.items() if n > MAX_MODULE_LINES]


# ---------------------------------------------------------------- tests


def test_the_checker_finds_a_cycle():
    """The control: a planted two-module cycle, one import inside a function, is reported."""
    graph = {"glassgpt.a": {"glassgpt.b"}, "glassgpt.b": {"glassgpt.a"}, "glassgpt.c": {"glassgpt.a"}}
    assert cycles(graph) == [["glassgpt.a", "glassgpt.b"]]


def test_function_level_imports_count(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from glassgpt.trace import spans\n    import glassgpt.run\n")
    known = {"glassgpt", "glassgpt.trace", "glassgpt.trace.spans", "glassgpt.run"}
    assert imports_of(f, known) == {"glassgpt.trace.spans", "glassgpt.run"}


# Cycles known and still to be cut. The list only shrinks: a cycle not on it fails, and so does an
# entry whose cycle is gone (remove it then). Today it is empty.
KNOWN_CYCLES: list[list[str]] = []


def test_no_import_cycles():
    found = cycles(import_graph())
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles among glassgpt modules: " + "; ".join(" <-> ".join(c) for c in new)
    gone = [c for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_no_module_getattr_reexports():
    # glassgpt/__init__.py keeps its lazy `GPT` so that importing the package does not import torch
    assert [m for m in module_getattrs() if m != "glassgpt"] == []


def test_engines_and_viewer_within_the_size_budget():
    """The explanation engines, the viewer and the run/artifact layer: modules of at most 500 lines,
    functions of at most 80 (the split along their seams keeps each one job)."""
    ours = ("glassgpt.trace", "glassgpt.view", "glassgpt.artifacts", "glassgpt.run", "glassgpt.corpus",
            "glassgpt.pretrained", "glassgpt.export", "glassgpt.progress")
    assert [m for m in long_modules() if m[0].startswith(ours)] == []
    assert [f for f in long_functions() if f[0].startswith(ours)] == []


def test_prepare_scripts_do_not_reach_up_into_run():
    """Preparing data needs no model: data/*/prepare.py and glassgpt.prepare never import glassgpt.run."""
    graph = import_graph()
    reach, todo = set(), ["glassgpt.prepare"]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in reach:
                reach.add(m)
                todo.append(m)
    assert "glassgpt.run" not in reach
    for script in (ROOT / "data").glob("*/prepare.py"):
        assert "glassgpt.run" not in imports_of(script, set(modules())), script


if __name__ == "__main__":
    g = import_graph()
    found = cycles(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} import edges (function-level included)")
    print("cycles:", "none" if not found else "")
    for c in found:
        print("  " + " <-> ".join(c))
    print("module __getattr__:", module_getattrs())
    print("modules over budget:", long_modules())
    print("functions over budget:", long_functions())
    sys.exit(1 if found else 0)
