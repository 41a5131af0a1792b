"""Chunk transposes of the CPU chain kernel's columns way (ticketc.kernels.csr_chain_cpu):
batch rows lo..hi of a row-major x [N, K] into feature-major scratch a [K, >= hi - lo] before the
layers run, and the last layer's d [M, >= hi - lo] back into out[lo:hi, :] after. 16 x 16 blocks
go through registers (`csr_chain_ir.t16`), the rest eight rows at a time. fp32, Numba.
"""

from __future__ import annotations

import numba
import numpy as np

from .csr_chain_ir import t16

__all__ = ["transpose_in", "transpose_out"]


@numba.njit(inline="always")
def transpose_in(x, lo, hi, a):  # type: ignore[no-untyped-def]
    """a[f, i - lo] = x[i, f] for rows lo <= i < hi: 16 x 16 blocks in registers (`t16`),
    the rest eight rows at a time (so each feature gets eight adjacent floats of a[f] per
    pass)."""
    k = x.shape[1]
    kb, wb = k - k % 16, (hi - lo) - (hi - lo) % 16
    x_at, a_at, wp = x.ctypes.data, a.ctypes.data, a.shape[1]
    for i0 in range(0, wb, 16):
        for f0 in range(0, kb, 16):
            t16(x_at + ((lo + i0) * k + f0) * 4, k, a_at + (f0 * wp + i0) * 4, wp)
    for i in range(lo, lo + wb):  # the last k % 16 features of those rows
        for f in range(kb, k):
            a[f, i - lo] = x[i, f]
    i = lo + wb
    while i + 8 <= hi:
        r0, r1, r2, r3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        r4, r5, r6, r7 = x[i + 4], x[i + 5], x[i + 6], x[i + 7]
        c = np.uint64(i - lo)  # unsigned: no negative-index check per store (2x faster)
        for f in range(k):
            o = a[f]
            o[c], o[c + 1], o[c + 2], o[c + 3] = r0[f], r1[f], r2[f], r3[f]
            o[c + 4], o[c + 5], o[c + 6], o[c + 7] = r4[f], r5[f], r6[f], r7[f]
        i += 8
    while i < hi:
        r = x[i]
        c = np.uint64(i - lo)
        for f in range(k):
            a[f, c] = r[f]
        i += 1


@numba.njit(inline="always")
def transpose_out(d, out, lo, hi):  # type: ignore[no-untyped-def]
    """out[i, m] = d[m, i - lo] for lo <= i < hi (16 x 16 blocks as `transpose_in`)."""
    m_all = d.shape[0]
    mb, wb = m_all - m_all % 16, (hi - lo) - (hi - lo) % 16
    d_at, out_at, wp, m_out = d.ctypes.data, out.ctypes.data, d.shape[1], out.shape[1]
    for i0 in range(0, wb, 16):
        for m0 in range(0, mb, 16):
            t16(d_at + (m0 * wp + i0) * 4, wp, out_at + ((lo + i0) * m_out + m0) * 4, m_out)
    for i in range(lo, lo + wb):  # the last m_all % 16 outputs of those rows
        for m in range(mb, m_all):
            out[i, m] = d[m, i - lo]
    i = lo + wb
    while i + 8 <= hi:
        o0, o1, o2, o3 = out[i], out[i + 1], out[i + 2], out[i + 3]
        o4, o5, o6, o7 = out[i + 4], out[i + 5], out[i + 6], out[i + 7]
        c = np.uint64(i - lo)
        for m in range(m_all):
            r = d[m]
            o0[m], o1[m], o2[m], o3[m] = r[c], r[c + 1], r[c + 2], r[c + 3]
            o4[m], o5[m], o6[m], o7[m] = r[c + 4], r[c + 5], r[c + 6], r[c + 7]
        i += 8
    while i < hi:
        o = out[i]
        c = np.uint64(i - lo)
        for m in range(m_all):
            o[m] = d[m, c]
        i += 1
