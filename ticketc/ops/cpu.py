"""The custom ops' CPU kernels: ticketc.kernels' Numba CSR chain and direct sparse conv for
fp32 (fp16 / bf16 computed in fp32), MKL through torch's sparse tensors for fp64 and BSR, and
the cache of prepared kernel objects the registered ops find their weights in."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ticketc.ops.checks import (
    check_bsr_args,
    check_chain_args,
    check_conv_args,
    check_csr_args,
)
from ticketc.ops.reference import (
    acc_dtype,
    bsr_linear_reference,
    chain_layer_by_layer,
    csr_conv2d_reference,
)

_MKL_BSR_MAX_N = 16  # measured: MKL's BSR wins at batch 1, the einsum reference at batch 64


def _quiet_sparse(make: Callable[[], Tensor]) -> Tensor:
    """torch's sparse constructors warn that sparse CSR/BSR is in beta on every first use:
    silenced here, locally (no global warning filter is installed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        return make()


# ---- prepared CPU weights
#
# The CPU kernels (ticketc.kernels.csr_chain_cpu / csr_conv_cpu, Numba) take a weight packed
# once into NumPy arrays; preparing it costs far more than a small layer's product. Modules keep
# theirs (ticketc.compile.modules); the registered ops, called from graphs with the same buffer
# tensors every time, find theirs here: keyed by the tensors' identity (weak references, so a
# freed tensor whose memory is reused never matches) and their in-place version counters.

_PREPARED: dict[tuple, tuple[tuple, tuple[int, ...], Any]] = {}


_PREPARED_MAX = 512


def prepared(tensors: tuple[Tensor | None, ...], extra: tuple, build: Callable[[], Any]) -> Any:
    """build(), cached for these very tensors (unchanged since) and `extra` (hashable)."""
    key = (tuple(id(t) for t in tensors), extra)
    versions = tuple(-1 if t is None else t._version for t in tensors)
    hit = _PREPARED.get(key)
    if hit is not None:
        refs, cached_versions, value = hit
        if cached_versions == versions and all(
            (r is None and t is None) or (r is not None and r() is t)
            for r, t in zip(refs, tensors, strict=True)
        ):
            return value
    value = build()
    if len(_PREPARED) >= _PREPARED_MAX:
        _PREPARED.clear()
    refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
    _PREPARED[key] = (refs, versions, value)
    return value


def cpu_kernels() -> Any:
    """ticketc.kernels.csr_chain_cpu and csr_conv_cpu, imported on first use (importing Numba
    takes ~0.5 s): `cpu_kernels().chain`, `cpu_kernels().conv`."""
    global _CPU_KERNELS
    if _CPU_KERNELS is None:
        from ticketc.kernels import csr_chain_cpu, csr_conv_cpu

        _CPU_KERNELS = _Kernels(csr_chain_cpu, csr_conv_cpu)
    return _CPU_KERNELS


class _Kernels:
    def __init__(self, chain: Any, conv: Any) -> None:
        self.chain, self.conv = chain, conv


_CPU_KERNELS: _Kernels | None = None


def cpu_chain(layers: list[tuple[Tensor, Tensor, Tensor, Tensor | None, int]], relus: list[bool]):
    """A ticketc.kernels.csr_chain_cpu.CsrChain for CSR layers given as
    (crow_indices, col_indices, values, bias or None, in_features), ReLU after those flagged."""
    chain = cpu_kernels().chain
    return chain.CsrChain([chain.CsrLayer.of(*layer) for layer in layers], relus)


def cpu_conv(crow, col, values, bias, weight_shape, stride, padding, dilation, groups):
    """A ticketc.kernels.csr_conv_cpu.CsrConv for this weight and geometry."""
    conv = cpu_kernels().conv
    m, cg, kh, kw = (int(s) for s in weight_shape)
    geometry = conv.ConvGeometry(cg * groups, m, (kh, kw), tuple(stride), tuple(padding),
                                 tuple(dilation), groups)  # fmt: skip
    return conv.CsrConv(crow, col, values, bias, geometry)


def csr_linear_cpu(x, crow_indices, col_indices, values, row_order, bias):
    check_csr_args(x, crow_indices, col_indices, values, row_order, bias)
    if x.dtype == torch.float64 or values.dtype == torch.float64:  # fp64 accumulation: MKL
        return _csr_mkl(x, crow_indices, col_indices, values, bias)
    k = x.shape[1]
    chain = prepared(
        (crow_indices, col_indices, values, bias),
        ("linear", k),
        lambda: cpu_chain([(crow_indices, col_indices, values, bias, k)], [False]),
    )
    y = chain(x if x.dtype == torch.float32 else x.float())
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _csr_mkl(x, crow_indices, col_indices, values, bias):
    """torch's CSR product (MKL on CPU), accumulating in x's dtype (fp64 here)."""
    m, k = crow_indices.numel() - 1, x.shape[1]
    index = crow_indices.dtype
    col = col_indices if col_indices.dtype == index else col_indices.to(index)
    if col.numel() and int(col.max()) >= k:
        raise ValueError(f"csr_linear: column index {int(col.max())} >= {k} input features")
    w = _quiet_sparse(
        lambda: torch.sparse_csr_tensor(
            crow_indices, col, values.to(x.dtype), (m, k), check_invariants=False
        )
    )
    y = torch.mm(w, x.t()).t()
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.contiguous()


def csr_chain_cpu(x, crows, cols, values, biases, relus):
    check_chain_args(x, crows, cols, values, biases, relus)
    if x.dtype == torch.float64 or any(v.dtype == torch.float64 for v in values):
        return chain_layer_by_layer(x, crows, cols, values, biases, relus, csr_linear_cpu)
    widths = [x.shape[1]] + [c.numel() - 1 for c in crows[:-1]]
    chain = prepared(
        (*crows, *cols, *values, *biases),
        ("chain", tuple(widths), tuple(relus)),
        lambda: cpu_chain(list(zip(crows, cols, values, biases, widths, strict=True)), relus),
    )
    y = chain(x if x.dtype == torch.float32 else x.float())
    return y if y.dtype == x.dtype else y.to(x.dtype)


def csr_conv2d_cpu(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups,
                   relu):  # fmt: skip
    check_conv_args(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups)
    if x.dtype == torch.float64 or values.dtype == torch.float64:
        return csr_conv2d_reference(x, crow, col, values, bias, weight_shape, stride, padding,
                                    dilation, groups, relu)  # fmt: skip
    conv = prepared(
        (crow, col, values, bias),
        ("conv", tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation), groups),
        lambda: cpu_conv(crow, col, values, bias, weight_shape, stride, padding, dilation, groups),
    )
    y = conv(x if x.dtype == torch.float32 else x.float(), relu=relu)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def bsr_linear_cpu(x, crow_indices, col_indices, values, bias, out_features):
    check_bsr_args(x, crow_indices, col_indices, values, bias, out_features)
    n, k = x.shape
    if n > _MKL_BSR_MAX_N:
        return bsr_linear_reference(x, crow_indices, col_indices, values, bias, out_features)
    acc = acc_dtype(x)
    b = values.shape[-1]
    mb, kb = crow_indices.numel() - 1, -(-k // b)
    index = crow_indices.dtype
    col = col_indices if col_indices.dtype == index else col_indices.to(index)
    w = _quiet_sparse(
        lambda: torch.sparse_bsr_tensor(
            crow_indices, col, values.to(acc), (mb * b, kb * b), check_invariants=False
        )
    )
    xt = torch.nn.functional.pad(x.to(acc), (0, kb * b - k)).t()
    y = torch.mm(w, xt)[:out_features]
    if bias is not None:
        y += bias.to(acc)[:, None]
    return y.t().to(x.dtype).contiguous()
