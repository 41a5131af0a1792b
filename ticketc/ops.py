"""Sparse linear ops: pure-torch references and `torch.ops.ticketc.*` custom ops.

Interface (stable; ticketc.compile stores these buffers and calls these ops). The weight
arguments are the arrays of one format of ticketc.formats, in its `BUFFERS` order:
`CSR.from_dense(w).buffers()`, `BSR.from_dense(w, b).buffers()`,
`Tiled.from_dense(w).buffers()` (dtypes and shapes in those files)::

    torch.ops.ticketc.csr_linear(x, crow_indices, col_indices, values, row_order, bias) -> y
    torch.ops.ticketc.bsr_linear(x, crow_indices, col_indices, values, bias, out_features) -> y
    torch.ops.ticketc.tiled_linear(x, tile_crow, tile_col, tile_offsets, row_offsets, bitmaps,
                                   values, bias, out_features) -> y
        y = x @ W.T (+ bias); x [N, K] 2-D (callers flatten leading dims), y [N, M] in x.dtype,
        row-major, bias [M] or None. Accumulation is fp32 (fp64 for fp64 inputs).
    torch.ops.ticketc.csr_chain(x, crow_indices[], col_indices[], values[], bias[], relu[]) -> y
        Consecutive csr_linear layers in one call, max(., 0) after the layers flagged in relu:
        one graph node (one dispatch) for a whole MLP.
    torch.ops.ticketc.csr_conv2d(x, crow_indices, col_indices, values, bias, weight_shape,
                                 stride, padding, dilation, groups, relu) -> y
        Conv2d of x [N, C, H, W] with the weight weight_shape = [M, C/groups, kh, kw] stored as
        CSR over its rows flattened to [M, C/groups*kh*kw] (CSR.from_dense of the conv weight);
        padding [top, bottom, left, right] (zeros); y [N, M, OH, OW], ReLU fused if `relu`.

    CPU: csr_linear, csr_chain and csr_conv2d run the Numba kernels of ticketc.kernels
    (csr_chain_cpu, csr_conv_cpu; fp16/bf16 computed in fp32, fp64 on MKL or the reference);
    bsr_linear MKL or the reference. CUDA: the Triton kernels in ticketc.kernels (convs as
    unfold + csr_linear). Each op has a pure-torch twin `<op>_reference(...)` with the same
    arguments: the test oracle and the fallback for other devices.

    csr_linear(...), bsr_linear(...), tiled_linear(...)   (same arguments, in this module)
        The ops without the dispatcher's ~10 us per call: in eager mode on plain CPU / CUDA
        tensors they call the kernels directly, otherwise (torch.compile, torch.export, fake
        tensors) torch.ops.ticketc.*. Prefer them in modules' forward.

Which op where (CUDA; measure with benchmarks/kernels_bench.py, the planner decides):
csr_linear for batch 1..~32 (CUDA-core gather kernel, reads each nonzero once: the batch-1
path); tiled_linear for larger batches on unstructured masks at moderate density (tensor
cores, loads ~density x dense bytes + 1 bit per weight); bsr_linear for block-pruned masks
(tensor cores, blocks 16/32/64/128). On CPU the planner uses csr (and dense) only: tiled_linear
has only the reference there (it decodes the tiles on every call), bsr_linear MKL's BSR.

Importing this module registers the ops (cheaply: schemas and Python kernels); Numba and Triton
are imported on first use.

Triton is imported only inside the CUDA implementations, so this module imports on a machine
without a GPU or without Triton.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ticketc.formats.csr import CSR
from ticketc.formats.layout import rows_of
from ticketc.formats.tiled import TILE_MS, Tiled

__all__ = [
    "bsr_linear",
    "bsr_linear_reference",
    "csr_linear",
    "csr_linear_reference",
    "tiled_linear",
    "tiled_linear_reference",
]



# ------------------------------------------------------------------------------- references


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_x(x: Tensor, op: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [N, K] (flatten leading dims), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be floating point, got dtype {x.dtype}")


def _check_bias(bias: Tensor | None, m: int, op: str) -> None:
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"{op}: bias must have shape ({m},), got {tuple(bias.shape)}")


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
    _check_x(x, "csr_linear")
    m = crow_indices.numel() - 1
    _check_bias(bias, m, "csr_linear")
    acc = _acc_dtype(x)
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
    _check_x(x, "bsr_linear")
    _check_bias(bias, out_features, "bsr_linear")
    acc = _acc_dtype(x)
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
    _check_x(x, "tiled_linear")
    _check_bias(bias, out_features, "tiled_linear")
    acc = _acc_dtype(x)
    tiled = Tiled((out_features, x.shape[1]), tile_crow, tile_col, tile_offsets, row_offsets,
                  bitmaps, values)  # fmt: skip
    w = tiled.to_dense().to(acc)
    y = x.to(acc) @ w.T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


# -------------------------------------------------------------------------------- custom ops
#
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


def _check_index(t: Tensor, name: str, allowed: tuple[torch.dtype, ...], op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise TypeError(f"{op}: {name} must have dtype in {allowed}, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")


def _check_csr_args(x, crow, col, values, row_order, bias) -> None:
    op = "csr_linear"
    _check_x(x, op)
    _check_index(crow, "crow_indices", (torch.int32, torch.int64), op)
    _check_index(col, "col_indices", (torch.int16, torch.int32, torch.int64), op)
    _check_index(row_order, "row_order", (torch.int32, torch.int64), op)
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
    _check_bias(bias, crow.numel() - 1, op)


def _check_bsr_args(x, crow, col, values, bias, out_features) -> None:
    op = "bsr_linear"
    _check_x(x, op)
    _check_index(crow, "crow_indices", (torch.int32, torch.int64), op)
    _check_index(col, "col_indices", (torch.int16, torch.int32, torch.int64), op)
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
    _check_bias(bias, out_features, op)


def _check_tiled_args(
    x, tile_crow, tile_col, tile_offsets, row_offsets, bitmaps, values, bias, out_features
) -> None:
    op = "tiled_linear"
    _check_x(x, op)
    _check_index(tile_crow, "tile_crow", (torch.int32,), op)
    _check_index(tile_col, "tile_col", (torch.int32,), op)
    _check_index(tile_offsets, "tile_offsets", (torch.int32,), op)
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
    _check_bias(bias, out_features, op)


def _triton_or_none():
    """ticketc's Triton kernels by name, or None when Triton is missing (the reference runs)."""
    from ticketc.kernels import triton_kernels

    try:
        return triton_kernels()
    except ImportError:
        return None


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


