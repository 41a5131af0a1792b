"""What a loaded torch.export program says about its inputs: example inputs from its
placeholders' recorded values, and the axes it keeps symbolic (its guards fix the rest)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ticketc.inputs import TRACE_MIN_SIZE, ExampleInputs, random_like

__all__ = ["INPUT_NAMES", "as_program_call", "from_graph_module", "symbolic_axes"]

#: GraphModule.meta key of a loaded program's input names (the forward's argument names,
#: which its placeholders may have lost: "input" -> "input_1"), set by ticketc.load
INPUT_NAMES = "ticketc_input_names"


def from_graph_module(module: nn.Module) -> ExampleInputs | None:
    """Example inputs of a torch.export program's module, from its placeholders' recorded
    values (symbolic sizes take their traced hint, or 2), positional or by keyword as the
    program was exported. None when it records none."""
    values = _input_values(module)
    if not values:
        return None
    leaves = [
        torch.zeros(tuple(_hint(s) for s in v.shape), dtype=v.dtype)
        if isinstance(v, torch.Tensor)
        else v
        for v in values
    ]
    return random_like(_as_call(module, leaves))


def as_program_call(module: nn.Module, example: ExampleInputs) -> ExampleInputs:
    """`example` as a torch.export program's module takes it: inputs given by name (`--input
    x:...`) for a program recorded with positional inputs become positional, in the order of
    the forward's arguments (as ticketc.load recorded them, else the placeholders' names).
    Unchanged where the names are not exactly the program's positional inputs, or the module
    is no program."""
    graph = getattr(module, "graph", None)
    if graph is None or example.args or not example.kwargs:
        return example
    names = list(getattr(module, "meta", {}).get(INPUT_NAMES, ()))
    if len(names) != sum(n.op == "placeholder" for n in graph.nodes):
        names = [n.name for n in graph.nodes if n.op == "placeholder"]
    call = _as_call(module, names)
    if call.kwargs or set(call.args) != set(example.kwargs) or len(call.args) != len(names):
        return example
    ranges: dict[str | int, tuple[int, int]] = {
        call.args.index(k): r for k, r in example.ranges.items() if k in call.args
    }
    return ExampleInputs(tuple(example.kwargs[n] for n in call.args), {}, ranges)


def symbolic_axes(module: nn.Module) -> dict[str | int, list[int]] | None:
    """The axes of each input (by position, or by name for keyword inputs) that a torch.export
    program's module keeps symbolic (its `dynamic_shapes`; its guards fix every other size),
    or None when the module is no program or records no input values."""
    values = _input_values(module)
    if not values:
        return None
    axes = [
        [a for a, size in enumerate(v.shape) if not isinstance(size, int)]
        if isinstance(v, torch.Tensor)
        else []
        for v in values
    ]
    call = _as_call(module, axes)
    by_key: dict[str | int, list[int]] = dict(enumerate(call.args))
    by_key.update(call.kwargs)
    return by_key


#: Non-tensor inputs a program takes as constants (`use_cache=False`): called with the value
#: it was traced with, which its guards require
CONSTANTS = (bool, int, float, str, type(None))


def _input_values(module: nn.Module) -> list[Any] | None:
    """The recorded values of a program module's inputs, in order: tensors, and the values of
    constant inputs; None where one is neither (or the module is no program)."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    values = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    known = all(isinstance(v, (torch.Tensor, *CONSTANTS)) for v in values)
    return values if known and any(isinstance(v, torch.Tensor) for v in values) else None


def _as_call(module: nn.Module, leaves: list[Any]) -> ExampleInputs:
    """`leaves` (one per input) as the program's call: its (args, kwargs) structure where each
    input is a top-level argument, else all positional."""
    spec = getattr(module, "_in_spec", None)
    if spec is not None:
        try:
            args, kwargs = pytree.tree_unflatten(leaves, spec)
        except Exception:  # noqa: BLE001 - a structure other than (args, kwargs)
            args, kwargs = None, None
        whole = isinstance(args, tuple) and isinstance(kwargs, dict)
        if whole and len(args) + len(kwargs) == len(leaves):
            return ExampleInputs(args, dict(kwargs))
    return ExampleInputs(tuple(leaves))


def _hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else TRACE_MIN_SIZE
