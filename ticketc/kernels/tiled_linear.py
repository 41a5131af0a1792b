"""y = x @ W.T (+ bias) with W in bitmap tiles, decoded in registers and fed to tensor cores.

The Flash-LLM / SpInfer idea for unstructured masks at moderate sparsity and batch >= ~16:
store each TILE_M x 32 tile as one int32 bitmap word per row plus its kept values, load the
compact form (bandwidth ~ density), expand it to a dense tile in registers and run tl.dot.
A row's values start at tile_offsets[t] + row_offsets[t, i]; element j of the row sits at
that start plus the number of set bits below bit j (an in-register prefix sum).

Blocked pseudo-code, one program per (tile row, BLOCK_N batch rows, split)::

    acc[BLOCK_N, TILE_M] = 0                                         # fp32
    for t in tile_crow[row] + split, ..., tile_crow[row + 1], step SPLIT_K:
        bits[i, j] = (bitmaps[t, i] >> j) & 1                        # [TILE_M, 32]
        rank[i, j] = cumsum(bits[i, :], axis=1)[j] - bits[i, j]
        w[i, j]    = values[tile_offsets[t] + row_offsets[t, i] + rank[i, j]] if bits[i, j] else 0
        acc       += tl.dot(x[n_block, 32 * tile_col[t] : +32], w.T)
    y[n_block, row * TILE_M : +TILE_M] (+)= acc (+ bias)             # cropped to M
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

TILE_K = 32  # one int32 bitmap word per tile row
TILE_MS = (16, 32, 64)


@triton.jit
def _tiled_linear_kernel(
    # pointers
    x_ptr, y_ptr, tile_crow_ptr, tile_col_ptr, tile_off_ptr, row_off_ptr, bitmap_ptr, val_ptr,
    bias_ptr,
    # sizes
    M, N, K, SPLIT_K,
    # strides
    stride_xn, stride_xk, stride_yn, stride_ym,
    # meta
    HAS_BIAS: tl.constexpr, TILE_M: tl.constexpr, TILE_K: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k, start, end, ns, n_ok = row_block_program(tile_crow_ptr, N, BLOCK_N)
    i = tl.arange(0, TILE_M)
    j = tl.arange(0, TILE_K)

    acc = tl.zeros([BLOCK_N, TILE_M], dtype=tl.float32)
    first = start + pid_k
    col_p = tile_col_ptr + first
    off_p = tile_off_ptr + first
    row_p = row_off_ptr + first.to(tl.int64) * TILE_M + i
    bit_p = bitmap_ptr + first.to(tl.int64) * TILE_M + i
    for _ in range(first, end, SPLIT_K):
        words = tl.load(bit_p)  # [TILE_M] int32
        present = (words[:, None] >> j[None, :]) & 1  # arithmetic shift: bit 31 still reads right
        rank = tl.cumsum(present, axis=1) - present
        row_start = tl.load(off_p) + tl.load(row_p).to(tl.int32)  # [TILE_M]
        w = tl.load(val_ptr + row_start[:, None] + rank, mask=present != 0, other=0.0)
        ks = tl.load(col_p).to(tl.int64) * TILE_K + j
        acc = accumulate_tile(acc, x_ptr, ns, n_ok, ks, K, stride_xn, stride_xk, tl.trans(w),
                              DOT_FP32)  # fmt: skip
        col_p += SPLIT_K
        off_p += SPLIT_K
        row_p += SPLIT_K * TILE_M
        bit_p += SPLIT_K * TILE_M

    rows = pid_m * TILE_M + i
    store_rows(acc, rows, ns, n_ok, M, pid_k, bias_ptr, y_ptr, stride_yn, stride_ym,
               HAS_BIAS, ATOMIC)  # fmt: skip


@functools.lru_cache(maxsize=1024)  # pure, and called on every launch
def tiled_config(mt: int, n: int, ntiles: int, device: torch.device) -> dict[str, int]:
    """Launch parameters: BLOCK_N from the batch, SPLIT_K when the grid is too small."""
    block_n = max(16, min(next_pow2(n), 128))
    programs = mt * -(-n // block_n)
    split = split_k_for(ntiles / max(mt, 1), programs, device)
    return {"BLOCK_N": block_n, "SPLIT_K": split, "num_warps": 8 if block_n >= 128 else 4}


def tiled_linear(
    x: Tensor,
    tile_crow: Tensor,
    tile_col: Tensor,
    tile_offsets: Tensor,
    row_offsets: Tensor,
    bitmaps: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
    *,
    config: dict[str, int] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """y = x @ W.T (+ bias) for W in `ticketc.formats.Tiled` form; y [N, out_features].

    `config` overrides the launch table (keys of `tiled_config`); `out` is written in place.
    """
    op = "tiled_linear"
    device = check_device(
        op, x=x, tile_crow=tile_crow, tile_col=tile_col, tile_offsets=tile_offsets,
        row_offsets=row_offsets, bitmaps=bitmaps, values=values, bias=bias,
    )  # fmt: skip
    check_float(op, "x", x)
    check_float(op, "values", values)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [N, K], got {tuple(x.shape)}")
    for name, t in (("tile_crow", tile_crow), ("tile_col", tile_col),
                    ("tile_offsets", tile_offsets), ("bitmaps", bitmaps)):  # fmt: skip
        if t.dtype != torch.int32:
            raise TypeError(f"{op}: {name} must be int32, got {t.dtype}")
    if bitmaps.dim() != 2 or bitmaps.shape[1] not in TILE_MS:
        raise ValueError(f"{op}: bitmaps must be [ntiles, tile_m], tile_m in {TILE_MS}, got "
                         f"{tuple(bitmaps.shape)}")  # fmt: skip
    if row_offsets.dtype != torch.int16 or row_offsets.shape != bitmaps.shape:
        raise ValueError(f"{op}: row_offsets must be int16 {tuple(bitmaps.shape)}, got "
                         f"{row_offsets.dtype} {tuple(row_offsets.shape)}")  # fmt: skip
    tile_m = bitmaps.shape[1]
    mt = tile_crow.numel() - 1
    arrays = (tile_crow, tile_col, tile_offsets, row_offsets, bitmaps)
    return launch_row_blocks(
        op, _tiled_linear_kernel, x, arrays, values, bias, out,
        out_features=out_features, row_blocks=mt, rows=tile_m, what="tile rows",
        meta={"TILE_M": tile_m, "TILE_K": TILE_K},
        config_of=lambda n: tiled_config(mt, n, bitmaps.shape[0], device),
        config=config, key=("tiled", tile_m, values.numel()),
    )  # fmt: skip
