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
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ticketc.atomic import atomic_path
from ticketc.compile.plan import ARCHIVE_NAME, Plan
from ticketc.inputs import Example, ExampleInputs


def export_program(model: nn.Module, example_input: Example) -> torch.export.ExportedProgram:
    """torch.export the compiled model on its example input (a tensor, a tuple of positional
    arguments or a dict of keyword arguments), with a dynamic batch dimension where it traces
    (dim 0 of every input tensor with the example's batch size), else a static one."""
    inputs = ExampleInputs.of(example_input)
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

    model = _with_plain_outputs(model, inputs)
    try:
        # dynamic_shapes by the forward's parameter names, as torch.export matches them
        bound = inspect.signature(model.forward).bind(*two.args, **two.kwargs)
        dynamic = {name: pytree.tree_map(dims, v) for name, v in bound.arguments.items()}
        return torch.export.export(model, two.args, two.kwargs, dynamic_shapes=dynamic)
    except Exception:  # noqa: BLE001 - some models only export with a static batch
        return torch.export.export(model, inputs.args, inputs.kwargs)


def _plain(out: object) -> object:
    """`out` with every mapping that is not a plain dict (transformers' ModelOutput) as a dict,
    inside tuples and lists too."""
    if isinstance(out, Mapping):
        return {k: _plain(v) for k, v in out.items()}
    if isinstance(out, tuple | list) and not hasattr(out, "_fields"):
        return type(out)(_plain(v) for v in out)
    return out


def _needs_plain(out: object) -> bool:
    if isinstance(out, Mapping):
        return type(out) is not dict or any(_needs_plain(v) for v in out.values())
    if isinstance(out, tuple | list):
        return any(_needs_plain(v) for v in out)
    return False


def _with_plain_outputs(model: nn.Module, inputs: ExampleInputs) -> nn.Module:
    """`model`, or a wrapper whose outputs are plain dicts where the model returns another
    mapping: a .pt2 can only be loaded where its output types are registered for pytree
    deserialisation, and transformers' ModelOutput classes are not (the program then failed to
    load in a fresh process). The wrapper keeps the forward's signature for torch.export."""
    with torch.no_grad():
        out = model(*inputs.args, **inputs.kwargs)
    if not _needs_plain(out):
        return model

    class PlainOutputs(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: object, **kwargs: object) -> object:
            return _plain(self.inner(*args, **kwargs))

    PlainOutputs.forward.__signature__ = inspect.signature(type(model).forward)  # type: ignore[attr-defined]
    return PlainOutputs(model).eval()


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
