"""Argument checks of the custom ops: one clear TypeError / ValueError naming the op and the
bad argument, raised before any kernel runs (a kernel reading past an array would not)."""

from __future__ import annotations

import torch
from torch import Tensor

from ticketc.formats.tiled import TILE_MS


def check_x(x: Tensor, op: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [N, K] (flatten leading dims), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be floating point, got dtype {x.dtype}")


def check_bias(bias: Tensor | None, m: int, op: str) -> None:
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"{op}: bias must have shape ({m},), got {tuple(bias.shape)}")


def check_index(t: Tensor, name: str, allowed: tuple[torch.dtype, ...], op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise TypeError(f"{op}: {name} must have dtype in {allowed}, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")


def check_csr_args(x, crow, col, values, row_order, bias) -> None:
    op = "csr_linear"
    check_x(x, op)
    check_index(crow, "crow_indices", (torch.int32, torch.int64), op)
    check_index(col, "col_indices", (torch.int16, torch.int32, torch.int64), op)
    check_index(row_order, "row_order", (torch.int32, torch.int64), op)
    if not values.is_floating_point() or values.dim() != 1:
        raise TypeError(
            f"{op}: values must be 1-D floating point, got {values.dtype} {tuple(values.shape)}"
        )
    if col.numel() != values.numel():
        raise ValueError(f"{op}: col_indices has {col.numel()} entries, values {values.numel()}")
    if row_order.numel() != crow.numel() - 1:
        raise ValueError(
            f"{op}: row_order has {row_order.numel()} entries for {crow.numel() - 1} rows"
        )
    check_bias(bias, crow.numel() - 1, op)


def check_bsr_args(x, crow, col, values, bias, out_features) -> None:
    op = "bsr_linear"
    check_x(x, op)
    check_index(crow, "crow_indices", (torch.int32, torch.int64), op)
    check_index(col, "col_indices", (torch.int16, torch.int32, torch.int64), op)
    if values.dim() != 3 or values.shape[1] != values.shape[2] or not values.is_floating_point():
        raise ValueError(
            f"{op}: values must be floating point [nblocks, b, b], got "
            f"{values.dtype} {tuple(values.shape)}"
        )
    if col.numel() != values.shape[0]:
        raise ValueError(f"{op}: col_indices has {col.numel()} blocks, values {values.shape[0]}")
    b = values.shape[1]
    if not (crow.numel() - 2) * b < out_features <= (crow.numel() - 1) * b:
        raise ValueError(
            f"{op}: out_features={out_features} does not match {crow.numel() - 1} block rows of {b}"
        )
    check_bias(bias, out_features, op)


def check_tiled_args(
    x, tile_crow, tile_col, tile_offsets, row_offsets, bitmaps, values, bias, out_features
) -> None:
    op = "tiled_linear"
    check_x(x, op)
    check_index(tile_crow, "tile_crow", (torch.int32,), op)
    check_index(tile_col, "tile_col", (torch.int32,), op)
    check_index(tile_offsets, "tile_offsets", (torch.int32,), op)
    if bitmaps.dtype != torch.int32 or bitmaps.dim() != 2 or bitmaps.shape[1] not in TILE_MS:
        raise ValueError(
            f"{op}: bitmaps must be int32 [ntiles, tile_m] with tile_m in "
            f"{TILE_MS}, got {bitmaps.dtype} {tuple(bitmaps.shape)}"
        )
    if row_offsets.dtype != torch.int16 or row_offsets.shape != bitmaps.shape:
        raise ValueError(
            f"{op}: row_offsets must be int16 {tuple(bitmaps.shape)}, got "
            f"{row_offsets.dtype} {tuple(row_offsets.shape)}"
        )
    ntiles = bitmaps.shape[0]
    if tile_col.numel() != ntiles or tile_offsets.numel() != ntiles:
        raise ValueError(
            f"{op}: tile_col/tile_offsets must have {ntiles} entries, got "
            f"{tile_col.numel()}/{tile_offsets.numel()}"
        )
    if not values.is_floating_point() or values.dim() != 1:
        raise TypeError(f"{op}: values must be 1-D floating point, got {values.dtype}")
    tile_m = bitmaps.shape[1]
    if not (tile_crow.numel() - 2) * tile_m < out_features <= (tile_crow.numel() - 1) * tile_m:
        raise ValueError(
            f"{op}: out_features={out_features} does not match "
            f"{tile_crow.numel() - 1} tile rows of {tile_m}"
        )
    check_bias(bias, out_features, op)


def check_chain_args(x, crows, cols, values, biases, relus) -> None:
    if not (len(crows) == len(cols) == len(values) == len(biases) == len(relus) >= 1):
        raise ValueError(
            f"csr_chain: {len(crows)} crow, {len(cols)} col, {len(values)} values, "
            f"{len(biases)} bias, {len(relus)} relu entries: one per layer, at least one"
        )
    check_x(x, "csr_chain")


def check_conv_args(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups):
    op = "csr_conv2d"
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point [N, C, H, W] tensor")
    if len(weight_shape) != 4 or len(stride) != 2 or len(padding) != 4 or len(dilation) != 2:
        raise ValueError(f"{op}: weight_shape has 4 entries, stride 2, padding 4, dilation 2")
    m, cg = weight_shape[0], weight_shape[1]
    if groups < 1 or x.shape[1] != cg * groups or m % groups:
        raise ValueError(
            f"{op}: x has {x.shape[1]} channels; weight {list(weight_shape)}, groups {groups}"
        )
    check_index(crow, "crow_indices", (torch.int32, torch.int64), op)
    check_index(col, "col_indices", (torch.int16, torch.int32, torch.int64), op)
    if crow.numel() != m + 1 or col.numel() != values.numel():
        raise ValueError(f"{op}: {crow.numel()} row pointers for {m} rows, or col/values differ")
    check_bias(bias, m, op)
