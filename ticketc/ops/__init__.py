"""Sparse linear ops: the `torch.ops.ticketc.*` custom ops and their pure-torch references.

Interface (stable; ticketc.compile stores these buffers and calls these ops). The weight
arguments are the arrays of one format of ticketc.formats, in its `BUFFERS` order:
`CSR.from_dense(w).buffers()`, `BSR.from_dense(w, b).buffers()`,
`Tiled.from_dense(w).buffers()` (dtypes and shapes in those files)::

    torch.ops.ticketc.csr_linear(x, crow_indices, col_indices, values, row_order, bias) -> y
    torch.ops.ticketc.bsr_linear(x, crow_indices, col_indices, values, bias, out_features) -> y
    torch.ops.ticketc.tiled_linear(x, tile_crow, tile_col, tile_offsets, row_offsets, bitmaps,
                                   values, bias, out_features) -> y
        y = x @ W.T (+ bias); x [N, K] 2-D (callers flatten leading dims), y [N, M] in x.dtype,
        row-major, bias [M] or None. Accumulation is fp32 (fp64 for fp64 inputs).
    torch.ops.ticketc.csr_chain(x, crow_indices[], col_indices[], values[], bias[], relu[]) -> y
        Consecutive csr_linear layers in one call, max(., 0) after the layers flagged in relu:
        one graph node (one dispatch) for a whole MLP.
    torch.ops.ticketc.csr_conv2d(x, crow_indices, col_indices, values, bias, weight_shape,
                                 stride, padding, dilation, groups, relu) -> y
        Conv2d of x [N, C, H, W] with the weight weight_shape = [M, C/groups, kh, kw] stored as
        CSR over its rows flattened to [M, C/groups*kh*kw] (CSR.from_dense of the conv weight);
        padding [top, bottom, left, right] (zeros); y [N, M, OH, OW], ReLU fused if `relu`.

    CPU: csr_linear, csr_chain and csr_conv2d run the Numba kernels of ticketc.kernels
    (csr_chain_cpu, csr_conv_cpu; fp16/bf16 computed in fp32, fp64 on MKL or the reference);
    bsr_linear MKL or the reference. CUDA: the Triton kernels in ticketc.kernels (convs as
    unfold + csr_linear). Each op has a pure-torch twin `<op>_reference(...)` with the same
    arguments: the test oracle and the fallback for other devices.

    csr_linear(...), bsr_linear(...), tiled_linear(...)   (same arguments, in this package)
        The ops without the dispatcher's ~10 us per call: in eager mode on plain CPU / CUDA
        tensors they call the kernels directly, otherwise (torch.compile, torch.export, fake
        tensors) torch.ops.ticketc.*.

Which op where (CUDA; measure with benchmarks/kernels_bench.py, the planner decides):
csr_linear for batch 1..~32 (CUDA-core gather kernel, reads each nonzero once: the batch-1
path); tiled_linear for larger batches on unstructured masks at moderate density (tensor
cores, loads ~density x dense bytes + 1 bit per weight); bsr_linear for block-pruned masks
(tensor cores, blocks 16/32/64/128). On CPU the planner uses csr (and dense) only: tiled_linear
has only the reference there (it decodes the tiles on every call), bsr_linear MKL's BSR.

The package, by job: `registration` (schemas, fallbacks, fakes; importing this package
registers the ops, cheaply: Numba and Triton are imported on first use, so it imports on a
machine without a GPU or without Triton), `checks` (argument checks), `reference` (the
pure-torch twins), `cpu` (the CPU kernels and their prepared-weight cache), `cuda` (the Triton
launches) and `eager` (the entry points above).
"""

from __future__ import annotations

from ticketc.ops import registration  # noqa: F401 - registers torch.ops.ticketc.*
from ticketc.ops.cpu import cpu_chain, cpu_conv, cpu_kernels, prepared
from ticketc.ops.eager import bsr_linear, csr_linear, tiled_linear
from ticketc.ops.reference import (
    bsr_linear_reference,
    conv_output_size,
    csr_conv2d_reference,
    csr_linear_reference,
    tiled_linear_reference,
)

__all__ = [
    "bsr_linear",
    "bsr_linear_reference",
    "conv_output_size",
    "cpu_chain",
    "cpu_conv",
    "cpu_kernels",
    "csr_conv2d_reference",
    "csr_linear",
    "csr_linear_reference",
    "prepared",
    "tiled_linear",
    "tiled_linear_reference",
]
