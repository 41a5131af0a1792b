"""Compile masked models to sparse modules run by ticketc's kernels.

    compiled = ticketc.compile(model, CompileConfig(device="cpu", batch_size=64))

`ticketc.compile` is this package and is also callable (it forwards to `compile`), so both
`ticketc.compile(model)` and `from ticketc.compile import compile` work.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ticketc.compile.config import CompileConfig
from ticketc.compile.dead_units import DeadUnitReport, LayerUnits, eliminate_dead_units
from ticketc.compile.inputs import Inputs
from ticketc.compile.lower import (
    apply_masks_,
    apply_plan,
    chain_csr,
    compile,
    compile_with_plan,
    fuse_relu_,
    plan_of,
)
from ticketc.compile.modules import CsrSequential, SparseConv, SparseLinear, sparse_module
from ticketc.compile.plan import ChainPlan, LayerPlan, Plan, plan_rows, read_plan
from ticketc.compile.planner import make_plan
from ticketc.compile.program import export_program, load_program, plan_file_for, save_compiled

__all__ = [
    "ChainPlan",
    "CompileConfig",
    "CsrSequential",
    "DeadUnitReport",
    "Inputs",
    "LayerPlan",
    "LayerUnits",
    "Plan",
    "SparseConv",
    "SparseLinear",
    "apply_masks_",
    "apply_plan",
    "chain_csr",
    "compile",
    "compile_with_plan",
    "eliminate_dead_units",
    "export_program",
    "fuse_relu_",
    "load_program",
    "make_plan",
    "plan_file_for",
    "plan_of",
    "plan_rows",
    "read_plan",
    "save_compiled",
    "sparse_module",
]


class _CallableModule(types.ModuleType):
    # `import ticketc.compile` binds the package to the attribute `ticketc.compile`, which
    # would hide a function of that name: making the package callable keeps
    # `ticketc.compile(model, config)` working whichever import happened first.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return compile(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
