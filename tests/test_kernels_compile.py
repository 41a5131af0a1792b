"""The Triton kernels compile for a real GPU (sm_90), checked without one.

The interpreter the other kernel tests use does not enforce tl.dot's shape and dtype rules or
Triton's typing of loop-carried values; compiling to a cubin with the ptxas bundled in the
triton wheel does, and needs no GPU or driver. Compilation runs in a subprocess: conftest
turns the interpreter on for this process, and Triton cannot mix both modes in one process.
"""

import importlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow

STRIDES = {"stride_xn": "i32", "stride_xk": "i32", "stride_yn": "i32", "stride_ym": "i32"}
CASES = {  # case -> (kernel, signature, constexprs, num_warps): each dtype path and branch
    "csr_linear": (
        "_csr_linear_kernel",
        {"x_ptr": "*fp16", "y_ptr": "*fp16", "crow_ptr": "*i32", "col_ptr": "*i16",
         "val_ptr": "*fp16", "order_ptr": "*i32", "bias_ptr": "*fp16", "M": "i32", "N": "i32",
         **STRIDES},
        {"HAS_BIAS": True, "ROWS": 4, "BLOCK_NNZ": 64, "BLOCK_N": 1},
        2,
    ),
    "csr_linear/batched": (
        "_csr_linear_kernel",
        {"x_ptr": "*bf16", "y_ptr": "*bf16", "crow_ptr": "*i32", "col_ptr": "*i32",
         "val_ptr": "*bf16", "order_ptr": "*i32", "bias_ptr": "*bf16", "M": "i32", "N": "i32",
         **STRIDES},
        {"HAS_BIAS": True, "ROWS": 2, "BLOCK_NNZ": 16, "BLOCK_N": 16},
        4,
    ),
    "bsr_linear": (
        "_bsr_linear_kernel",
        {"x_ptr": "*bf16", "y_ptr": "*fp32", "crow_ptr": "*i32", "col_ptr": "*i32",
         "val_ptr": "*bf16", "bias_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
         "SPLIT_K": "i32", **STRIDES},
        {"HAS_BIAS": True, "B": 32, "BLOCK_N": 64, "DOT_FP32": False, "ATOMIC": True},
        4,
    ),
    "tiled_linear": (
        "_tiled_linear_kernel",
        {"x_ptr": "*fp32", "y_ptr": "*fp32", "tile_crow_ptr": "*i32", "tile_col_ptr": "*i32",
         "tile_off_ptr": "*i32", "row_off_ptr": "*i16", "bitmap_ptr": "*i32",
         "val_ptr": "*fp32", "bias_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
         "SPLIT_K": "i32", **STRIDES},
        {"HAS_BIAS": False, "TILE_M": 32, "TILE_K": 32, "BLOCK_N": 64, "DOT_FP32": True,
         "ATOMIC": False},
        4,
    ),
}  # fmt: skip


def compile_all(arch: int = 90) -> list[str]:
    """Compile every case to a cubin; returns the names compiled (raises on the first error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    done = []
    for case, (kernel_name, signature, constexprs, num_warps) in CASES.items():
        module_name = case.split("/")[0]
        kernel = getattr(importlib.import_module(f"ticketc.kernels.{module_name}"), kernel_name)
        sig = {**signature, **{name: "constexpr" for name in constexprs}}
        compiled = triton.compile(
            ASTSource(kernel, sig, constexprs=constexprs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps},
        )
        assert "cubin" in compiled.asm
        done.append(kernel_name)
    return done


def test_kernels_compile_for_sm90():
    try:
        importlib.import_module("triton.backends.nvidia.compiler")
    except ImportError:
        pytest.skip("triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = "import tests.test_kernels_compile as t; print(' '.join(t.compile_all()))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [case[0] for case in CASES.values()]
