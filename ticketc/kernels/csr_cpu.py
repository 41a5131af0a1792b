"""CPU CSR kernels for training (Numba): y = x·Wᵀ (+ bias) and the gradient of W at its stored
entries, for stacked models (ticketc.find). Inference runs csr_chain_cpu / csr_conv_cpu.

Activations are feature-major here: `xt` is x transposed, [K, N] (or [G, K, N] for G stacked
models), so that each stored weight W[m, k] scales one contiguous row xt[k, :] into out[m, :],
a loop over the batch that compiles to vector FMAs. Pseudo-code of `csr_matmul_t`:

    for m in rows (in parallel):                  # out [M, N] = W [M, K] @ xt [K, N]
        out[m, :] = bias[m]
        for j in crow[m] .. crow[m + 1]:             # (eight entries per pass)
            out[m, :] += values[j] * xt[col[j], :]

The weight gradient at the stored entries (`csr_sampled_grad`) is one dot product over the
batch per entry: grad[j] = g_t[m, :] · xt[col[j], :]. Rows of a stacked model (G members, each
with M / G rows) read their own member's xt; a shared xt ([1, K, N]) serves every member.

Each output row is summed in a fixed order whatever the thread count, so results are
reproducible run to run. Accumulation is fp32 (inputs are fp32). Each kernel compiles on first
use (about a second per argument signature) and Numba caches the machine code on disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
import numpy as np
import torch
from torch import Tensor

_FLAGS = {"contract", "reassoc"}  # FMA and vectorised reductions; NaN/inf keep their meaning


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


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy() if t.requires_grad else t.numpy()


def use_torch_threads() -> int:
    """The number of threads the kernels here run on: torch's setting
    (`torch.set_num_threads`), at most the threads Numba started. Changes nothing: each kernel
    call sets Numba's (per calling thread) setting to it and restores the caller's after."""
    started = getattr(numba.config, "NUMBA_NUM_THREADS")  # noqa: B009 (untyped module)
    return max(1, min(torch.get_num_threads(), started))


@contextlib.contextmanager
def _torch_threads() -> Iterator[None]:
    """Numba's parallel loops on torch's thread count for the duration of a call; the
    caller's Numba setting is restored after (no state is left behind)."""
    want = use_torch_threads()
    before = numba.get_num_threads()
    if want == before:
        yield
        return
    numba.set_num_threads(want)
    try:
        yield
    finally:
        numba.set_num_threads(before)


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
    with _torch_threads():
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


def csr_sampled_grad(
    crow_indices: Tensor, col_indices: Tensor, g_t: Tensor, xt: Tensor, *, groups: int = 1
) -> Tensor:
    """grad[j] = g_t[m, :] · xt[g, col[j], :] for each stored entry j of row m (group g).

    g_t: [M, N] (d loss / d out, transposed), xt: [G, K, N]; returns [nnz] fp32.
    """
    rows = crow_indices.numel() - 1
    x3 = xt if xt.dim() == 3 else xt.unsqueeze(0)
    out = torch.empty(col_indices.numel(), dtype=torch.float32)
    with _torch_threads():
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
    with _torch_threads():
        _gather_t(_np(source.contiguous()), _np(index.contiguous()), out.numpy())
    return out


def transpose_padded(x: Tensor) -> Tensor:
    """x [..., N, K] -> [..., K, padded(N)], zero beyond N."""
    n = x.shape[-2]
    out = x.new_zeros(*x.shape[:-2], x.shape[-1], padded(n))
    out[..., :n] = x.transpose(-1, -2)
    return out
