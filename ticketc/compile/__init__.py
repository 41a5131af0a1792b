"""Compile masked models to sparse modules run by ticketc's kernels.

compiled = ticketc.compile_model(model, ticketc.CompileConfig(device="cpu", batch_size=64))
"""

from __future__ import annotations

from ticketc.compile.chain import CsrSequential, chain_csr, fuse_relu_
from ticketc.compile.config import CompileConfig
from ticketc.compile.lower import apply_plan, compile_model, compile_with_plan, plan_of
from ticketc.compile.modules import SparseConv, SparseLinear, sparse_module
from ticketc.compile.plan import ChainPlan, LayerPlan, Plan, plan_rows, read_plan
from ticketc.compile.planner import make_plan
from ticketc.compile.program import export_program, load_program, plan_file_for, save_compiled
from ticketc.inputs import ExampleInputs

__all__ = [
    "ChainPlan",
    "CompileConfig",
    "CsrSequential",
    "ExampleInputs",
    "LayerPlan",
    "Plan",
    "SparseConv",
    "SparseLinear",
    "apply_plan",
    "chain_csr",
    "compile_model",
    "compile_with_plan",
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