# ---- csr_linear


def _csr_linear_default(x, crow_indices, col_indices, values, row_order, bias):
    _check_csr_args(x, crow_indices, col_indices, values, row_order, bias)
    return csr_linear_reference(x, crow_indices, col_indices, values, row_order, bias)


def _csr_linear_cpu(x, crow_indices, col_indices, values, row_order, bias):
    _check_csr_args(x, crow_indices, col_indices, values, row_order, bias)
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


def _csr_linear_cuda(x, crow_indices, col_indices, values, row_order, bias):
    _check_csr_args(x, crow_indices, col_indices, values, row_order, bias)
    kernels = _triton_or_none()
    if kernels is None or x.dtype == torch.float64 or values.dtype == torch.float64:
        return csr_linear_reference(x, crow_indices, col_indices, values, row_order, bias)
    crow, order = crow_indices.to(torch.int32), row_order.to(torch.int32)
    col = col_indices if col_indices.dtype != torch.int64 else col_indices.to(torch.int32)
    return kernels.csr_linear(x, crow, col, values, order, bias)


def _csr_linear_fake(x, crow_indices, col_indices, values, row_order, bias):
    return x.new_empty((x.shape[0], crow_indices.shape[0] - 1))


# ---- csr_chain: consecutive csr_linear layers, a ReLU after those flagged, in one call


def _check_chain_args(x, crows, cols, values, biases, relus) -> None:
    if not (len(crows) == len(cols) == len(values) == len(biases) == len(relus) >= 1):
        raise ValueError(
            f"csr_chain: {len(crows)} crow, {len(cols)} col, {len(values)} values, "
            f"{len(biases)} bias, {len(relus)} relu entries: one per layer, at least one"
        )
    _check_x(x, "csr_chain")


def _chain_layer_by_layer(x, crows, cols, values, biases, relus, linear):
    for crow, col, vals, bias, relu in zip(crows, cols, values, biases, relus, strict=True):
        order = torch.arange(crow.numel() - 1, dtype=torch.int32, device=crow.device)
        x = linear(x, crow, col, vals, order, bias)
        x = torch.relu(x) if relu else x
    return x


def _csr_chain_default(x, crows, cols, values, biases, relus):
    _check_chain_args(x, crows, cols, values, biases, relus)
    return _chain_layer_by_layer(x, crows, cols, values, biases, relus, _csr_linear_default)


def _csr_chain_cpu(x, crows, cols, values, biases, relus):
    _check_chain_args(x, crows, cols, values, biases, relus)
    if x.dtype == torch.float64 or any(v.dtype == torch.float64 for v in values):
        return _chain_layer_by_layer(x, crows, cols, values, biases, relus, _csr_linear_cpu)
    widths = [x.shape[1]] + [c.numel() - 1 for c in crows[:-1]]
    chain = prepared(
        (*crows, *cols, *values, *biases),
        ("chain", tuple(widths), tuple(relus)),
        lambda: cpu_chain(list(zip(crows, cols, values, biases, widths, strict=True)), relus),
    )
    y = chain(x if x.dtype == torch.float32 else x.float())
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _csr_chain_cuda(x, crows, cols, values, biases, relus):
    _check_chain_args(x, crows, cols, values, biases, relus)
    return _chain_layer_by_layer(x, crows, cols, values, biases, relus, _csr_linear_cuda)


