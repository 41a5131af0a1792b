"""Save a compiled model as a `torch.export` program (.pt2) with its plan inside and beside it.

The program calls `torch.ops.ticketc.*`: load it with `load_program` (or import ticketc.ops
before `torch.export.load`) so that the ops are registered.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ticketc.atomic import atomic_path
from ticketc.compile.lower import plan_of
from ticketc.compile.plan import ARCHIVE_NAME, Plan


def export_program(model: nn.Module, example_input: Tensor) -> torch.export.ExportedProgram:
    """torch.export the compiled model, with a dynamic batch dimension where it traces."""
    param = next(model.buffers(), None)
    if param is not None:
        example_input = example_input.to(device=param.device)
    dtype = next((p.dtype for p in model.parameters()), None)
    if dtype is None:
        dtype = next((b.dtype for b in model.buffers() if b.is_floating_point()), None)
    if dtype is not None and example_input.is_floating_point():
        example_input = example_input.to(dtype)
    # Batch 2: export specialises sizes 0 and 1, so a batch-1 example would fix the batch.
    x = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
    try:
        batch = torch.export.Dim("batch", min=1)
        return torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    except Exception:  # noqa: BLE001 - some models only export with a static batch
        return torch.export.export(model, (example_input,))


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
    """Load a compiled .pt2 (registers ticketc's ops first). Call `.module()` to run it."""
    import ticketc.ops  # noqa: F401 - registers torch.ops.ticketc.*

    return torch.export.load(path)


def compiled_plan(model: nn.Module) -> Plan:
    plan = plan_of(model)
    if plan is None:
        raise ValueError("model was not produced by ticketc.compile (it carries no plan)")
    return plan
