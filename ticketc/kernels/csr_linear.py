"""y = x @ W.T (+ bias) with W in CSR form, for small batches (N up to ~16).

Batch 1 is bandwidth-bound, so the kernel reads each nonzero once (fp16/bf16 value + int16
column) and never materialises W. Rows were sorted by length at pack time (Sputnik): one
program takes ROWS neighbouring rows of `row_order`, so their lengths -- and the loop trip
count -- are close, and no program waits on a long row while its neighbours idle.

Blocked pseudo-code, one program per (group of ROWS sorted rows, block of BLOCK_N batch rows)::

    rows = row_order[pid_m * ROWS : (pid_m + 1) * ROWS]
    acc[ROWS, BLOCK_N] = 0                                   # fp32
    for off in range(0, max(len(rows)), BLOCK_NNZ):
        cols, vals = col_indices[row_start + off : +BLOCK_NNZ], values[...]   # [ROWS, BLOCK_NNZ]
        xg = x[n_block, cols]                                # gather [ROWS, BLOCK_NNZ, BLOCK_N]
        acc += sum(xg * vals[..., None], axis=1)
    y[n_block, rows] = acc (+ bias[rows])

With BLOCK_N = 1 (batch 1, or one program per batch row) the tiles are 2-D [ROWS, BLOCK_NNZ].
For N > 1 the wrapper hands the kernel x transposed ([K, N] contiguous) so the BLOCK_N values
gathered for one column are adjacent in memory.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import (
    autotuning,
    check_device,
    check_float,
    checked_output,
    next_pow2,
    pick_config,
    sm_count,
)


@triton.jit
def _row_entries(col_ptr, val_ptr, start, length, off, BLOCK_NNZ: tl.constexpr):
    """Entries off.. off+BLOCK_NNZ-1 of the rows that start at `start` [ROWS] and hold
    `length` [ROWS] entries: (live [ROWS, BLOCK_NNZ], columns int64, values fp32), 0 where
    a row has no such entry."""
    j = off + tl.arange(0, BLOCK_NNZ)
    live = j[None, :] < length[:, None]
    idx = start[:, None] + j[None, :]
    cols = tl.load(col_ptr + idx, mask=live, other=0).to(tl.int64)
    vals = tl.load(val_ptr + idx, mask=live, other=0.0).to(tl.float32)
    return live, cols, vals


@triton.jit
def _csr_linear_kernel(
    # pointers
    x_ptr, y_ptr, crow_ptr, col_ptr, val_ptr, order_ptr, bias_ptr,
    # sizes
    M, N,
    # strides
    stride_xn, stride_xk, stride_yn, stride_ym,
    # meta
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_NNZ: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slots = pid_m * ROWS + tl.arange(0, ROWS)
    slot_ok = slots < M
    rows = tl.load(order_ptr + slots, mask=slot_ok, other=0)
    start = tl.load(crow_ptr + rows, mask=slot_ok, other=0)
    length = tl.load(crow_ptr + rows + 1, mask=slot_ok, other=0) - start
    longest = tl.max(length, axis=0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=slot_ok, other=0.0).to(tl.float32)

    if BLOCK_N == 1:
        # One batch row per program (batch 1 above all): 2-D tiles, no size-1 third axis.
        x_row = x_ptr + pid_n * stride_xn
        acc1 = tl.zeros([ROWS], dtype=tl.float32)
        for off in range(0, longest, BLOCK_NNZ):
            live, cols, vals = _row_entries(col_ptr, val_ptr, start, length, off, BLOCK_NNZ)
            xg = tl.load(x_row + cols * stride_xk, mask=live, other=0.0)
            acc1 += tl.sum(xg.to(tl.float32) * vals, axis=1)
        if HAS_BIAS:
            acc1 += bias
        y_row = y_ptr + pid_n * stride_yn
        tl.store(y_row + rows * stride_ym, acc1.to(y_ptr.dtype.element_ty), mask=slot_ok)
    else:
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for off in range(0, longest, BLOCK_NNZ):
            live, cols, vals = _row_entries(col_ptr, val_ptr, start, length, off, BLOCK_NNZ)
            x_off = cols[:, :, None] * stride_xk + ns[None, None, :] * stride_xn
            xg = tl.load(x_ptr + x_off, mask=live[:, :, None] & n_ok[None, None, :], other=0.0)
            acc += tl.sum(xg.to(tl.float32) * vals[:, :, None], axis=1)
        if HAS_BIAS:
            acc += bias[:, None]
        y_off = rows[:, None] * stride_ym + ns[None, :] * stride_yn
        y_mask = slot_ok[:, None] & n_ok[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@functools.lru_cache(maxsize=1024)  # pure, and called on every launch
def csr_config(m: int, n: int, nnz: int, device: torch.device) -> dict[str, int]:
    """Launch parameters from a small table (the interpreter cannot autotune).

    BLOCK_NNZ covers a typical row in one or two steps; ROWS shrinks until the grid gives every
    SM a few programs; the gather tile ROWS x BLOCK_NNZ x BLOCK_N stays <= 4096 elements so it
    lives in registers.
    """
    block_n = min(next_pow2(n), 16)
    avg = nnz / max(m, 1)
    block_nnz = max(16, min(next_pow2(int(avg)), 256 // block_n if block_n > 1 else 128))
    rows = 8
    while rows > 1 and (-(-m // rows) < 4 * sm_count(device) or rows * block_nnz * block_n > 4096):
        rows //= 2
    warps = 4 if rows * block_nnz * block_n >= 1024 else 2
    return {"ROWS": rows, "BLOCK_NNZ": block_nnz, "BLOCK_N": block_n, "num_warps": warps}


def csr_candidates(n: int) -> list[dict[str, int]]:
    """Launch configs that TICKETC_AUTOTUNE=1 (and the benchmark's --tune) try at batch n."""
    # BLOCK_N = 1 (a program per batch row) is also tried for n > 1: at n = 2..4 it may beat
    # the 3-D gather tile.
    return [
        {"ROWS": rows, "BLOCK_NNZ": block_nnz, "BLOCK_N": block_n, "num_warps": warps}
        for block_n in sorted({1, min(next_pow2(n), 16)})
        for rows in (1, 2, 4, 8)
        for block_nnz in (16, 32, 64, 128)
        for warps in (2, 4)
        if rows * block_nnz * block_n <= 8192
    ]


def csr_linear(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    row_order: Tensor,
    bias: Tensor | None = None,
    *,
    config: dict[str, int] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """y = x @ W.T (+ bias) for W in `ticketc.formats.CSR` form; y [N, M] in x.dtype.

    `config` overrides the launch table (keys of `csr_config`); `out` is written in place
    (tests pass a NaN-filled buffer to catch unwritten outputs).
    """
    op = "csr_linear"
    device = check_device(
        op, x=x, crow_indices=crow_indices, col_indices=col_indices, values=values,
        row_order=row_order, bias=bias,
    )  # fmt: skip
    check_float(op, "x", x)
    check_float(op, "values", values)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [N, K], got {tuple(x.shape)}")
    if crow_indices.dtype != torch.int32 or row_order.dtype != torch.int32:
        raise TypeError(f"{op}: crow_indices and row_order must be int32, got "
                        f"{crow_indices.dtype} and {row_order.dtype}")  # fmt: skip
    if col_indices.dtype not in (torch.int16, torch.int32):
        raise TypeError(f"{op}: col_indices must be int16 or int32, got {col_indices.dtype}")
    n = x.shape[0]
    m = crow_indices.numel() - 1
    if row_order.numel() != m:
        raise ValueError(f"{op}: row_order has {row_order.numel()} entries for {m} rows")
    out = checked_output(op, x, m, bias, out)
    if n == 0 or m == 0:
        return out
    # Gathering x[:, col] reads BLOCK_N scattered elements unless x is [K, N] in memory.
    xs = x if n == 1 else x.t().contiguous().t()
    bias_arg = bias if bias is not None else values  # never read without HAS_BIAS

    def launch(cfg: dict[str, int], target: Tensor) -> None:
        grid = (triton.cdiv(m, cfg["ROWS"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _csr_linear_kernel[grid](
            xs, target, crow_indices, col_indices, values, row_order, bias_arg,
            m, n,
            xs.stride(0), xs.stride(1), target.stride(0), target.stride(1),
            HAS_BIAS=bias is not None, ROWS=cfg["ROWS"], BLOCK_NNZ=cfg["BLOCK_NNZ"],
            BLOCK_N=cfg["BLOCK_N"], num_warps=cfg.get("num_warps", 4),
        )  # fmt: skip

    cfg = config or dict(csr_config(m, n, values.numel(), device))  # the table is cached
    if config is None and autotuning(device):
        key = ("csr", device, x.dtype, values.dtype, col_indices.dtype, m, x.shape[1],
               next_pow2(n), values.numel(), bias is not None)  # fmt: skip
        scratch = torch.empty_like(out)
        cfg = pick_config(key, cfg, csr_candidates(n), lambda c: launch(c, scratch))
    launch(cfg, out)
    return out
