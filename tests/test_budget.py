"""The package's size, kept honest as tinygrad keeps its own: a module over 500 lines or a function
over 80 is a place to split, and the totals below only go down. When a change makes the package
smaller, lower the budget in the same commit."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "glassgpt"
PACKAGE_LINES = 13_000  # glassgpt/ was 12,953 lines when this budget was set
MODEL_LINES = 495  # model.py: 491
MODULE_LINES = 500
FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _lines(p: Path) -> int:
    return len(p.read_text(encoding="utf-8").splitlines())


def test_package_within_budget():
    total = sum(_lines(p) for p in _modules())
    assert total <= PACKAGE_LINES, f"glassgpt/ is {total} lines, over its budget of {PACKAGE_LINES}"


def test_model_within_budget():
    n = _lines(PACKAGE / "model.py")
    assert n <= MODEL_LINES, f"model.py is {n} lines, over its budget of {MODEL_LINES}"


def test_no_module_too_long():
    long = {str(p.relative_to(PACKAGE)): _lines(p) for p in _modules() if _lines(p) > MODULE_LINES}
    assert long == {}, f"modules over {MODULE_LINES} lines: {long}"


def test_no_function_too_long():
    long = []
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > FUNCTION_LINES:
                    long.append(f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n} lines)")
    assert long == [], f"functions over {FUNCTION_LINES} lines: {long}"
