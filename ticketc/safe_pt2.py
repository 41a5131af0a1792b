"""Check a torch.export archive (.pt2) for everything `torch.export.load` would run from it.

Studied in torch 2.13 (torch/export/pt2_archive/_package.py, torch/export/__init__.py,
torch/_export/serde/serialize.py, torch/export/_unlift.py). Loading a .pt2 runs code from the
file through these doors, each closed here unless the user passes --trust-pickle:

1. weights / constants whose payload config says `"use_pickle": true` are read with
   `torch.load(weights_only=False)`; constants named `custom_obj_*` go to the TorchScript
   unpickler and `opaque_obj_*` to `pickle.loads`;
2. every `*.pt` entry (example inputs `data/sample_inputs/*.pt`, legacy `data/weights/<m>.pt`
   and `data/constants/<m>.pt`, the 2.7 format's `serialized_*.pt`) goes through
   `deserialize_torch_artifact`, which falls back to `weights_only=False` when weights_only
   fails: each must load with weights_only here;
3. `data/aotinductor/` holds compiled shared libraries that are dlopen-ed;
4. the program JSON (every entry under `models/`, whatever its name ends in: torch loads each
   as a program; `serialized_exported_program.json`):
   - node targets and operator arguments (`as_operator`) are resolved by `getattr` from the
     `torch`, `operator` and `math` modules and called when the program runs, so
     `torch.os.system` is a valid-looking target: only operators that compute on tensors are
     accepted (namespaces aten, prims, quantized_decomposed, ticketc, less the ones that take a
     file name: `aten.from_file` maps any file shared, `aten.save` writes one), the
     higher-order operators torch.export writes (control flow, grad / autocast modes,
     functionalized mutation) and the symbolic-shape operators torch itself serialises;
   - `expr_str` of symbolic sizes goes to `sympy.sympify`, which `eval`s its string: only the
     `srepr` form torch writes (calls of sympy classes and torch's sympy functions, integers,
     symbol names) is accepted;
   - `guards_code` lines are `exec`-ed by `ExportedProgram.module()`: only comparisons of input
     sizes are accepted (and ticketc calls `module(check_guards=False)` besides).

Sizes are checked by `ticketc.safe_load.check_zip_sizes` before any of this.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import operator
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ticketc.errors import UserError, first_line
from ticketc.safe_load import (
    TRUST_FLAG,
    check_file,
    is_pt2_archive,
    load_bytes_weights_only,
    open_zip,
    parse_json,
    quiet,
    read_entry,
)

_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
# sympy classes and constants that `srepr` writes for torch's symbolic sizes
_SYMPY_NAMES = frozenset(
    [
        "Symbol",
        "Dummy",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Max",
        "Min",
        "Abs",
        "Mod",
        "floor",
        "ceiling",
        "sqrt",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "Equality",
        "Unequality",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ExprCondPair",
        "true",
        "false",
        "BooleanTrue",
        "BooleanFalse",
        "oo",
        "zoo",
        "nan",
        "Infinity",
        "NegativeInfinity",
        "ComplexInfinity",
        "NaN",
        "Zero",
        "One",
        "NegativeOne",
        "Half",
        "int_oo",
        "IntInfinity",
        "NegativeIntInfinity",
    ]
)
# positional string arguments are accepted only where sympy does not sympify (eval) them
_STRING_ARG = {"Symbol": _SYMBOL, "Dummy": _SYMBOL, "Float": _NUMBER, "Integer": _NUMBER}
_MAX_EXPR = 20_000
# operators that only compute on tensors: no file, process or network reached from them
_SAFE_NAMESPACES = frozenset({"aten", "prims", "quantized_decomposed", "ticketc"})
_FILE_ARGUMENTS = frozenset({"filename", "file", "path", "fname"})
_SAFE_HIGHER_ORDER = frozenset(
    {
        "cond",
        "while_loop",
        "map_impl",
        "scan",
        "associative_scan",
        "invoke_subgraph",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
        "auto_functionalized",
        "auto_functionalized_v2",
        "with_effects",
        "out_dtype",
        "flex_attention",
    }
)
_GUARD_ATTRS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})


def _torch_sympy_names() -> frozenset[str]:
    import torch.utils._sympy.functions as functions

    return frozenset(n for n in getattr(functions, "__all__", ()) if _SYMBOL.match(n))


def program_entries(archive: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    """Every entry torch may read as a program (`_is_program_json`), parsed; UserError for
    one that is not JSON."""
    return {
        name: parse_json(read_entry(archive, name, path), f"{path}:{name}")
        for name in archive.namelist()
        if _is_program_json(name)
    }


def check_pt2_archive(
    archive: zipfile.ZipFile, path: Path, programs: dict[str, Any] | None = None
) -> None:
    """Refuse `archive` (a .pt2) if `torch.export.load` would run code from it; see above.
    `programs`: its `program_entries`, when already read.

    Raises UserError naming the entry and --trust-pickle, or saying what is corrupt.
    """
    if programs is None:
        programs = program_entries(archive, path)
    for name, program in programs.items():
        check_program_json(program, f"{path}:{name}")
    names = archive.namelist()
    for name in names:
        if "/data/aotinductor/" in f"/{name}":
            _refuse(path, f"holds AOTInductor compiled code ({name})")
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            _check_payload_config(
                parse_json(read_entry(archive, name, path), f"{path}:{name}"), name, path
            )
        elif name.endswith(".pt"):
            load_bytes_weights_only(read_entry(archive, name, path), path, name)


def _is_program_json(name: str) -> bool:
    """Whether torch may read `name` as a program: it loads every entry under the archive's
    `models/`, taking the name less its last 5 characters, without checking for ".json"."""
    return ("/models/" in f"/{name}" and not name.endswith("/")) or name.endswith(
        "serialized_exported_program.json"
    )


def _refuse(path: Path, what: str) -> None:
    raise UserError(
        f"{path} {what}: loading it runs code from the file, so it is refused. "
        f"Pass {TRUST_FLAG} if you trust its source"
    )


def _check_payload_config(config: Any, name: str, path: Path) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UserError(f"{path}: corrupt payload config {name!r}")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise UserError(f"{path}: corrupt payload config {name!r} (entry {fqn!r})")
        if meta.get("use_pickle"):
            _refuse(path, f"stores {fqn!r} as a pickle ({name})")
        path_name = str(meta.get("path_name", ""))
        if path_name.startswith(("custom_obj", "opaque_obj")):
            _refuse(path, f"stores {fqn!r} as a pickled Python object ({name})")


def check_program_json(program: Any, where: str) -> None:
    """Refuse a serialized ExportedProgram whose strings torch would call, eval or exec."""
    if not isinstance(program, dict):
        raise UserError(f"{where}: corrupt program (not a JSON object)")
    for target in [*_node_targets(program), *_strings_under(program, "as_operator")]:
        if not _allowed_target(target):
            raise UserError(
                f"{where}: the program calls {target[:100]!r}, which is not an operator that "
                f"only computes on tensors; running it runs code named in the file, so it is "
                f"refused. Pass {TRUST_FLAG} if you trust its source"
            )
    functions = _SYMPY_NAMES | _torch_sympy_names()
    for expr in _strings_under(program, "expr_str"):
        if not _safe_sympy(expr, functions):
            _refuse_string(where, "symbolic size", expr)
    constraints = program.get("range_constraints") or {}
    if isinstance(constraints, dict):
        for key in constraints:  # symbol names, looked up (not evaluated) by torch 2.13
            if not (_SYMBOL.match(key) or _safe_sympy(key, functions)):
                _refuse_string(where, "range constraint", key)
    guards = program.get("guards_code") or []
    if not isinstance(guards, list):
        raise UserError(f"{where}: corrupt program (guards_code is not a list)")
    for guard in guards:
        if not isinstance(guard, str) or not _safe_guard(guard, functions):
            _refuse_string(where, "guard", str(guard))


def _refuse_string(where: str, what: str, text: str) -> None:
    raise UserError(
        f"{where}: {what} {text[:80]!r} is not an expression torch writes; torch evaluates it "
        f"as Python when loading, so it is refused. Pass {TRUST_FLAG} if you trust its source"
    )


def _walk(obj: Any) -> Iterator[dict[str, Any]]:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _node_targets(program: dict[str, Any]) -> Iterator[str]:
    """Targets of every serialized Node (graph, subgraphs of higher-order ops)."""
    for d in _walk(program):
        if "target" in d and "inputs" in d and "outputs" in d:
            target = d["target"]
            if not isinstance(target, str):
                raise UserError("corrupt program: a node target is not a string")
            yield target


def _strings_under(program: dict[str, Any], key: str) -> Iterator[str]:
    for d in _walk(program):
        if key in d:
            value = d[key]
            if not isinstance(value, str):
                raise UserError(f"corrupt program: {key} is not a string")
            yield value


def _allowed_target(name: str) -> bool:
    """Resolve `name` as torch's deserializer does; accept operators only."""
    from torch._export.serde.serialize import _SYM_OPS

    roots: dict[str, Any] = {"torch": torch, "_operator": operator, "math": __import__("math")}
    head, _, rest = name.partition(".")
    if head not in roots or not rest:
        return False
    target: Any = roots[head]
    for part in rest.split("."):
        if not _SYMBOL.match(part):
            return False
        try:
            target = getattr(target, part)
        except Exception:  # noqa: BLE001 - torch.ops raises its own errors for unknown ops
            return False
    if isinstance(target, torch._ops.OpOverload):
        arguments = {a.name for a in target._schema.arguments}
        return target.namespace in _SAFE_NAMESPACES and not arguments & _FILE_ARGUMENTS
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name() in _SAFE_HIGHER_ORDER
    try:
        return target in _SYM_OPS or target is operator.getitem
    except TypeError:  # unhashable
        return False