def _csr_chain_fake(x, crows, cols, values, biases, relus):
    return x.new_empty((x.shape[0], crows[-1].shape[0] - 1))


# ---- csr_conv2d: a conv whose weight [M, C/groups, kh, kw] is CSR over [M, C/groups*kh*kw]


def conv_output_size(
    h: Any, w: Any, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int]
) -> tuple[Any, Any]:
    """(OH, OW) of a conv on an h x w input (ints or SymInts); padding [top, bottom, left,
    right]."""
    (kh, kw), (sy, sx), (dy, dx) = kernel, stride, dilation
    pt, pb, pl, pr = padding
    return (h + pt + pb - dy * (kh - 1) - 1) // sy + 1, (w + pl + pr - dx * (kw - 1) - 1) // sx + 1


def _check_conv_args(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups):
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
    _check_index(crow, "crow_indices", (torch.int32, torch.int64), op)
    _check_index(col, "col_indices", (torch.int16, torch.int32, torch.int64), op)
    if crow.numel() != m + 1 or col.numel() != values.numel():
        raise ValueError(f"{op}: {crow.numel()} row pointers for {m} rows, or col/values differ")
    _check_bias(bias, m, op)


def csr_conv2d_reference(
    x, crow_indices, col_indices, values, bias, weight_shape, stride, padding, dilation, groups,
    relu,
):  # fmt: skip
    """The conv with the weight unpacked to dense: F.conv2d in fp32 (fp64 for fp64 inputs)."""
    acc = _acc_dtype(x)
    w = CSR(tuple(weight_shape), crow_indices, col_indices, values).to_dense().to(acc)
    pt, pb, pl, pr = padding
    xp = torch.nn.functional.pad(x.to(acc), (pl, pr, pt, pb))
    b = None if bias is None else bias.to(acc)
    y = torch.nn.functional.conv2d(xp, w, b, tuple(stride), 0, tuple(dilation), groups)
    y = torch.relu(y) if relu else y
    return y.to(x.dtype)


def _csr_conv2d_default(x, crow, col, values, bias, weight_shape, stride, padding, dilation,
                        groups, relu):  # fmt: skip
    _check_conv_args(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups)
    return csr_conv2d_reference(x, crow, col, values, bias, weight_shape, stride, padding,
                                dilation, groups, relu)  # fmt: skip


def _csr_conv2d_cpu(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups,
                    relu):  # fmt: skip
    _check_conv_args(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups)
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


def cpu_conv(crow, col, values, bias, weight_shape, stride, padding, dilation, groups):
    """A ticketc.kernels.csr_conv_cpu.CsrConv for this weight and geometry."""
    conv = cpu_kernels().conv
    m, cg, kh, kw = (int(s) for s in weight_shape)
    geometry = conv.ConvGeometry(cg * groups, m, (kh, kw), tuple(stride), tuple(padding),
                                 tuple(dilation), groups)  # fmt: skip
    return conv.CsrConv(crow, col, values, bias, geometry)


def _csr_conv2d_cuda(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups,
                     relu):  # fmt: skip
    _check_conv_args(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups)
    if _triton_or_none() is None or x.dtype == torch.float64:
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
    y = _csr_linear_cuda(cols.transpose(1, 2).reshape(-1, cg * groups * kh * kw).contiguous(),
                         crow, col_bd, values, order, bias)  # fmt: skip
    y = y.reshape(n, oh * ow, m).transpose(1, 2).reshape(n, m, oh, ow)
    return torch.relu(y) if relu else y


def _csr_conv2d_fake(x, crow, col, values, bias, weight_shape, stride, padding, dilation, groups,
                     relu):  # fmt: skip
    n, _, h, w = x.shape
    oh, ow = conv_output_size(h, w, list(weight_shape[2:]), stride, padding, dilation)
    return x.new_empty((n, weight_shape[0], oh, ow))


# ---- bsr_linear

_MKL_BSR_MAX_N = 16  # measured: MKL's BSR wins at batch 1, the einsum reference at batch 64


def _bsr_linear_default(x, crow_indices, col_indices, values, bias, out_features):
    _check_bsr_args(x, crow_indices, col_indices, values, bias, out_features)
    return bsr_linear_reference(x, crow_indices, col_indices, values, bias, out_features)


