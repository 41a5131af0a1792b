"""What a loaded torch.export program says about its inputs: example inputs from its
placeholders' recorded values, and the batch size its guards fix (if they do)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ticketc.inputs import TRACE_MIN_SIZE, ExampleInputs, random_like

__all__ = ["fixed_batch", "from_graph_module"]


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


def fixed_batch(module: nn.Module) -> int | None:
    """The batch size a torch.export program's module is specialised to (its guards reject any
    other), or None when its first input's batch axis is symbolic or it is no program."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    for node in graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dim() and isinstance(value.shape[0], int):
                return int(value.shape[0])
            return None
    return None


def _hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else TRACE_MIN_SIZE
