"""Registration of `torch.ops.ticketc.*`: each op's schema, its CPU and CUDA kernels
(ticketc.ops.cpu / cuda), a CompositeExplicitAutograd fallback (argument checks, then the
pure-torch reference, for any other device) and a fake for torch.compile / torch.export.
Importing this module registers them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ticketc.ops import checks, reference
from ticketc.ops.cpu import bsr_linear_cpu, csr_chain_cpu, csr_conv2d_cpu, csr_linear_cpu
from ticketc.ops.cuda import (
    bsr_linear_cuda,
    csr_chain_cuda,
    csr_conv2d_cuda,
    csr_linear_cuda,
    tiled_linear_cuda,
)

# Each op: a schema, a CPU kernel (Numba, or MKL), a CUDA kernel (Triton), a
# CompositeExplicitAutograd fallback (the reference, for any other device) and a fake for
# torch.compile / torch.export. They are registered with
# torch.library.define / impl rather than torch.library.custom_op: the latter's Python wrapper
# costs ~25 us per call (measured), more than a whole Lenet ticket's forward at batch 1.

_LIB = torch.library.Library("ticketc", "FRAGMENT")

_LIB.define(
    "csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
    "Tensor row_order, Tensor? bias) -> Tensor"
)
_LIB.define(
    "csr_chain(Tensor x, Tensor[] crow_indices, Tensor[] col_indices, Tensor[] values, "
    "Tensor?[] bias, bool[] relu) -> Tensor"
)
_LIB.define(
    "csr_conv2d(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
    "int[] weight_shape, int[] stride, int[] padding, int[] dilation, int groups, bool relu) "
    "-> Tensor"
)
_LIB.define(
    "bsr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
    "SymInt out_features) -> Tensor"
)
_LIB.define(
    "tiled_linear(Tensor x, Tensor tile_crow, Tensor tile_col, Tensor tile_offsets, "
    "Tensor row_offsets, Tensor bitmaps, Tensor values, Tensor? bias, SymInt out_features) "
    "-> Tensor"
)


def _csr_linear_default(x, crow_indices, col_indices, values, row_order, bias):
    checks.check_csr_args(x, crow_indices, col_indices, values, row_order, bias)
    return reference.csr_linear_reference(x, crow_indices, col_indices, values, row_order, bias)


def _csr_linear_fake(x, crow_indices, col_indices, values, row_order, bias):
    return x.new_empty((x.shape[0], crow_indices.shape[0] - 1))


def _csr_chain_default(x, crows, cols, values, biases, relus):
    checks.check_chain_args(x, crows, cols, values, biases, relus)
    return reference.chain_layer_by_layer(
        x, crows, cols, values, biases, relus, _csr_linear_default
    )


def _csr_chain_fake(x, crows, cols, values, biases, relus):
    return x.new_empty((x.shape[0], crows[-1].shape[0] - 1))


def _csr_conv2d_default(x, crow, col, values, bias, weight_shape, stride, padding, dilation,
                        groups, relu):  # fmt: skip
    checks.check_conv_args(x, crow, col, values, bias, weight_shape, stride, padding, dilation,
                           groups)  # fmt: skip
    return reference.csr_conv2d_reference(x, crow, col, values, bias, weight_shape, stride,
                                          padding, dilation, groups, relu)  # fmt: skip


def _csr_conv2d_fake(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups,
                     relu):  # fmt: skip
    n, _, h, w = x.shape
    oh, ow = reference.conv_output_size(h, w, list(weight_shape[2:]), stride, padding, dilation)
    return x.new_empty((n, weight_shape[0], oh, ow))


def _bsr_linear_default(x, crow_indices, col_indices, values, bias, out_features):
    checks.check_bsr_args(x, crow_indices, col_indices, values, bias, out_features)
    return reference.bsr_linear_reference(x, crow_indices, col_indices, values, bias, out_features)


def _bsr_linear_fake(x, crow_indices, col_indices, values, bias, out_features):
    return x.new_empty((x.shape[0], out_features))


def _tiled_linear_default(*args):
    checks.check_tiled_args(*args)
    return reference.tiled_linear_reference(*args)


def _tiled_linear_fake(x, tile_crow, tile_col, tile_offsets, row_offsets, bitmaps, values, bias,
                       out_features):  # fmt: skip
    return x.new_empty((x.shape[0], out_features))


_Impl = Callable[..., Tensor]


_REGISTRATIONS: dict[str, tuple[_Impl, _Impl | None, _Impl, _Impl]] = {
    "csr_linear": (_csr_linear_default, csr_linear_cpu, csr_linear_cuda, _csr_linear_fake),
    "csr_chain": (_csr_chain_default, csr_chain_cpu, csr_chain_cuda, _csr_chain_fake),
    "csr_conv2d": (_csr_conv2d_default, csr_conv2d_cpu, csr_conv2d_cuda, _csr_conv2d_fake),
    "bsr_linear": (_bsr_linear_default, bsr_linear_cpu, bsr_linear_cuda, _bsr_linear_fake),
    "tiled_linear": (_tiled_linear_default, None, tiled_linear_cuda, _tiled_linear_fake),
}
for _name, (_default, _cpu, _cuda, _fake) in _REGISTRATIONS.items():
    _LIB.impl(_name, _default, "CompositeExplicitAutograd")
    if _cpu is not None:
        _LIB.impl(_name, _cpu, "CPU")
    _LIB.impl(_name, _cuda, "CUDA")
    torch.library.register_fake(f"ticketc::{_name}", _fake, lib=_LIB)
