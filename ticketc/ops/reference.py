"""Pure-torch twins of the custom ops, same arguments: the test oracle and the fallback for
devices and dtypes without a kernel. Accumulation is fp32 (fp64 for fp64 inputs)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ticketc.formats.csr import CSR
from ticketc.formats.layout import rows_of
from ticketc.formats.tiled import Tiled
from ticketc.ops.checks import check_bias, check_x


def acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def csr_linear_reference(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    row_order: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x @ W.T (+ bias) for W in CSR form (ticketc.formats.csr); pure torch,
    fp32 (fp64) accumulation.

    `row_order` is accepted for symmetry with the op and ignored: order does not change y.
    """
    check_x(x, "csr_linear")
    m = crow_indices.numel() - 1
    check_bias(bias, m, "csr_linear")
    acc = acc_dtype(x)
    rows = rows_of(crow_indices)
    # [N, nnz] products scattered into [N, M]: memory N * nnz, fine for an oracle.
    prod = x.to(acc)[:, col_indices.long()] * values.to(acc)
    y = torch.zeros(x.shape[0], m, dtype=acc, device=x.device).index_add_(1, rows, prod)
    if bias is not None:
        y += bias.to(acc)
    return y.to(x.dtype)


def bsr_linear_reference(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """y = x @ W.T (+ bias) for W in BSR form (ticketc.formats.bsr); pure torch,
    fp32 (fp64) accumulation."""
    check_x(x, "bsr_linear")
    check_bias(bias, out_features, "bsr_linear")
    acc = acc_dtype(x)
    n, k = x.shape
    b = values.shape[-1]
    mb, kb = crow_indices.numel() - 1, -(-k // b)
    xb = torch.nn.functional.pad(x.to(acc), (0, kb * b - k)).reshape(n, kb, b)
    # block p contributes W_p @ x[:, cols of p] to the rows of its block row
    part = torch.einsum("npj,pij->npi", xb[:, col_indices.long()], values.to(acc))
    y = torch.zeros(n, mb, b, dtype=acc, device=x.device)
    y.index_add_(1, rows_of(crow_indices), part)
    y = y.reshape(n, mb * b)[:, :out_features]
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def tiled_linear_reference(
    x: Tensor,
    tile_crow: Tensor,
    tile_col: Tensor,
    tile_offsets: Tensor,
    row_offsets: Tensor,
    bitmaps: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """y = x @ W.T (+ bias) for W in tiled form (ticketc.formats.tiled): decode to
    dense, then matmul.

    Decodes from bitmaps and values only; the offsets are what the Triton kernel uses to find
    a row's values without a scan over the whole tile, and the kernel tests check them.
    """
    check_x(x, "tiled_linear")
    check_bias(bias, out_features, "tiled_linear")
    acc = acc_dtype(x)
    tiled = Tiled((out_features, x.shape[1]), tile_crow, tile_col, tile_offsets, row_offsets,
                  bitmaps, values)  # fmt: skip
    w = tiled.to_dense().to(acc)
    y = x.to(acc) @ w.T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def conv_output_size(
    h: Any, w: Any, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int]
) -> tuple[Any, Any]:
    """(OH, OW) of a conv on an h x w input (ints or SymInts); padding [top, bottom, left,
    right]."""
    (kh, kw), (sy, sx), (dy, dx) = kernel, stride, dilation
    pt, pb, pl, pr = padding
    return (h + pt + pb - dy * (kh - 1) - 1) // sy + 1, (w + pl + pr - dx * (kw - 1) - 1) // sx + 1


def csr_conv2d_reference(
    x, crow_indices, col_indices, values, bias, weight_shape, stride, padding, dilation, groups,
    relu,
):  # fmt: skip
    """The conv with the weight unpacked to dense: F.conv2d in fp32 (fp64 for fp64 inputs)."""
    acc = acc_dtype(x)
    w = CSR(tuple(weight_shape), crow_indices, col_indices, values).to_dense().to(acc)
    pt, pb, pl, pr = padding
    xp = torch.nn.functional.pad(x.to(acc), (pl, pr, pt, pb))
    b = None if bias is None else bias.to(acc)
    y = torch.nn.functional.conv2d(xp, w, b, tuple(stride), 0, tuple(dilation), groups)
    y = torch.relu(y) if relu else y
    return y.to(x.dtype)


def chain_layer_by_layer(x, crows, cols, values, biases, relus, linear):
    for crow, col, vals, bias, relu in zip(crows, cols, values, biases, relus, strict=True):
        order = torch.arange(crow.numel() - 1, dtype=torch.int32, device=crow.device)
        x = linear(x, crow, col, vals, order, bias)
        x = torch.relu(x) if relu else x
    return x
