"""CPU CSR kernels (Numba): y = x·Wᵀ (+ bias) and the gradient of W at its stored entries.

Activations are feature-major here: `xt` is x transposed, [K, N] (or [G, K, N] for G stacked
models), so that each stored weight W[m, k] scales one contiguous row xt[k, :] into out[m, :],
a loop over the batch that compiles to vector FMAs. Pseudo-code of `csr_matmul_t`:

    for m in rows (in parallel):                  # out [M, N] = W [M, K] @ xt [K, N]
        out[m, :] = bias[m]
        for j in crow[m] .. crow[m + 1]:             # (eight entries per pass)
            out[m, :] += values[j] * xt[col[j], :]

`CsrChain` runs consecutive layers this way in one call (inference: bias, ReLU fused), the
activations staying feature-major in a scratch buffer from layer to layer.

The weight gradient at the stored entries (`csr_sampled_grad`) is one dot product over the
batch per entry: grad[j] = g_t[m, :] · xt[col[j], :]. Rows of a stacked model (G members, each
with M / G rows) read their own member's xt; a shared xt ([1, K, N]) serves every member.

Each output row is summed in a fixed order whatever the thread count, so results are
reproducible run to run. Accumulation is fp32 (inputs are fp32). Each kernel compiles on first
use (about a second per argument signature) and Numba caches the machine code on disk.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

_FLAGS = {"contract", "reassoc"}  # FMA and vectorised reductions; NaN/inf keep their meaning
# Per thread: .buffer (CsrChain), .threads and .numba_threads (use_torch_threads).
_scratch = threading.local()


@numba.njit(inline="always", fastmath=_FLAGS)
def _csr_row(o, x, crow, col, values, bias, m, relu):  # type: ignore[no-untyped-def]
    """o[:] = bias[m] + sum over row m's entries j of values[j] * x[col[j], :], then ReLU."""
    n = o.shape[0]
    b = bias[m] if bias.shape[0] else np.float32(0.0)
    j, end = crow[m], crow[m + 1]
    if n == 1:  # one column: a dot product, four sums in flight (FMA latency bounds one)
        a0 = a1 = a2 = a3 = np.float32(0.0)
        while j + 4 <= end:
            a0 += values[j] * x[col[j], 0]
            a1 += values[j + 1] * x[col[j + 1], 0]
            a2 += values[j + 2] * x[col[j + 2], 0]
            a3 += values[j + 3] * x[col[j + 3], 0]
            j += 4
        while j < end:
            a0 += values[j] * x[col[j], 0]
            j += 1
        acc = b + ((a0 + a1) + (a2 + a3))
        o[0] = max(acc, np.float32(0.0)) if relu else acc
        return
    for i in range(n):
        o[i] = b
    # Eight (then four) entries per pass over the output row: an eighth of the loads and
    # stores of o, whose store-to-load latency bounds a one-entry loop (four per pass
    # measured ~1.4x faster than one, eight ~1.2x faster than four).
    while j + 8 <= end:
        v0, v1, v2, v3 = values[j], values[j + 1], values[j + 2], values[j + 3]
        v4, v5, v6, v7 = values[j + 4], values[j + 5], values[j + 6], values[j + 7]
        r0, r1, r2, r3 = x[col[j]], x[col[j + 1]], x[col[j + 2]], x[col[j + 3]]
        r4, r5, r6, r7 = x[col[j + 4]], x[col[j + 5]], x[col[j + 6]], x[col[j + 7]]
        for i in range(n):
            o[i] += ((v0 * r0[i] + v1 * r1[i]) + (v2 * r2[i] + v3 * r3[i])) + (
                (v4 * r4[i] + v5 * r5[i]) + (v6 * r6[i] + v7 * r7[i])
            )
        j += 8
    if j + 4 <= end:
        v0, v1, v2, v3 = values[j], values[j + 1], values[j + 2], values[j + 3]
        r0, r1, r2, r3 = x[col[j]], x[col[j + 1]], x[col[j + 2]], x[col[j + 3]]
        for i in range(n):
            o[i] += (v0 * r0[i] + v1 * r1[i]) + (v2 * r2[i] + v3 * r3[i])
        j += 4
    while j < end:
        v, r = values[j], x[col[j]]
        for i in range(n):
            o[i] += v * r[i]
        j += 1
    if relu:  # fused activation: the row is still in cache
        for i in range(n):
            o[i] = max(o[i], np.float32(0.0))


