"""Dataclass fields read from source, without importing the module that defines them.

Two users: `glassgpt CMD --help` (the command modules import torch at the top, and printing their
keys should take milliseconds), and config.TrainConfig, whose architecture options are GPTConfig's
fields read from glassgpt/model.py here, so config.py needs no torch and an option lives in one place.

`source_fields(module, name)` follows the class's bases (a mixed-in settings block) and a base made
by `source_dataclass(module, name, exclude)` (a dataclass of another class's fields).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple

from glassgpt.errors import UserError


class FieldSource(NamedTuple):
    default: Any
    doc: str
    choices: tuple
    annotation: str
    own: bool
    """Declared in the class's own body (not only inherited): --help lists these first."""


def _module_tree(module: str) -> ast.Module:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise UserError(f"cannot find module {module}")
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))


def _class_def(module: str, name: str) -> tuple[ast.ClassDef | ast.Call, str]:
    """(the ClassDef `name`, or the `source_dataclass(...)` call assigned to it; the module defining
    it), followed through `from X import name`."""
    for n in _module_tree(module).body:
        if isinstance(n, ast.ClassDef) and n.name == name:
            return n, module
        if isinstance(n, (ast.AnnAssign, ast.Assign)) and isinstance(n.value, ast.Call):
            target = n.target if isinstance(n, ast.AnnAssign) else n.targets[0]
            if isinstance(target, ast.Name) and target.id == name:
                return n.value, module
        if isinstance(n, ast.ImportFrom) and n.module and any(a.name == name for a in n.names):
            return _class_def(n.module, name)
    raise UserError(f"cannot find class {name} in {module}")


def source_fields(module: str, name: str) -> dict[str, FieldSource]:
    """field -> FieldSource of a dataclass and its bases, in dataclasses.fields' order (a subclass
    redeclaring a field keeps its place and takes the new default)."""
    cls, where = _class_def(module, name)
    if isinstance(cls, ast.Call):  # NAME = source_dataclass("module", "Class", exclude=(...))
        mod, cls_name, *rest = [ast.literal_eval(a) for a in cls.args]
        exclude = rest[0] if rest else next((ast.literal_eval(k.value) for k in cls.keywords if k.arg == "exclude"), ())
        return {k: v._replace(own=False) for k, v in source_fields(mod, cls_name).items() if k not in exclude}
    out: dict[str, FieldSource] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name):
            out.update({k: v._replace(own=False) for k, v in source_fields(where, base.id).items()})
    body = cls.body
    for node, nxt in zip(body, [*body[1:], None], strict=False):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        default = _constant(node.value) if node.value is not None else None
        doc = ""
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            doc = " ".join(nxt.value.value.split())
        key = node.target.id
        if not doc and key in out:  # a redeclared default keeps the base's description
            doc = out[key].doc
        out[key] = FieldSource(default, doc, _literal_values(node.annotation), ast.unparse(node.annotation), True)
    return out


_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "None": None, "Literal": Literal}


def source_dataclass(module: str, name: str, exclude: tuple[str, ...] = ()) -> type:
    """A dataclass with the fields of `module.name` (read from source, not imported) but `exclude`,
    with their defaults, types and docstrings (in `__field_docs__`). Fields whose type or default is
    not a plain constant are left out."""
    specs, docs = [], {}
    for key, f in source_fields(module, name).items():
        if key in exclude or isinstance(f.default, _Source):
            continue
        try:
            tp = eval(f.annotation, {"__builtins__": {}}, _TYPES)
        except Exception:
            continue
        if isinstance(tp, (type, types.UnionType)) or typing.get_origin(tp) is Literal:
            specs.append((key, tp, dataclasses.field(default=f.default)))
            docs[key] = f.doc
    cls = dataclasses.make_dataclass(f"{name}Fields", specs)
    cls.__field_docs__ = docs  # type: ignore[attr-defined]
    return cls


def _constant(node: ast.expr) -> Any:
    """The value of a default written as a constant expression (`5 * 8`, `None`), else its source."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    if not names:  # arithmetic on constants only: safe to evaluate without builtins
        try:
            return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})
        except Exception:
            pass
    return _Source(ast.unparse(node))


class _Source(str):
    def __repr__(self) -> str:
        return str(self)


def _literal_values(node: ast.expr) -> tuple:
    """The values of `Literal[...]` in an annotation's source (also `Literal[...] | None`)."""
    out: list[Any] = []
    for n in ast.walk(node):
        if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "Literal":
            elts = n.slice.elts if isinstance(n.slice, ast.Tuple) else [n.slice]
            out += [e.value for e in elts if isinstance(e, ast.Constant)]
    return tuple(out)


def help_line(key: str, default: Any, doc: str, allowed: tuple) -> str:
    one_of = f"  [one of: {', '.join(map(str, allowed))}]" if allowed else ""
    return f"  --{key}={default!r}" + (f"  {doc}" if doc else "") + one_of


def help_from_source(module: str, class_name: str, prog: str) -> str:
    """config.help_text for `module.class_name`, read from source: the class's own keys, then the
    mixed-in ones."""
    fields = source_fields(module, class_name)
    ordered = [k for k, f in fields.items() if f.own] + [k for k, f in fields.items() if not f.own]
    lines = [f"usage: {prog} [config_file.py ...] [--key=value ...]", "", "keys (default):"]
    lines += [help_line(k, fields[k].default, fields[k].doc, fields[k].choices) for k in ordered]
    return "\n".join(lines)


__all__ = ["FieldSource", "help_from_source", "help_line", "source_dataclass", "source_fields"]
