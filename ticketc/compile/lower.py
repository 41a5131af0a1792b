"""The compile pipeline: masks -> dead units -> plan -> swap in sparse modules."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from ticketc.compile.config import CompileConfig
from ticketc.compile.dead_units import eliminate_dead_units
from ticketc.compile.modules import CsrSequential, DenseLinear, SparseLinear, sparse_module
from ticketc.compile.plan import Plan
from ticketc.compile.planner import make_plan
from ticketc.masks import copy_pruned, strip_pruning_

PLAN_ATTR = "ticketc_plan"  # the Plan a compiled module was lowered with


def compile(
    model: Any,
    config: CompileConfig | None = None,
    *,
    masks: dict[str, Tensor] | None = None,
    example_input: Tensor | None = None,
) -> nn.Module:
    """Compile a masked model: each Linear/Conv layer becomes dense or sparse as planned.

    `model` is an nn.Module or a `ticketc.load.LoadedModel` (its masks and example input are
    used). Masks (param name -> bool) are multiplied into the weights; without masks, exact
    zeros are the pruned weights. `example_input` (any batch size) gives conv layers their
    output size. The input model is not modified; the result is in eval mode on
    `config.device` in `config.dtype`, with its plan in `plan_of(result)`. A ReLU right after
    a sparse Linear in an nn.Sequential is fused into it and leaves the Sequential; the other
    children keep their names (reach them by name, e.g. `get_submodule("3")`, not position).
    """
    config = config or CompileConfig()
    module, masks, example_input = _unpack(model, masks, example_input)
    module = copy_pruned(module)
    if held := strip_pruning_(module):  # prune hooks / parametrizations (on the copy)
        masks = {**held, **(masks or {})}
    with contextlib.suppress(NotImplementedError):  # torch.export modules refuse eval()
        module.eval()
    if masks:
        apply_masks_(module, masks)
    report = None
    if config.dead_units:
        module, dead = eliminate_dead_units(module)
        report = dead.to_dict()
    plan = make_plan(module, example_input, config, dead_units=report)
    module = module.to(device=config.device, dtype=config.torch_dtype)
    lower_(module, plan)
    return module


def lower_(model: nn.Module, plan: Plan) -> None:
    """Swap every layer the plan makes sparse for its sparse module, in place; a dense Linear
    after a csr layer becomes DenseLinear (same parameters), which also reads the feature-major
    output of the CPU csr kernels fast. Other dense layers stay as they are: DenseLinear's
    layout check costs ~1 us a call, a few % of a small dense model."""
    device = next((b.device for b in model.parameters()), torch.device(plan.device))
    previous = "dense"
    for lp in plan.layers:
        parent, _, attr = lp.name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, attr)
        if lp.format != "dense":
            setattr(owner, attr, sparse_module(layer, lp.format, device=device))
        elif type(layer) is nn.Linear and previous == "csr":
            setattr(owner, attr, DenseLinear.from_linear(layer))
        previous = lp.format
    fuse_relu_(model)
    chain_csr_(model)
    setattr(model, PLAN_ATTR, plan)


def fuse_relu_(model: nn.Module) -> None:
    """In every nn.Sequential, a ReLU right after a SparseLinear moves into it: the CPU kernel
    applies it to each output row while the row is in cache. The ReLU leaves the Sequential
    (the other children keep their names, so state dict keys and plan names do not change):
    one module call and one pass over the activations fewer per layer."""
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        fused = []
        for (_, layer), (name, act) in zip(children, children[1:], strict=False):
            if isinstance(layer, SparseLinear) and not layer.relu and type(act) is nn.ReLU:
                layer.relu = True
                fused.append(name)
        for name in fused:
            delattr(seq, name)


def chain_csr_(model: nn.Module) -> None:
    """Every nn.Sequential holding two csr SparseLinear layers in a row becomes a
    CsrSequential, which runs such runs as one CPU kernel call. The class is swapped in place
    (CsrSequential only adds a forward), so the module object, its names, hooks and state
    dict stay as they are, the root included."""
    for seq in model.modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq.children())
        if any(_is_csr(a) and _is_csr(b) for a, b in zip(children, children[1:], strict=False)):
            seq.__class__ = CsrSequential


def _is_csr(module: nn.Module) -> bool:
    return isinstance(module, SparseLinear) and module.kind == "csr"


def plan_of(model: nn.Module) -> Plan | None:
    """The plan a module was compiled with, or None."""
    plan = getattr(model, PLAN_ATTR, None)
    return plan if isinstance(plan, Plan) else None


def apply_masks_(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Multiply each named weight by its mask, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            param = params.get(name)
            if param is None:
                raise ValueError(f"mask {name!r} names no parameter of the model")
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(
                    f"mask {name!r} has shape {tuple(mask.shape)}, weight {tuple(param.shape)}"
                )
            param.mul_(mask.to(device=param.device, dtype=torch.bool))


def _unpack(
    model: Any, masks: dict[str, Tensor] | None, example_input: Tensor | None
) -> tuple[nn.Module, dict[str, Tensor] | None, Tensor | None]:
    if isinstance(model, nn.Module):
        return model, masks, example_input
    inner = getattr(model, "model", None)  # ticketc.load.LoadedModel, duck-typed
    if not isinstance(inner, nn.Module):
        raise TypeError(f"expected an nn.Module or a LoadedModel, got {type(model).__name__}")
    masks = masks if masks is not None else getattr(model, "masks", None)
    example = example_input if example_input is not None else getattr(model, "example_input", None)
    return inner, masks, example
