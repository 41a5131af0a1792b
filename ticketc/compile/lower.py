"""The compile pipeline: masks -> dead units -> plan -> swap in sparse modules -> check."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ticketc.compile.chain import chain_csr, fuse_relu_
from ticketc.compile.check import check_speed
from ticketc.compile.config import CompileConfig
from ticketc.compile.modules import sparse_module as _sparse_module
from ticketc.compile.plan import Plan
from ticketc.compile.planner import make_plan
from ticketc.inputs import Example, ExampleInputs
from ticketc.masks import apply_masks_, copy_pruned, strip_pruning_
from ticketc.transforms.dead_units import eliminate_dead_units

# The plan each module returned by `compile_model` was made with, for `plan_of`: a side table, so
# that nothing is written onto the module (weak keys: it holds no module alive).
_PLANS: weakref.WeakKeyDictionary[nn.Module, Plan] = weakref.WeakKeyDictionary()


def compile_model(
    model: Any,
    config: CompileConfig | None = None,
    *,
    masks: dict[str, Tensor] | None = None,
    example_input: Example | None = None,
) -> nn.Module:
    """Compile a masked model: each Linear/Conv layer becomes dense or sparse as planned.
    Returns the compiled module; its plan is `plan_of(result)` (or use `compile_with_plan`).
    See `compile_with_plan` for the arguments."""
    compiled, plan = compile_with_plan(model, config, masks=masks, example_input=example_input)
    _PLANS[compiled] = plan
    return compiled


def compile_with_plan(
    model: Any,
    config: CompileConfig | None = None,
    *,
    masks: dict[str, Tensor] | None = None,
    example_input: Example | None = None,
) -> tuple[nn.Module, Plan]:
    """Compile a masked model: each Linear/Conv layer becomes dense or sparse as planned.

    `model` is an nn.Module or a `ticketc.load.LoadedModel` (its masks and example input are
    used). Masks (param name -> bool) are multiplied into the weights; without masks, exact
    zeros are the pruned weights. `example_input` is one tensor, a tuple of positional
    arguments or a dict of keyword arguments (token ids and masks keep their dtype), at any
    batch size: it gives conv layers their output size, and with `config.check` the compiled
    model is run on it at the planned batch size against the masked model (outputs compared,
    speed measured, layers sent back to dense until it is faster). The input model is not
    modified; the result is in eval mode on `config.device` in `config.dtype`, returned with
    the plan it was lowered with (the check's measurements in `plan.check`). A ReLU right
    after a sparse layer in an nn.Sequential is fused into it and leaves the Sequential; the
    other children keep their names (reach them by name, e.g. `get_submodule("3")`, not
    position).

    Raises RuntimeError if the compiled model's outputs differ from the masked model's
    beyond float rounding (a bug, never returned silently).
    """
    config = config or CompileConfig()
    module, masks, example = _unpack(model, masks, example_input)
    inputs = None if example is None else ExampleInputs.of(example)
    if config.batch_size is None:
        config = replace(config, batch_size=(inputs.batch if inputs is not None else None) or 1)
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
    plans = [make_plan(module, inputs, config, dead_units=report)]
    if config.tune and config.plan_path is None:  # a tuned plan must beat the untuned one
        plans.append(make_plan(module, inputs, replace(config, tune=False), dead_units=report))
    dense = module.to(device=config.device, dtype=config.torch_dtype)
    if config.check and inputs is not None:
        batch = inputs.at_batch(config.batch_size or 1).to(config.device, config.torch_dtype)
        compiled, plan = check_speed(dense, plans, batch, config, apply_plan)
    else:
        plan = plans[0]
        if config.check:
            plan = replace(plan, check={"skipped": "no example input to run the model on"})
        compiled = apply_plan(dense, plan)
    return compiled, plan


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Swap every layer the plan makes sparse for its sparse module, fuse ReLUs after sparse
    layers in nn.Sequential and let Sequentials with consecutive csr Linear layers run them as
    chains. Modifies `model` and returns it (or, if its root became a CsrSequential, that)."""
    device = next((b.device for b in model.parameters()), torch.device(plan.device))
    for lp in plan.layers:
        if lp.format == "dense":
            continue
        if not lp.name:  # the model is itself one layer
            model = _sparse_module(model, lp.format, device=device)
            continue
        parent, _, attr = lp.name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, _sparse_module(getattr(owner, attr), lp.format, device=device))
    fuse_relu_(model)
    return chain_csr(model)


def plan_of(model: nn.Module) -> Plan | None:
    """The plan a module returned by `compile_model` was made with, or None (another module, or a
    copy of one: a copy is a new module; a saved .pt2 carries its plan, see read_plan)."""
    return _PLANS.get(model)


def _unpack(
    model: Any, masks: dict[str, Tensor] | None, example: Example | None
) -> tuple[nn.Module, dict[str, Tensor] | None, Example | None]:
    if isinstance(model, nn.Module):
        return model, masks, example
    inner = getattr(model, "model", None)  # ticketc.load.LoadedModel, duck-typed
    if not isinstance(inner, nn.Module):
        raise TypeError(f"expected an nn.Module or a LoadedModel, got {type(model).__name__}")
    masks = masks if masks is not None else getattr(model, "masks", None)
    example = example if example is not None else getattr(model, "example_input", None)
    return inner, masks, example
