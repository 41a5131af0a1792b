"""y = x @ W.T (+ bias) with W block-sparse (BSR, b x b blocks), on tensor cores.

Each stored block is a dense b x b tile, so the inner product is a tl.dot of an x tile
[BLOCK_N, b] with the transposed block [b, b]: block-pruned layers run at the speed of a dense
matmul over the kept blocks. Unlike torch's Triton BSR (one program per block row x column
tile), the reduction over a block row may be split (SPLIT_K programs, fp32 atomics) so that
few block rows at small batch still fill the GPU.

Blocked pseudo-code, one program per (block row, BLOCK_N batch rows, split)::

    acc[BLOCK_N, b] = 0                                              # fp32
    for p in crow[row] + split, ..., crow[row + 1], step SPLIT_K:    # kept blocks of the row
        xt = x[n_block, col[p] * b : col[p] * b + b]                 # [BLOCK_N, b], 0 past K
        acc += tl.dot(xt, values[p].T)
    y[n_block, row * b : row * b + b] (+)= acc (+ bias)              # cropped to M
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import (
    check_device,
    check_float,
    launch_row_blocks,
    next_pow2,
    split_k_for,
)
from ._tile import accumulate_tile, row_block_program, store_rows

BSR_BLOCKSIZES = (16, 32, 64, 128)  # tl.dot needs every dim >= 16 and a power of two


@triton.jit
def _bsr_linear_kernel(
    # pointers
    x_ptr, y_ptr, crow_ptr, col_ptr, val_ptr, bias_ptr,
    # sizes
    M, N, K, SPLIT_K,
    # strides
    stride_xn, stride_xk, stride_yn, stride_ym,
    # meta
    HAS_BIAS: tl.constexpr, B: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    ATOMIC: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k, start, end, ns, n_ok = row_block_program(crow_ptr, N, BLOCK_N)
    i = tl.arange(0, B)  # output row inside the block
    j = tl.arange(0, B)  # input column inside the block

    acc = tl.zeros([BLOCK_N, B], dtype=tl.float32)
    first = start + pid_k
    col_p = col_ptr + first
    # block `first` is row-major [i, j]; read it transposed as [j, i]
    w_p = val_ptr + first.to(tl.int64) * (B * B) + i[None, :] * B + j[:, None]
    for _ in range(first, end, SPLIT_K):
        ks = tl.load(col_p).to(tl.int64) * B + j
        acc = accumulate_tile(acc, x_ptr, ns, n_ok, ks, K, stride_xn, stride_xk, tl.load(w_p),
                              DOT_FP32)  # fmt: skip
        col_p += SPLIT_K
        w_p += SPLIT_K * (B * B)

    rows = pid_m * B + i
    store_rows(acc, rows, ns, n_ok, M, pid_k, bias_ptr, y_ptr, stride_yn, stride_ym,
               HAS_BIAS, ATOMIC)  # fmt: skip


@functools.lru_cache(maxsize=1024)  # pure, and called on every launch
def bsr_config(mb: int, n: int, nblocks: int, b: int, device: torch.device) -> dict[str, int]:
    """Launch parameters: BLOCK_N from the batch, SPLIT_K when the grid is too small."""
    block_n = max(16, min(next_pow2(n), 64 if b >= 64 else 128))
    programs = mb * -(-n // block_n)
    split = split_k_for(nblocks / max(mb, 1), programs, device)
    warps = 8 if block_n * b >= 128 * 64 else 4
    return {"BLOCK_N": block_n, "SPLIT_K": split, "num_warps": warps}


def bsr_linear(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
    *,
    config: dict[str, int] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """y = x @ W.T (+ bias) for W in `ticketc.formats.BSR` form; y [N, out_features] in x.dtype.

    Block sizes 16/32/64/128. `config` overrides the launch table (keys of `bsr_config`);
    `out` is written in place.
    """
    op = "bsr_linear"
    device = check_device(
        op, x=x, crow_indices=crow_indices, col_indices=col_indices, values=values, bias=bias
    )
    check_float(op, "x", x)
    check_float(op, "values", values)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [N, K], got {tuple(x.shape)}")
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"{op}: values must be [nblocks, b, b], got {tuple(values.shape)}")
    b = values.shape[1]
    if b not in BSR_BLOCKSIZES:
        raise ValueError(f"{op}: blocksize must be one of {BSR_BLOCKSIZES}, got {b}")
    if crow_indices.dtype != torch.int32 or col_indices.dtype not in (torch.int16, torch.int32):
        raise TypeError(f"{op}: crow_indices must be int32 and col_indices int16/int32, got "
                        f"{crow_indices.dtype} and {col_indices.dtype}")  # fmt: skip
    mb = crow_indices.numel() - 1
    return launch_row_blocks(
        op, _bsr_linear_kernel, x, (crow_indices, col_indices), values, bias, out,
        out_features=out_features, row_blocks=mb, rows=b, what="block rows", meta={"B": b},
        config_of=lambda n: bsr_config(mb, n, values.shape[0], b, device),
        config=config, key=("bsr", b, values.shape[0]),
    )  # fmt: skip