def _parse(text: str) -> ast.expr | None:
    if len(text) > _MAX_EXPR:
        return None
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


_ARITHMETIC = (
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.And,
    ast.Or,
    ast.BitAnd,
    ast.BitOr,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
)


def _safe_sympy(text: str, functions: frozenset[str]) -> bool:
    """Whether sympify(text) only builds sympy objects: calls of known classes, numbers, and
    strings only where sympy takes them literally (symbol names, number strings)."""
    tree = _parse(text)
    return tree is not None and _sympy_node(tree, functions)


def _sympy_node(node: ast.AST, functions: frozenset[str]) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, bool | int | float)
    if isinstance(node, ast.Name):
        return node.id in functions
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in functions:
            return False
        pattern = _STRING_ARG.get(node.func.id)
        for i, arg in enumerate(node.args):
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if not (i == 0 and pattern is not None and pattern.match(arg.value)):
                    return False
            elif not _sympy_node(arg, functions):
                return False
        return all(
            kw.arg is not None
            and _SYMBOL.match(kw.arg)
            and isinstance(kw.value, ast.Constant)
            and isinstance(kw.value.value, bool | int | float | type(None))
            for kw in node.keywords
        )
    return _operators_only(node, lambda child: _sympy_node(child, functions))


def _operators_only(node: ast.AST, child_ok: Any) -> bool:
    if isinstance(node, ast.Tuple):  # Piecewise((expr, cond), ...)
        return all(child_ok(e) for e in node.elts)
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _ARITHMETIC) and child_ok(node.left) and child_ok(node.right)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, _ARITHMETIC) and child_ok(node.operand)
    if isinstance(node, ast.BoolOp):
        return isinstance(node.op, _ARITHMETIC) and all(child_ok(v) for v in node.values)
    if isinstance(node, ast.Compare):
        return all(isinstance(op, _ARITHMETIC) for op in node.ops) and all(
            child_ok(v) for v in [node.left, *node.comparators]
        )
    return False


