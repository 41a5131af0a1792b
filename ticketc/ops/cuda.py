"""The custom ops' CUDA kernels: ticketc.kernels' Triton kernels (Triton imported on first
use), convs as unfold + csr_linear; the pure-torch reference where Triton or a dtype is
missing."""

from __future__ import annotations

import torch

from ticketc.formats.layout import rows_of
from ticketc.ops.checks import (
    check_bsr_args,
    check_chain_args,
    check_conv_args,
    check_csr_args,
    check_tiled_args,
)
from ticketc.ops.reference import (
    bsr_linear_reference,
    chain_layer_by_layer,
    conv_output_size,
    csr_conv2d_reference,
    csr_linear_reference,
    tiled_linear_reference,
)


def triton_or_none():
    """ticketc's Triton kernels by name, or None when Triton is missing (the reference runs)."""
    from ticketc.kernels import triton_kernels

    try:
        return triton_kernels()
    except ImportError:
        return None


def csr_linear_cuda(x, crow_indices, col_indices, values, row_order, bias):
    check_csr_args(x, crow_indices, col_indices, values, row_order, bias)
    kernels = triton_or_none()
    if kernels is None or x.dtype == torch.float64 or values.dtype == torch.float64:
        return csr_linear_reference(x, crow_indices, col_indices, values, row_order, bias)
    crow, order = crow_indices.to(torch.int32), row_order.to(torch.int32)
    col = col_indices if col_indices.dtype != torch.int64 else col_indices.to(torch.int32)
    return kernels.csr_linear(x, crow, col, values, order, bias)


def csr_chain_cuda(x, crows, cols, values, biases, relus):
    check_chain_args(x, crows, cols, values, biases, relus)
    return chain_layer_by_layer(x, crows, cols, values, biases, relus, csr_linear_cuda)


def csr_conv2d_cuda(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups,
                    relu):  # fmt: skip
    check_conv_args(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups)
    if triton_or_none() is None or x.dtype == torch.float64:
        return csr_conv2d_reference(x, crow, col, values, bias, weight_shape, stride, padding,
                                    dilation, groups, relu)  # fmt: skip
    # unfold + one GEMM whose weight is block-diagonal over the groups: row m of group g reads
    # the unfolded columns of g's channels, so its column indices move by g * width.
    m, cg, kh, kw = (int(s) for s in weight_shape)
    width = cg * kh * kw
    rows = rows_of(crow)
    col_bd = (col.long() + rows // (m // groups) * width).to(torch.int32)
    counts = crow[1:] - crow[:-1]
    order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    pt, pb, pl, pr = padding
    n, _, h, w = x.shape
    oh, ow = conv_output_size(h, w, [kh, kw], stride, padding, dilation)
    xp = torch.nn.functional.pad(x, (pl, pr, pt, pb))
    cols = torch.nn.functional.unfold(xp, (kh, kw), dilation=tuple(dilation), stride=tuple(stride))
    y = csr_linear_cuda(cols.transpose(1, 2).reshape(-1, cg * groups * kh * kw).contiguous(),
                        crow, col_bd, values, order, bias)  # fmt: skip
    y = y.reshape(n, oh * ow, m).transpose(1, 2).reshape(n, m, oh, ow)
    return torch.relu(y) if relu else y


def bsr_linear_cuda(x, crow_indices, col_indices, values, bias, out_features):
    check_bsr_args(x, crow_indices, col_indices, values, bias, out_features)
    kernels = triton_or_none()
    if (
        kernels is None
        or values.shape[-1] not in kernels.BSR_BLOCKSIZES
        or x.dtype == torch.float64
        or values.dtype == torch.float64
    ):
        return bsr_linear_reference(x, crow_indices, col_indices, values, bias, out_features)
    crow = crow_indices.to(torch.int32)
    col = col_indices if col_indices.dtype != torch.int64 else col_indices.to(torch.int32)
    return kernels.bsr_linear(x, crow, col, values, bias, out_features)


def tiled_linear_cuda(*args):
    check_tiled_args(*args)
    kernels = triton_or_none()
    x, values = args[0], args[6]
    if kernels is None or x.dtype == torch.float64 or values.dtype == torch.float64:
        return tiled_linear_reference(*args)
    return kernels.tiled_linear(*args)
