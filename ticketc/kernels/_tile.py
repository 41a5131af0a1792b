"""Triton device code shared by the block-sparse kernels (BSR and the tiled bitmap)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_block_program(crow_ptr, N, BLOCK_N: tl.constexpr):
    """This program's place in a (row block, batch tile, split of K) grid: (row block, split,
    the block row's first and past-last stored block, the batch rows ns [BLOCK_N] and which
    of them exist)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(crow_ptr + pid_m)
    end = tl.load(crow_ptr + pid_m + 1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_k, start, end, ns, ns < N


@triton.jit
def accumulate_tile(
    acc, x_ptr, ns, n_ok, ks, K, stride_xn, stride_xk, wt, DOT_FP32: tl.constexpr
):  # fmt: skip
    """acc [BLOCK_N, rows] + x[ns, ks] @ wt, wt [len(ks), rows] a stored block read as W.T;
    in fp32 with ieee precision when DOT_FP32, else in x's type."""
    x_off = ns[:, None] * stride_xn + ks[None, :] * stride_xk
    xt = tl.load(x_ptr + x_off, mask=n_ok[:, None] & (ks < K)[None, :], other=0.0)
    if DOT_FP32:
        acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(xt, wt.to(xt.dtype))
    return acc


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