def _bsr_linear_cpu(x, crow_indices, col_indices, values, bias, out_features):
    _check_bsr_args(x, crow_indices, col_indices, values, bias, out_features)
    n, k = x.shape
    if n > _MKL_BSR_MAX_N:
        return bsr_linear_reference(x, crow_indices, col_indices, values, bias, out_features)
    acc = _acc_dtype(x)
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


def _bsr_linear_cuda(x, crow_indices, col_indices, values, bias, out_features):
    _check_bsr_args(x, crow_indices, col_indices, values, bias, out_features)
    kernels = _triton_or_none()
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


def _bsr_linear_fake(x, crow_indices, col_indices, values, bias, out_features):
    return x.new_empty((x.shape[0], out_features))


# ---- tiled_linear


def _tiled_linear_default(*args):
    _check_tiled_args(*args)
    return tiled_linear_reference(*args)


def _tiled_linear_cuda(*args):
    _check_tiled_args(*args)
    kernels = _triton_or_none()
    x, values = args[0], args[6]
    if kernels is None or x.dtype == torch.float64 or values.dtype == torch.float64:
        return tiled_linear_reference(*args)
    return kernels.tiled_linear(*args)


def _tiled_linear_fake(x, tile_crow, tile_col, tile_offsets, row_offsets, bitmaps, values, bias,
                       out_features):  # fmt: skip
    return x.new_empty((x.shape[0], out_features))


_Impl = Callable[..., Tensor]
_REGISTRATIONS: dict[str, tuple[_Impl, _Impl | None, _Impl, _Impl]] = {
    "csr_linear": (_csr_linear_default, _csr_linear_cpu, _csr_linear_cuda, _csr_linear_fake),
    "csr_chain": (_csr_chain_default, _csr_chain_cpu, _csr_chain_cuda, _csr_chain_fake),
    "csr_conv2d": (_csr_conv2d_default, _csr_conv2d_cpu, _csr_conv2d_cuda, _csr_conv2d_fake),
    "bsr_linear": (_bsr_linear_default, _bsr_linear_cpu, _bsr_linear_cuda, _bsr_linear_fake),
    "tiled_linear": (_tiled_linear_default, None, _tiled_linear_cuda, _tiled_linear_fake),
}
for _name, (_default, _cpu, _cuda, _fake) in _REGISTRATIONS.items():
    _LIB.impl(_name, _default, "CompositeExplicitAutograd")
    if _cpu is not None:
        _LIB.impl(_name, _cpu, "CPU")
    _LIB.impl(_name, _cuda, "CUDA")
    torch.library.register_fake(f"ticketc::{_name}", _fake, lib=_LIB)


# --------------------------------------------------------------------- eager fast entry points
#
# torch.ops.ticketc.* reaches the Python kernels above through the C++ dispatcher, which costs
# ~10 us per call (measured): as much as MKL's whole product for a Lenet layer, or twice a
# batch-1 GPU kernel. On plain tensors outside torch.compile / torch.export tracing, these
# functions call the same kernels directly; anything else (fake tensors, tracing, tensor
# subclasses, devices other than CPU / CUDA) goes through the registered op, so graphs still
# hold torch.ops.ticketc.* nodes.

_EAGER_IMPLS: dict[str, dict[str, _Impl]] = {
    "csr_linear": {"cpu": _csr_linear_cpu, "cuda": _csr_linear_cuda},
    "bsr_linear": {"cpu": _bsr_linear_cpu, "cuda": _bsr_linear_cuda},
    "tiled_linear": {"cpu": _tiled_linear_default, "cuda": _tiled_linear_cuda},
}


def _eager_impl(op: str, x: Tensor):
    if (
        type(x) is not Tensor
        or torch._C._is_torch_function_mode_enabled()
        or torch.compiler.is_compiling()
    ):
        return None
    return _EAGER_IMPLS[op].get(x.device.type)


def csr_linear(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    row_order: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """torch.ops.ticketc.csr_linear without the dispatcher's per-call cost in eager mode."""
    impl = _eager_impl("csr_linear", x)
    op = impl or torch.ops.ticketc.csr_linear
    return op(x, crow_indices, col_indices, values, row_order, bias)


def bsr_linear(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """torch.ops.ticketc.bsr_linear without the dispatcher's per-call cost in eager mode."""
    impl = _eager_impl("bsr_linear", x)
    op = impl or torch.ops.ticketc.bsr_linear
    return op(x, crow_indices, col_indices, values, bias, out_features)


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
) -> Tensor:
    """torch.ops.ticketc.tiled_linear without the dispatcher's per-call cost in eager mode."""
    impl = _eager_impl("tiled_linear", x)
    op = impl or torch.ops.ticketc.tiled_linear
    args = (x, tile_crow, tile_col, tile_offsets, row_offsets, bitmaps, values, bias)
    return op(*args, out_features)