def _safe_guard(text: str, functions: frozenset[str]) -> bool:
    """Guards as torch writes them: `L['x'].size()[0] <= 64`, `Eq(2*L['x'].size()[1], ...)`."""
    tree = _parse(text)
    return tree is not None and _guard_node(tree, functions)


def _guard_node(node: ast.AST, functions: frozenset[str]) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, bool | int | float)
    if isinstance(node, ast.Name):
        return node.id == "L" or node.id in functions
    if isinstance(node, ast.Subscript):
        index = node.slice
        return (
            isinstance(index, ast.Constant)
            and isinstance(index.value, str | int)
            and not (isinstance(index.value, str) and not _SYMBOL.match(index.value))
            and _guard_node(node.value, functions)
        )
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute):
            ok = func.attr in _GUARD_ATTRS and _guard_node(func.value, functions)
        else:
            ok = isinstance(func, ast.Name) and func.id in functions
        return ok and not node.keywords and all(_guard_node(a, functions) for a in node.args)
    return _operators_only(node, lambda child: _guard_node(child, functions))


_TYPE_NAME = re.compile(r"^transformers(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _import_output_types(programs: dict[str, Any], path: Path) -> None:
    """Import the transformers modules whose classes (ModelOutput) the programs' input and
    output specs name: torch reads a spec only for types registered with pytree, which a
    ModelOutput class is when its module is imported. Only modules of the installed
    transformers are imported, never one outside it (that would run code the file names)."""
    modules: set[str] = set()
    for name, program in programs.items():
        for spec in [*_strings_under(program, "in_spec"), *_strings_under(program, "out_spec")]:
            for node in _walk(parse_json(spec, f"{path}:{name}")):
                kind = node.get("type")
                if isinstance(kind, str) and _TYPE_NAME.match(kind):
                    modules.add(kind.rsplit(".", 1)[0])
    for module in sorted(modules):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def load_exported_program(
    path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> torch.export.ExportedProgram:
    """`torch.export.load`, after `check_pt2_archive` (skipped with `trust_pickle`).

    The archive is opened once: the same file object is checked and then loaded. Every failure
    is a one-line UserError; torch's own error logging is silenced.
    """
    import ticketc.ops  # noqa: F401 - a program compiled by ticketc calls torch.ops.ticketc.*

    p = check_file(path)
    with open(p, "rb") as f:
        with open_zip(f, p) as archive:
            names = archive.namelist()
            if not is_pt2_archive(names):
                raise UserError(f"{p}: a zip archive, but not a torch.export program (.pt2)")
            programs = program_entries(archive, p)  # read once: checked, then their specs
            if not trust_pickle:
                check_pt2_archive(archive, p, programs)
            _import_output_types(programs, p)
        f.seek(0)
        try:
            with quiet():
                return torch.export.load(f)
        except Exception as e:  # noqa: BLE001 - torch.export.load fails in many ways on bad files
            raise UserError(f"{p}: not a readable torch.export program ({first_line(e)})") from e
