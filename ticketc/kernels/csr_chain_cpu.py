"""CPU kernel for one or more consecutive CSR linear layers: y = f_L(... f_1(x)),
f_i(x) = x @ W_i.T + b_i, then max(., 0) where relu[i]. fp32, row-major in and out.

All layers are packed into flat arrays (one call passes a handful of arrays however long the
chain: Numba's dispatch costs ~0.1 us per array argument, the products of a small model a few
us). Two ways to cut the work, chosen by the batch size N:

  columns (N > 1): chunks of up to MAX_COLUMNS batch rows. A chunk transposes its rows into
  a feature-major scratch [K, w], so that each stored weight W[m, k] scales a contiguous piece
  of a row of activations (vector FMAs), runs every layer on it, and transposes the result back
  into out[rows, :]. A layer works through the chunk's columns in tiles of 64 (then 32, 16),
  and a row's sums over a tile stay in registers across its entries (LLVM IR written for it:
  `csr_chain_ir.make_tile`; the chunk transposes are in `csr_chain_transpose`):

      for chunk of rows lo..hi (claimed by any thread):
          a = x[lo:hi, :].T                                    # [K, w]
          for each layer:
              for tile of columns t:
                  for m in rows:                             # s: 1-4 vectors of 16, x 4 sets
                      s = sum_j values[j] * a[col[j], t]     # entry j into set j % 4
                      d[m, t] = b[m] + s                     (ReLU)
              a = d
          out[lo:hi, :] = a.T

  rows (small N, batch 1 included): one phase per layer; a phase's output rows are cut into
  chunks, activations stay row-major in a buffer shared by the threads, and at N == 1 each
  output is a dot product (four sums in flight: FMA latency bounds one).

Each output is summed in the same order whatever the thread count and the chunking, so results
are reproducible run to run. Threads: `ticketc.kernels.cpu_threads` (the calling thread plus
helpers that join if they can; `torch.get_num_threads()` of them at most).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

from . import cpu_threads
from .cpu_threads import claim, finish, wait_done
from .csr_chain_ir import f32_at, tile1, tile2, tile4
from .csr_chain_transpose import transpose_in, transpose_out

_FLAGS = {"contract", "reassoc", "nsz"}  # FMA and reordered sums; NaN/inf keep their meaning
MIN_COLUMNS = 16  # batch rows per chunk at least: narrower batches run by rows
# batch rows per chunk at most: wider chunks load each index and value for more rows (Lenet
# ticket, batch 256, 1 thread: 128 rows 7 % faster than 64); a chunk of a 784-wide input is
# then 400 KB, within L2
MAX_COLUMNS = 128
# Below this many multiply-adds a call runs on the calling thread alone: waking a helper
# costs more than it saves.
PARALLEL_MIN_WORK = 1 << 17
_CHUNK_WORK = 1 << 15  # multiply-adds per chunk in rows mode: ~5-10 us

# meta columns, one row per layer
_CROW, _NNZ, _BIAS, _ROWS, _IN, _RELU = range(6)


@numba.njit(inline="always")
def _layer_tiles(d, a, crow, col, values, bias, c0, n0, b0, rows, relu, w):  # type: ignore[no-untyped-def]
    """d[m, :w] = b[m] + sum over row m's entries j of values[j] * a[col[j], :w] (ReLU), for
    every row m of the layer; a [K, >= w] and d [rows, >= w] feature-major, both rows a whole
    number of 16-float vectors at least w long (the columns past w are scratch).

    Tiles of 64 columns (then 32 and 16 for the rest), each read by every row in turn; a row's
    sums of a tile are held in registers across its entries (`make_tile`). Wider tiles load
    each entry's index and value for more columns: 64 columns measured fastest for every
    layer tried, 256 to 4096 inputs (BERT-like 256 x 256: 1.3x faster than 16; Lenet ticket
    and 4096-wide MLP at batch 64-256: 1.3-1.6x), though 4096 x 64 floats are beyond L1."""
    d_at, a_at, ds, st = d.ctypes.data, a.ctypes.data, d.shape[1], a.shape[1]
    col_at, val_at = col.ctypes.data, values.ctypes.data
    wv = -(-w // 16) * 16
    t0 = 0
    while t0 < wv:
        v = 4
        while v > 1 and t0 + 16 * v > wv:
            v //= 2
        for m in range(rows):
            o_at, x_at = d_at + (m * ds + t0) * 4, a_at + t0 * 4
            j0, j1 = n0 + crow[c0 + m], n0 + crow[c0 + m + 1]
            b = bias[b0 + m]
            if v == 4:
                tile4(o_at, x_at, st, col_at, val_at, j0, j1, b, relu)
            elif v == 2:
                tile2(o_at, x_at, st, col_at, val_at, j0, j1, b, relu)
            else:
                tile1(o_at, x_at, st, col_at, val_at, j0, j1, b, relu)
        t0 += 16 * v


@numba.njit(inline="always")
def _stride(w):  # type: ignore[no-untyped-def]
    """Floats per row of a chunk's feature-major activations holding w columns: an odd number
    of 64-byte lines. A power-of-two row length (128 floats: 512 bytes) maps every row that a
    transpose or an entry touches to the same few L1 sets (measured: the transposes of a
    BERT layer's chunks 1.3x faster with rows of 144 floats than 128)."""
    lines = -(-w // 16)
    return (lines + 1 - lines % 2) * 16


@numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
def _by_columns(state, slot, x_at, out_at, n, crow, col, values, bias, meta, scratch, chunk):  # type: ignore[no-untyped-def]
    # x [n, K] and out [n, M]: contiguous fp32 at these addresses (ints: a faster dispatch)
    x = numba.carray(f32_at(x_at), (n, meta[0, _IN]))
    out = numba.carray(f32_at(out_at), (n, meta[-1, _ROWS]))
    chunks = -(-n // chunk)
    last = meta.shape[0] - 1
    buf = scratch[slot]  # [2, width * chunk]
    while True:
        c = claim(state, 0)
        if c >= chunks:
            break
        lo = c * chunk
        hi = min(n, lo + chunk)
        w = hi - lo
        wp = _stride(w)
        a = buf[0, : x.shape[1] * wp].reshape(x.shape[1], wp)
        transpose_in(x, lo, hi, a)
        side = 1
        for layer in range(last + 1):
            c0, n0, b0 = meta[layer, _CROW], meta[layer, _NNZ], meta[layer, _BIAS]
            rows, relu = meta[layer, _ROWS], meta[layer, _RELU] != 0
            d = buf[side, : rows * wp].reshape(rows, wp)
            _layer_tiles(d, a, crow, col, values, bias, c0, n0, b0, rows, relu, w)
            a, side = d, 1 - side
        transpose_out(a, out, lo, hi)
        finish(state, 0)
    wait_done(state, 0, chunks)


@numba.njit(inline="always", fastmath=_FLAGS)
def _dot(values, col, x, j, end):  # type: ignore[no-untyped-def]
    """sum over j <= i < end of values[i] * x[col[i]]: one plain loop, which LLVM vectorises
    with AVX-512 / AVX2 gathers (16 / 8 products per instruction; measured 1.3x faster than
    four scalar sums in flight on the Lenet ticket)."""
    s = np.float32(0.0)
    for i in range(j, end):
        s += values[i] * x[col[i]]
    return s


@numba.njit(inline="always", fastmath=_FLAGS)
def _rows_of_layer(a, d, crow, col, values, bias, c0, n0, b0, m_lo, m_hi, relu, acc):  # type: ignore[no-untyped-def]
    """d[:, m] for m_lo <= m < m_hi, with a [n, K] and d [n, M] row-major."""
    n = a.shape[0]
    for m in range(m_lo, m_hi):
        j, end = n0 + crow[c0 + m], n0 + crow[c0 + m + 1]
        b = bias[b0 + m]
        if n == 1:
            s = b + _dot(values, col, a[0], j, end)
            d[0, m] = max(s, np.float32(0.0)) if relu else s
            continue
        for i in range(n):
            acc[i] = np.float32(0.0)
        while j < end:
            v, k = values[j], col[j]
            for i in range(n):
                acc[i] += v * a[i, k]
            j += 1
        for i in range(n):
            s = b + acc[i]
            d[i, m] = max(s, np.float32(0.0)) if relu else s


@numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
def _one(x_at, out_at, crow, col, values, bias, meta, buf):  # type: ignore[no-untyped-def]
    """The whole chain on one row, on the calling thread: x and out given by the addresses of
    contiguous fp32 rows of meta[0, _IN] and meta[-1, _ROWS] floats (integers cross Numba's
    dispatcher faster than arrays: this call is the batch-1 hot path). The same sums in the
    same order as _by_rows at n == 1."""
    last = meta.shape[0] - 1
    a = numba.carray(f32_at(x_at), (meta[0, _IN],))
    for layer in range(last + 1):
        c0, n0, b0 = meta[layer, _CROW], meta[layer, _NNZ], meta[layer, _BIAS]
        rows, relu = meta[layer, _ROWS], meta[layer, _RELU] != 0
        d = numba.carray(f32_at(out_at), (rows,)) if layer == last else buf[layer % 2, :rows]
        for m in range(rows):
            s = bias[b0 + m] + _dot(values, col, a, n0 + crow[c0 + m], n0 + crow[c0 + m + 1])
            d[m] = max(s, np.float32(0.0)) if relu else s
        a = d


@numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
def _by_rows(state, slot, x, out, crow, col, values, bias, meta, shared, accs):  # type: ignore[no-untyped-def]
    n = x.shape[0]
    last = meta.shape[0] - 1
    a = x
    for layer in range(last + 1):
        c0, n0, b0 = meta[layer, _CROW], meta[layer, _NNZ], meta[layer, _BIAS]
        rows, relu = meta[layer, _ROWS], meta[layer, _RELU] != 0
        nnz = crow[c0 + rows] - crow[c0]
        per_chunk = max(1, (_CHUNK_WORK * rows) // max(1, nnz * n))
        chunks = -(-rows // per_chunk)
        d = out if layer == last else shared[layer % 2, : n * rows].reshape(n, rows)
        while True:
            c = claim(state, layer)
            if c >= chunks:
                break
            lo = c * per_chunk
            hi = min(rows, lo + per_chunk)
            _rows_of_layer(a, d, crow, col, values, bias, c0, n0, b0, lo, hi, relu, accs[slot])
            finish(state, layer)
        wait_done(state, layer, chunks)
        a = d


class CsrLayer(NamedTuple):
    """One CSR layer [M, K] as the kernels take it (NumPy views of int32 / fp32 tensors, so
    in-place updates of those tensors show through)."""

    crow: np.ndarray  # int32 [M + 1]
    col: np.ndarray  # int32 [nnz], each < in_features (checked by CsrChain)
    values: np.ndarray  # fp32 [nnz]
    bias: np.ndarray | None  # fp32 [M]
    in_features: int

    @classmethod
    def of(
        cls,
        crow_indices: Tensor,
        col_indices: Tensor,
        values: Tensor,
        bias: Tensor | None,
        in_features: int,
    ) -> CsrLayer:
        return cls(
            _np(crow_indices, torch.int32),
            _np(col_indices, torch.int32),
            _np(values, torch.float32),
            None if bias is None else _np(bias.reshape(-1), torch.float32),
            in_features,
        )

    @property
    def out_features(self) -> int:
        return self.crow.shape[0] - 1

    @property
    def nnz(self) -> int:
        return self.col.shape[0]


def _np(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A NumPy view of `t` (a copy when its dtype or layout differs)."""
    return t.detach().to(dtype).contiguous().numpy()


class CsrChain:
    """Consecutive CSR layers (ReLU after those flagged) run as one kernel call.

    Packs the layers' arrays into flat ones once (a copy: in-place updates of the layers'
    tensors after this do not show through; build a new chain). Call it on fp32 x [N, K]
    (any strides); returns y [N, M] fp32, contiguous.
    """

    def __init__(self, layers: Sequence[CsrLayer], relus: Sequence[bool]) -> None:
        if not layers or len(relus) != len(layers):
            raise ValueError(f"CsrChain: {len(layers)} layers, {len(relus)} relu flags")
        for i, (a, b) in enumerate(zip(layers, layers[1:], strict=False)):
            if a.out_features != b.in_features:
                raise ValueError(
                    f"CsrChain: layer {i} outputs {a.out_features} features, "
                    f"layer {i + 1} takes {b.in_features}"
                )
        for i, w in enumerate(layers):
            worst = max(int(w.col.max()), -int(w.col.min()) - 1) if w.nnz else -1
            if worst >= w.in_features:
                raise ValueError(
                    f"CsrChain: layer {i}'s column index {worst} is out of range for "
                    f"{w.in_features} input features"
                )
        self.in_features, self.out_features = layers[0].in_features, layers[-1].out_features
        self.nnz = sum(w.nnz for w in layers)
        self.width = max(max(w.in_features, w.out_features) for w in layers)
        meta = np.zeros((len(layers), 6), dtype=np.int64)
        crow_at = nnz_at = bias_at = 0
        for i, (w, relu) in enumerate(zip(layers, relus, strict=True)):
            meta[i] = (crow_at, nnz_at, bias_at, w.out_features, w.in_features, int(bool(relu)))
            crow_at += w.out_features + 1
            nnz_at += w.nnz
            bias_at += w.out_features
        self.meta = meta
        self.crow = np.concatenate([w.crow for w in layers]).astype(np.int32)
        # negative indices counted from the end (as NumPy reads them) made non-negative: the
        # tiled kernel turns an index into an address without wrapping
        self.col = np.concatenate(
            [np.where(w.col < 0, w.col + w.in_features, w.col) for w in layers]
        ).astype(np.int32)
        self.values = np.concatenate([w.values for w in layers]).astype(np.float32)
        self.bias = np.concatenate(
            [np.zeros(w.out_features, np.float32) if w.bias is None else w.bias for w in layers]
        ).astype(np.float32)
        # _one's work buffer, for calls on the thread that made the chain
        self._owner = threading.get_ident()
        self._buf = np.zeros((2, self.width), np.float32)

    def __call__(self, x: Tensor, *, threads: int | None = None) -> Tensor:
        """y [N, M] = the chain applied to x [N, K] (fp32). `threads` defaults to
        cpu_threads.num_threads() (torch's setting); small calls run on one thread."""
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != torch.float32:
            raise ValueError(
                f"CsrChain: x is {tuple(x.shape)} {x.dtype}, "
                f"expected [N, {self.in_features}] float32"
            )
        return self.run(x, x.shape[0], threads=threads)

    def run(self, x: Tensor, n: int, *, threads: int | None = None) -> Tensor:
        """y [n, M] for x holding n samples of in_features fp32 values each, in row-major
        order (any shape; copied first if not contiguous). The caller checks dtype and size."""
        if n == 1 and (threads == 1 or self.nnz < PARALLEL_MIN_WORK):
            return self.one(x)
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty(n, self.out_features)
        if n == 0:
            return out
        if threads is None:
            threads = cpu_threads.num_threads()
        if n * self.nnz < PARALLEL_MIN_WORK:
            threads = 1
        args: tuple
        if n > 1:
            chunk = min(MAX_COLUMNS, max(MIN_COLUMNS, -(-n // threads)))
            chunk = -(-chunk // 8) * 8
            stride = -(-chunk // 16) | 1  # _stride(chunk) in lines
            scratch = cpu_threads.SCRATCH.get("columns", (threads, 2, self.width * stride * 16))
            # x (held by the caller) and out outlive the call: their addresses stay valid.
            args = (x.data_ptr(), out.data_ptr(), n, self.crow, self.col, self.values,
                    self.bias, self.meta, scratch, chunk)  # fmt: skip
            cpu_threads.run(_by_columns, args, phases=1, threads=threads)
        else:
            shared = cpu_threads.SCRATCH.get("shared", (2, n * self.width))
            accs = cpu_threads.SCRATCH.get("accs", (threads, n))
            args = (x.view(n, self.in_features).numpy(), out.numpy(), self.crow, self.col,
                    self.values, self.bias, self.meta, shared, accs)  # fmt: skip
            cpu_threads.run(_by_rows, args, phases=len(self.meta), threads=threads)
        return out

    def one(self, x: Tensor) -> Tensor:
        """y [1, M] for one sample x (fp32, `in_features` elements, any shape), on the calling
        thread: the batch-1 hot path, with no NumPy views made and one kernel call.

        Raises ValueError if x is not fp32 with in_features elements.
        """
        if x.dtype != torch.float32 or x.numel() != self.in_features:
            raise ValueError(
                f"CsrChain: one sample of {self.in_features} float32 values expected, "
                f"got {tuple(x.shape)} {x.dtype}"
            )
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty(1, self.out_features)
        if threading.get_ident() == self._owner:  # the buffer made with this chain
            buf = self._buf
        else:  # another thread's call: its own buffer (calls may run at once)
            buf = cpu_threads.SCRATCH.get("shared", (2, self.width))
        # x (held by the caller) and out outlive the call, so their addresses stay valid.
        _one(x.data_ptr(), out.data_ptr(), self.crow, self.col, self.values, self.bias,
             self.meta, buf)  # fmt: skip
        return out
