"""What a loaded torch.export program says about its inputs: example inputs from its
placeholders' recorded values, and the axes it keeps symbolic (its guards fix the rest)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ticketc.inputs import TRACE_MIN_SIZE, ExampleInputs, random_like

__all__ = ["from_graph_module", "symbolic_axes"]


def from_graph_module(module: nn.Module) -> ExampleInputs | None:
    """Example inputs of a torch.export program's module, from its placeholders' recorded
    values (symbolic sizes take their traced hint, or 2). None when it records none."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    tensors = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        shape = tuple(_hint(s) for s in value.shape)
        tensors.append(torch.zeros(shape, dtype=value.dtype))
    return random_like(ExampleInputs(tuple(tensors))) if tensors else None


def symbolic_axes(module: nn.Module) -> dict[int, list[int]] | None:
    """The axes of each positional input that a torch.export program's module keeps symbolic
    (its `dynamic_shapes`; its guards fix every other size), or None when the module is no
    program or records no input values."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    axes: dict[int, list[int]] = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        axes[len(axes)] = [a for a, size in enumerate(value.shape) if not isinstance(size, int)]
    return axes or None


def _hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else TRACE_MIN_SIZE
