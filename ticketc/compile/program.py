"""Save a compiled model as a `torch.export` program (.pt2) with its plan inside and beside it.

The program calls `torch.ops.ticketc.*`, which `import ticketc` registers:

    import ticketc, torch
    program = torch.export.load("model.pt2")      # or ticketc.compile.load_program
    y = program.module()(x)
"""

from __future__ import annotations

import inspect
import io
import os
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ticketc.atomic import atomic_path
from ticketc.compile.inputs import Example, Inputs
from ticketc.compile.lower import plan_of
from ticketc.compile.plan import ARCHIVE_NAME, Plan


def export_program(model: nn.Module, example_input: Example) -> torch.export.ExportedProgram:
    """torch.export the compiled model on its example input (a tensor, a tuple of positional
    arguments or a dict of keyword arguments), with a dynamic batch dimension where it traces
    (dim 0 of every input tensor with the example's batch size), else a static one."""
    inputs = Inputs.of(example_input)
    param = next(model.buffers(), None)
    dtype = next((p.dtype for p in model.parameters()), None)
    if dtype is None:
        dtype = next((b.dtype for b in model.buffers() if b.is_floating_point()), None)
    inputs = inputs.to(device=None if param is None else param.device, dtype=dtype)
    # Batch 2: export specialises sizes 0 and 1, so a batch-1 example would fix the batch.
    two = inputs.at_batch(2)
    batch = torch.export.Dim("batch", min=1)

    def dims(t: object) -> dict[int, object] | None:
        return {0: batch} if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == 2 else None

    try:
        # dynamic_shapes by the forward's parameter names, as torch.export matches them
        bound = inspect.signature(model.forward).bind(*two.args, **two.kwargs)
        dynamic = {name: pytree.tree_map(dims, v) for name, v in bound.arguments.items()}
        return torch.export.export(model, two.args, two.kwargs, dynamic_shapes=dynamic)
    except Exception:  # noqa: BLE001 - some models only export with a static batch
        return torch.export.export(model, inputs.args, inputs.kwargs)


def save_compiled(
    program: torch.export.ExportedProgram, plan: Plan, path: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Write PATH (.pt2, the plan embedded) and PATH.plan.json beside it, both atomically."""
    out = Path(path)
    plan_path = plan_file_for(out)
    text = plan.dumps()
    # Serialised in memory first: when a write to a file fails (a full disk), torch's zip
    # writer raises and then aborts the whole process from its destructor.
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={ARCHIVE_NAME: text})
    with atomic_path(out) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    with atomic_path(plan_path) as tmp:
        tmp.write_text(text + "\n")
    return out, plan_path


def plan_file_for(path: str | os.PathLike[str]) -> Path:
    """OUT.pt2 -> OUT.plan.json"""
    p = Path(path)
    return p.with_name(p.stem + ".plan.json")


def load_program(path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """Load a compiled .pt2 (its ops are registered by `import ticketc`). Call `.module()` to
    run it. Loading a .pt2 may unpickle code: load only files you trust."""
    return torch.export.load(path)


def compiled_plan(model: nn.Module) -> Plan:
    plan = plan_of(model)
    if plan is None:
        raise ValueError("model was not produced by ticketc.compile (it carries no plan)")
    return plan
