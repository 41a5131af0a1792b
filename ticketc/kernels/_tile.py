"""Triton device code shared by the block-sparse kernels (BSR and the tiled bitmap)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_rows(
    acc, rows, ns, n_ok, M, pid_k, bias_ptr, y_ptr, stride_yn, stride_ym,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    """Write acc [BLOCK_N, rows] (fp32) to y[ns, rows], adding the bias once (split 0 of a
    split-K launch); with ATOMIC the splits' partial sums meet through atomic adds."""
    row_ok = rows < M
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc += bias[None, :] * (pid_k == 0).to(tl.float32)
    y_off = ns[:, None] * stride_yn + rows[None, :] * stride_ym
    y_mask = n_ok[:, None] & row_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptr + y_off, acc, mask=y_mask)
    else:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