@numba.njit(parallel=True, nogil=True, fastmath=_FLAGS, cache=True)
def _matmul_t(crow, col, values, xt, bias, out, rows_per_group, relu):  # type: ignore[no-untyped-def]
    shared = xt.shape[0] == 1
    for m in numba.prange(out.shape[0]):
        x = xt[0] if shared else xt[m // rows_per_group]
        _csr_row(out[m], x, crow, col, values, bias, m, relu)


# Below this many multiply-adds a chain runs on the calling thread alone: waking a second
# thread costs more than it saves (a 99x245 layer at 4 %, batch 64: ~5 us of work).
_SERIAL_BELOW = 1 << 18


@numba.njit(parallel=True, nogil=True, fastmath=_FLAGS, cache=True)
def _sampled_grad(crow, col, g_t, xt, out, rows_per_group):  # type: ignore[no-untyped-def]
    rows, n = g_t.shape
    for m in numba.prange(rows):
        x = xt[m // rows_per_group]
        g = g_t[m]
        for j in range(crow[m], crow[m + 1]):
            row = x[col[j]]
            acc = np.float32(0.0)
            for i in range(n):
                acc += g[i] * row[i]
            out[j] = acc


@numba.njit(parallel=True, nogil=True, cache=True)
def _gather_t(source, index, out):  # type: ignore[no-untyped-def]
    groups, n = index.shape
    k = source.shape[1]
    for g in numba.prange(groups):
        # Eight rows at a time, so each feature writes 8 adjacent floats of out[g, f] rather
        # than one float per cache line (1.7x faster on MNIST-sized batches).
        i = 0
        while i + 8 <= n:
            ix, s = index[g], source
            r0, r1, r2, r3 = s[ix[i]], s[ix[i + 1]], s[ix[i + 2]], s[ix[i + 3]]
            r4, r5, r6, r7 = s[ix[i + 4]], s[ix[i + 5]], s[ix[i + 6]], s[ix[i + 7]]
            for f in range(k):
                o = out[g, f]
                o[i], o[i + 1], o[i + 2], o[i + 3] = r0[f], r1[f], r2[f], r3[f]
                o[i + 4], o[i + 5], o[i + 6], o[i + 7] = r4[f], r5[f], r6[f], r7[f]
            i += 8
        while i < n:
            src = source[index[g, i]]
            for f in range(k):
                out[g, f, i] = src[f]
            i += 1


@numba.njit(inline="always")
def _transpose_rows(x, lo, hi, out, at):  # type: ignore[no-untyped-def]
    """out[:, at + i - lo] = x[i, :] for rows lo <= i < hi."""
    # Eight rows at a time, as in _gather_t: each feature gets 8 adjacent floats of out[f]
    # (2x faster than torch's own transposing copy on a 64 x 784 batch).
    i = lo
    while i + 8 <= hi:
        r0, r1, r2, r3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        r4, r5, r6, r7 = x[i + 4], x[i + 5], x[i + 6], x[i + 7]
        c = np.uint64(at + i - lo)  # unsigned: no negative-index check per store (2x faster)
        for f in range(x.shape[1]):
            o = out[f]
            o[c], o[c + 1], o[c + 2], o[c + 3] = r0[f], r1[f], r2[f], r3[f]
            o[c + 4], o[c + 5], o[c + 6], o[c + 7] = r4[f], r5[f], r6[f], r7[f]
        i += 8
    while i < hi:
        for f in range(x.shape[1]):
            out[f, np.uint64(at + i - lo)] = x[i, f]
        i += 1


@numba.njit(inline="always", fastmath=_FLAGS)
def _chain_columns(x, feature_major, crows, cols, values, biases, relus, out, lo, hi, scratch):  # type: ignore[no-untyped-def]
    """Every layer of the chain on batch columns lo..hi, ping-ponging between scratch[0] and
    scratch[1] ([2, size]); the last layer writes out[:, lo:hi]."""
    w = hi - lo
    if feature_major and w == out.shape[1]:
        a = x  # [K, N]: read in place
    else:
        k = x.shape[0] if feature_major else x.shape[1]
        a = scratch[0, : k * w].reshape(k, w)
        if feature_major:
            for f in range(k):
                a[f, :] = x[f, lo:hi]
        else:
            _transpose_rows(x, lo, hi, a, 0)
    side = 1
    last = len(crows) - 1
    for layer in range(last + 1):
        crow, col, vals = crows[layer], cols[layer], values[layer]
        rows = crow.shape[0] - 1
        if layer == last:
            for m in range(rows):
                _csr_row(out[m, lo:hi], a, crow, col, vals, biases[layer], m, relus[layer])
        else:
            dst = scratch[side, : rows * w].reshape(rows, w)
            for m in range(rows):
                _csr_row(dst[m], a, crow, col, vals, biases[layer], m, relus[layer])
            a, side = dst, 1 - side


@numba.njit(parallel=True, nogil=True, fastmath=_FLAGS, cache=True)
def _chain_by_columns(x, feature_major, crows, cols, values, biases, relus, out, scratch, chunk):  # type: ignore[no-untyped-def]
    # One parallel region for the whole chain: each thread runs every layer on its own
    # columns of the batch, with no barrier between layers.
    n = out.shape[1]
    for c in numba.prange(-(-n // chunk)):
        lo = c * chunk
        hi = min(n, lo + chunk)
        _chain_columns(x, feature_major, crows, cols, values, biases, relus, out, lo, hi,
                       scratch[c])


@numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
def _chain_serial(x, feature_major, crows, cols, values, biases, relus, out, scratch):  # type: ignore[no-untyped-def]
    # The whole batch on the calling thread, for chains too small to share. (Not a second
    # compilation of _chain_by_columns: both would share one on-disk cache entry.)
    _chain_columns(
        x, feature_major, crows, cols, values, biases, relus, out, 0, out.shape[1], scratch[0]
    )


@numba.njit(parallel=True, nogil=True, fastmath=_FLAGS, cache=True)
def _chain_by_rows(x, feature_major, crows, cols, values, biases, relus, out, scratch):  # type: ignore[no-untyped-def]
    # For batches too narrow to split: each layer's rows are shared out (a barrier per layer).
    n = out.shape[1]
    if feature_major:
        a = x
    else:
        a = scratch[0, : x.shape[1] * n].reshape(x.shape[1], n)
        for block in numba.prange(-(-n // 8)):
            _transpose_rows(x, block * 8, min(n, block * 8 + 8), a, block * 8)
    side = 1
    last = len(crows) - 1
    for layer in range(last + 1):
        crow, col, vals = crows[layer], cols[layer], values[layer]
        rows = crow.shape[0] - 1
        dst = out if layer == last else scratch[side, : rows * n].reshape(rows, n)
        for m in numba.prange(rows):
            _csr_row(dst[m], a, crow, col, vals, biases[layer], m, relus[layer])
        a, side = dst, 1 - side


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy() if t.requires_grad else t.numpy()


def use_torch_threads() -> int:
    """Run the kernels on as many threads as torch uses (never more than Numba started);
    returns that number.

    Numba's setting is per calling thread; it is remembered per thread, so calling this before
    every kernel costs ~0.2 us instead of Numba's ~1.5 us."""
    want = torch.get_num_threads()
    if getattr(_scratch, "threads", None) != want:
        started = getattr(numba.config, "NUMBA_NUM_THREADS")  # noqa: B009 (untyped module)
        _scratch.numba_threads = max(1, min(want, started))
        numba.set_num_threads(_scratch.numba_threads)
        _scratch.threads = want
    return int(_scratch.numba_threads)


def csr_matmul_t(
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    xt: Tensor,
    bias: Tensor | None = None,
    *,
    groups: int = 1,
) -> Tensor:
    """out [M, N] = W @ xt[g] (+ bias) for the rows of group g; W is CSR [M, K].

    xt: [K, N] or [G, K, N] (fp32, contiguous), G == groups or 1 (shared by every group);
    rows m of W belong to group m // (M / groups).
    """
    rows = crow_indices.numel() - 1
    x3 = xt if xt.dim() == 3 else xt.unsqueeze(0)
    if rows % groups or x3.shape[0] not in (1, groups):
        raise ValueError(f"csr_matmul_t: {rows} rows, {groups} groups, xt {tuple(xt.shape)}")
    out = torch.empty(rows, x3.shape[2], dtype=torch.float32)
    b = bias.reshape(-1) if bias is not None else torch.empty(0)
    _matmul_t(
        _np(crow_indices),
        _np(col_indices),
        _np(values),
        _np(x3.contiguous()),
        _np(b),
        out.numpy(),
        max(rows // groups, 1),
        False,
    )
    return out


class CsrArrays(NamedTuple):
    """A CSR weight [M, K] (and bias) as the NumPy views the kernels take, made once per layer:
    converting five tensors on every call would cost more than a small layer's product. The
    views share memory with fp32 / int32 tensors, so in-place updates show through."""

    crow: np.ndarray  # int32 [M + 1]
    col: np.ndarray  # int32 [nnz]
    values: np.ndarray  # fp32 [nnz]
    bias: np.ndarray  # fp32 [M], or [0] for none
    in_features: int

    @classmethod
    def of(
        cls,
        crow_indices: Tensor,
        col_indices: Tensor,
        values: Tensor,
        bias: Tensor | None = None,
        *,
        in_features: int,
    ) -> CsrArrays:
        """Views of (or, for other dtypes, int32 / fp32 copies of) the tensors. Column indices
        must be < in_features (the kernels read unchecked; ticketc.ops.CpuCsr checks)."""
        b = torch.empty(0) if bias is None else bias.reshape(-1)
        return cls(
            _np(crow_indices.to(torch.int32)),
            _np(col_indices.to(torch.int32)),
            _np(values.to(torch.float32).contiguous()),
            _np(b.to(torch.float32)),
            in_features,
        )

    @property
    def out_features(self) -> int:
        return self.crow.shape[0] - 1


MIN_COLUMNS = 16  # batch columns per thread: narrower batches share each layer's rows instead


class CsrChain:
    """Consecutive CSR layers run as one kernel call: y = f_L(... f_1(x)), f_i(x) = x @ W_i.T
    (+ b_i), then max(., 0) where relus[i].

    The activations stay feature-major ([features, batch]) in a per-thread scratch buffer from
    layer to layer. Batches of at least MIN_COLUMNS per thread are split by columns: each
    thread runs every layer on its own slice, one parallel region for the whole chain (for a
    small model, Python and thread wake-ups per layer cost more than the products). Narrower
    batches share each layer's rows between threads; chains below _SERIAL_BELOW multiply-adds
    run on the calling thread.
    """

    def __init__(self, layers: Sequence[CsrArrays], relus: Sequence[bool]) -> None:
        if not layers or len(relus) != len(layers):
            raise ValueError(f"CsrChain: {len(layers)} layers, {len(relus)} relu flags")
        for i, (a, b) in enumerate(zip(layers, layers[1:], strict=False)):
            if a.out_features != b.in_features:
                raise ValueError(
                    f"CsrChain: layer {i} outputs {a.out_features} features, "
                    f"layer {i + 1} takes {b.in_features}"
                )
        self.layers = tuple(layers)
        self.in_features, self.out_features = layers[0].in_features, layers[-1].out_features
        self._args = (
            tuple(w.crow for w in layers),
            tuple(w.col for w in layers),
            tuple(w.values for w in layers),
            tuple(w.bias for w in layers),
            tuple(bool(r) for r in relus),
        )
        self._nnz = sum(w.col.shape[0] for w in layers)
        # the widest activation a chunk holds: an input or output of some layer
        self._width = max(max(w.in_features, w.out_features) for w in layers)

    def __call__(self, x: Tensor) -> Tensor:
        """x [N, K] fp32, batch-major or feature-major (x.t() contiguous, read in place);
        returns y [N, M] stored feature-major (a transposed view of [M, N]), as the next
        chain reads it without a copy."""
        n, k = x.shape
        if k != self.in_features or x.dtype != torch.float32:
            raise ValueError(
                f"CsrChain: x is {tuple(x.shape)} {x.dtype}, "
                f"expected [N, {self.in_features}] float32"
            )
        x = x.detach()
        # Feature-major: x.t() is contiguous [K, N] (a single row, [1, K], is both layouts).
        feature_major = (x.stride(0) == 1 or n == 1) and (x.stride(1) == n or k == 1)
        x_np = x.t().numpy() if feature_major else x.contiguous().numpy()
        out = torch.empty(self.out_features, n)
        threads = use_torch_threads()
        parallel = threads > 1 and n * self._nnz >= _SERIAL_BELOW
        if parallel and n < 2 * MIN_COLUMNS:
            scratch = _scratch_buffer(1, self._width * n)[0]
            _chain_by_rows(x_np, feature_major, *self._args, out.numpy(), scratch)
        elif parallel:
            chunk = -(-n // min(threads, n // MIN_COLUMNS))
            chunk = min(n, -(-chunk // MIN_COLUMNS) * MIN_COLUMNS)  # whole cache lines each
            scratch = _scratch_buffer(-(-n // chunk), self._width * chunk)
            _chain_by_columns(x_np, feature_major, *self._args, out.numpy(), scratch, chunk)
        else:
            scratch = _scratch_buffer(1, self._width * n)
            _chain_serial(x_np, feature_major, *self._args, out.numpy(), scratch)
        return out.t()


def _scratch_buffer(chunks: int, size: int) -> np.ndarray:
    """[chunks, 2, size] fp32 (two activation buffers per chunk) from a buffer kept per
    thread: a fresh one is fresh pages from the OS on every call (glibc maps blocks over
    128 KB), which cost as much as a small layer's product at 2 threads. torch allocates
    64-byte aligned (NumPy 16): rows of whole cache lines for the kernels."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.shape[0] < chunks * 2 * size:
        buffer = _scratch.buffer = torch.empty(chunks * 2 * size, dtype=torch.float32).numpy()
    return buffer[: chunks * 2 * size].reshape(chunks, 2, size)


def csr_sampled_grad(
    crow_indices: Tensor, col_indices: Tensor, g_t: Tensor, xt: Tensor, *, groups: int = 1
) -> Tensor:
    """grad[j] = g_t[m, :] · xt[g, col[j], :] for each stored entry j of row m (group g).

    g_t: [M, N] (d loss / d out, transposed), xt: [G, K, N]; returns [nnz] fp32.
    """
    rows = crow_indices.numel() - 1
    x3 = xt if xt.dim() == 3 else xt.unsqueeze(0)
    out = torch.empty(col_indices.numel(), dtype=torch.float32)
    _sampled_grad(
        _np(crow_indices),
        _np(col_indices),
        _np(g_t.contiguous()),
        _np(x3.contiguous()),
        out.numpy(),
        max(rows // groups, 1),
    )
    return out


def padded(n: int) -> int:
    """The batch width the kernels run fastest at: a whole number of 8-float vectors."""
    return -(-n // 8) * 8


def gather_t(source: Tensor, index: Tensor) -> Tensor:
    """out[g, :, i] = source[index[g, i], :]: rows picked and transposed in one pass.

    source [S, K] fp32 contiguous, index [G, N] int64 -> [G, K, padded(N)], zero beyond N
    (a padded batch is exact: zero inputs add nothing to a product or a gradient).
    """
    groups, n = index.shape
    out = torch.zeros(groups, source.shape[1], padded(n), dtype=source.dtype)
    _gather_t(_np(source.contiguous()), _np(index.contiguous()), out.numpy())
    return out


def transpose_padded(x: Tensor) -> Tensor:
    """x [..., N, K] -> [..., K, padded(N)], zero beyond N."""
    n = x.shape[-2]
    out = x.new_zeros(*x.shape[:-2], x.shape[-1], padded(n))
    out[..., :n] = x.transpose(-1, -2)
    return out
