"""CPU kernel for a sparse Conv2d (Conv1d as a height of 1): direct sparse convolution, fp32, NCHW.

No im2col. The input is laid out once as zero-padded "phase planes": for stride (sy, sx), plane
(py, px) of channel c holds xpad[c, py::sy, px::sx], each Hq x Wq. Output pixel (oy, ox) reads
tap (ky, kx) at xpad[oy*sy + ty, ox*sx + tx] (ty = ky*dilation): that is element
(oy + ty // sy, ox + tx // sx) of plane (ty % sy, tx % sx). Computing the output on a grid Wq
wide, every stored weight therefore scales one contiguous run of a plane, starting at a fixed
offset, into the output row of its channel (the direct sparse convolution of Park et al.,
"Faster CNNs with direct sparse convolutions and guided pruning", ICLR 2017, with strides
folded into the planes):

    for sample n, output channel m (chunks of m claimed by any thread):
        acc[0 : L] = bias[m]                      L = (OH - 1) * Wq + OW, in tiles for L1
        for j in crow[m] .. crow[m + 1]:          (eight entries per pass)
            acc[:] += values[j] * src[n, offset[j] : offset[j] + L]
        out[n, m, oy, ox] = acc[oy * Wq + ox]     for ox < OW

A stride-1 unpadded conv (1x1 convs: a plain sparse GEMM over channels) reads x in place; other
convs first fill the planes they use (phase 0, chunks of channels), then compute (phase 1).
Columns ox >= OW of the Wq-wide grid are computed and dropped: (Wq - OW) / Wq extra work.
Grouped convs need no block-diagonal weight: an entry's offset names its group's channel.
Threads: ticketc.kernels.cpu_threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import Tensor

from . import cpu_threads
from .cpu_threads import claim, finish, wait_done

_FLAGS = {"contract", "reassoc", "nsz"}
_TILE = 2048  # floats of one output row accumulated at a time: 8 KB, stays in L1
_CHUNK_WORK = 1 << 16  # multiply-adds per compute chunk (~5-10 us)
_FILL_WORK = 1 << 15  # floats filled per fill chunk
PARALLEL_MIN_WORK = 1 << 17  # below this many multiply-adds: the calling thread alone

# geometry: one int64 array, these positions
(_C, _H, _W, _HQ, _WQ, _OH, _OW, _SY, _SX, _PT, _PL, _PHASES, _M, _MPER, _FPER) = range(15)


@numba.njit(inline="always", fastmath=_FLAGS)
def _accumulate(acc, src, off, values, j, end, t0, length):  # type: ignore[no-untyped-def]
    """acc[:length] += sum over entries j..end of values[j] * src[off[j] + t0 :][:length]."""
    while j + 8 <= end:
        v0, v1, v2, v3 = values[j], values[j + 1], values[j + 2], values[j + 3]
        v4, v5, v6, v7 = values[j + 4], values[j + 5], values[j + 6], values[j + 7]
        # Slices, not src[o + t]: an index computed at run time pays Numba's negative-index
        # check on every load and the loop does not vectorise (8x slower, measured).
        s0, s1 = src[off[j] + t0 :], src[off[j + 1] + t0 :]
        s2, s3 = src[off[j + 2] + t0 :], src[off[j + 3] + t0 :]
        s4, s5 = src[off[j + 4] + t0 :], src[off[j + 5] + t0 :]
        s6, s7 = src[off[j + 6] + t0 :], src[off[j + 7] + t0 :]
        for t in range(length):
            acc[t] += ((v0 * s0[t] + v1 * s1[t]) + (v2 * s2[t] + v3 * s3[t])) + (
                (v4 * s4[t] + v5 * s5[t]) + (v6 * s6[t] + v7 * s7[t])
            )
        j += 8
    while j < end:
        v, s = values[j], src[off[j] + t0 :]
        for t in range(length):
            acc[t] += v * s[t]
        j += 1


@numba.njit(inline="always", fastmath=_FLAGS)
def _output_row(src, out_m, crow, off, values, b, m, g, acc, relu):  # type: ignore[no-untyped-def]
    """out_m [OH * OW] = channel m's output for one sample; src is that sample's planes."""
    oh, ow, wq = g[_OH], g[_OW], g[_WQ]
    j, end = crow[m], crow[m + 1]
    rows_per_tile = max(1, _TILE // wq)
    for oy0 in range(0, oh, rows_per_tile):
        oy1 = min(oh, oy0 + rows_per_tile)
        t0 = oy0 * wq
        length = (oy1 - oy0 - 1) * wq + ow
        direct = wq == ow  # no columns to drop: accumulate into the output itself
        a = out_m[t0 : t0 + length] if direct else acc[:length]
        for t in range(length):
            a[t] = b
        _accumulate(a, src, off, values, j, end, t0, length)
        if direct:
            if relu:
                for t in range(length):
                    a[t] = max(a[t], np.float32(0.0))
            continue
        for oy in range(oy0, oy1):
            r = acc[(oy - oy0) * wq :]
            o = out_m[oy * ow :]
            for ox in range(ow):
                o[ox] = max(r[ox], np.float32(0.0)) if relu else r[ox]


@numba.njit(inline="always")
def _compute(state, phase, slot, src, out, crow, off, values, bias, g, accs, relu):  # type: ignore[no-untyped-def]
    n_all, m_all = out.shape[0], out.shape[1]
    per = g[_MPER]
    blocks = -(-m_all // per)
    chunks = n_all * blocks
    while True:
        c = claim(state, phase)
        if c >= chunks:
            break
        n = c // blocks
        lo = (c % blocks) * per
        for m in range(lo, min(m_all, lo + per)):
            _output_row(src[n], out[n, m], crow, off, values, bias[m], m, g, accs[slot], relu)
        finish(state, phase)
    wait_done(state, phase, chunks)


@numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
def _conv_direct(state, slot, x, out, crow, off, values, bias, g, accs, relu):  # type: ignore[no-untyped-def]
    # x [N, C*H*W]: a stride-1 unpadded conv reads its input planes in place.
    _compute(state, 0, slot, x, out, crow, off, values, bias, g, accs, relu)


@numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
def _conv_planes(state, slot, x, src, phases, out, crow, off, values, bias, g, accs, relu):  # type: ignore[no-untyped-def]
    # Phase 0: src[n, (c * P + p) * Hq * Wq ...] = plane p of channel c, zero-padded.
    n_all = x.shape[0]
    c_all, h, w, hq, wq = g[_C], g[_H], g[_W], g[_HQ], g[_WQ]
    sy, sx, pt, pl, p_all = g[_SY], g[_SX], g[_PT], g[_PL], g[_PHASES]
    per = g[_FPER]
    blocks = -(-c_all // per)
    chunks = n_all * blocks
    while True:
        k = claim(state, 0)
        if k >= chunks:
            break
        n = k // blocks
        c0 = (k % blocks) * per
        for c in range(c0, min(c_all, c0 + per)):
            plane_in = x[n, c * h * w : (c + 1) * h * w]
            for p in range(p_all):
                py, px = phases[p, 0], phases[p, 1]
                base = (c * p_all + p) * hq * wq
                for qy in range(hq):
                    row = src[n, base + qy * wq : base + (qy + 1) * wq]
                    yy = qy * sy + py - pt
                    if yy < 0 or yy >= h:
                        row[:] = 0
                        continue
                    r = plane_in[yy * w : (yy + 1) * w]
                    for qx in range(wq):
                        xx = qx * sx + px - pl
                        row[qx] = r[xx] if 0 <= xx < w else np.float32(0.0)
        finish(state, 0)
    wait_done(state, 0, chunks)
    _compute(state, 1, slot, src, out, crow, off, values, bias, g, accs, relu)


@dataclass(frozen=True)
class ConvGeometry:
    """A conv's shape parameters, 2-D (a Conv1d is a Conv2d over a height of 1)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, bottom, left, right (zeros)
    dilation: tuple[int, int]
    groups: int

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sy, sx), (dy, dx) = self.kernel_size, self.stride, self.dilation
        pt, pb, pl, pr = self.padding
        oh = (h + pt + pb - dy * (kh - 1) - 1) // sy + 1
        return oh, (w + pl + pr - dx * (kw - 1) - 1) // sx + 1


class CsrConv:
    """A conv whose weight [M, C/groups, kh, kw] is stored as CSR over [M, C/groups*kh*kw]
    (columns in the weight's own flattening order), run by the direct sparse kernels.

    Prepared once per layer; offsets are derived per input size and cached. Call it on fp32
    x [N, C, H, W]; returns [N, M, OH, OW] fp32, contiguous.
    """

    def __init__(
        self,
        crow_indices: Tensor,
        col_indices: Tensor,
        values: Tensor,
        bias: Tensor | None,
        geometry: ConvGeometry,
    ) -> None:
        self.geometry = geom = geometry
        m, (kh, kw) = geom.out_channels, geom.kernel_size
        if geom.in_channels % geom.groups or m % geom.groups:
            raise ValueError(f"CsrConv: {geom.in_channels} -> {m} channels, groups {geom.groups}")
        if crow_indices.numel() != m + 1:
            raise ValueError(f"CsrConv: {crow_indices.numel()} row pointers for {m} channels")
        width = geom.in_channels // geom.groups * kh * kw
        col = col_indices.detach().long()
        if col.numel() and (int(col.max()) >= width or int(col.min()) < 0):
            raise ValueError(f"CsrConv: a column index is outside 0..{width - 1}")
        self.crow = crow_indices.detach().to(torch.int32).contiguous().numpy()
        self.values = values.detach().to(torch.float32).contiguous().numpy()
        self.bias = (
            np.zeros(m, np.float32)
            if bias is None
            else bias.detach().to(torch.float32).contiguous().numpy()
        )
        self.nnz = int(col.numel())
        rows = torch.repeat_interleave(
            torch.arange(m), torch.from_numpy(np.diff(self.crow).astype(np.int64))
        )
        cg = geom.in_channels // geom.groups
        self._channel = (rows // (m // geom.groups)) * cg + col // (kh * kw)  # input channel
        self._ty = (col // kw % kh) * geom.dilation[0]
        self._tx = (col % kw) * geom.dilation[1]
        sy, sx = geom.stride
        phase = (self._ty % sy) * sx + self._tx % sx
        used = sorted(set(phase.tolist())) or [0]
        self._phases = np.array([(p // sx, p % sx) for p in used], dtype=np.int64)
        self._phase_slot = torch.full((sy * sx,), -1, dtype=torch.long)
        self._phase_slot[torch.tensor(used)] = torch.arange(len(used))
        self._phase = phase
        # stride 1 and no padding: the planes are x itself
        self.direct = geom.stride == (1, 1) and not any(geom.padding)
        self._by_size: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _offsets(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(offset per entry int64, geometry int64) for an input h x w."""
        cached = self._by_size.get((h, w))
        if cached is not None:
            return cached
        geom = self.geometry
        sy, sx = geom.stride
        pt, pb, pl, pr = geom.padding
        hq, wq = -(-(h + pt + pb) // sy), -(-(w + pl + pr) // sx)
        oh, ow = geom.output_size(h, w)
        if oh < 1 or ow < 1:
            raise ValueError(f"CsrConv: input {h}x{w} is smaller than the kernel")
        phases = len(self._phases)
        slot = self._phase_slot[self._phase]
        off = ((self._channel * phases + slot) * hq + self._ty // sy) * wq + self._tx // sx
        rows = max(1, self.geometry.out_channels)
        length = (oh - 1) * wq + ow
        per_row = max(1, self.nnz // rows) * length
        m_per = max(1, min(rows, _CHUNK_WORK // max(1, per_row)))
        f_per = max(1, _FILL_WORK // max(1, phases * hq * wq))
        g = np.array(
            (geom.in_channels, h, w, hq, wq, oh, ow, sy, sx, pt, pl, phases,
             geom.out_channels, m_per, f_per),
            dtype=np.int64,
        )  # fmt: skip
        self._by_size[(h, w)] = cached = (off.numpy().astype(np.int64), g)
        return cached

    def __call__(self, x: Tensor, *, relu: bool = False, threads: int | None = None) -> Tensor:
        """y [N, M, OH, OW] = conv(x) (+ bias), then max(y, 0) if `relu`; x [N, C, H, W] fp32."""
        geom = self.geometry
        if x.dim() != 4 or x.shape[1] != geom.in_channels or x.dtype != torch.float32:
            raise ValueError(
                f"CsrConv: x is {tuple(x.shape)} {x.dtype}, expected "
                f"[N, {geom.in_channels}, H, W] float32"
            )
        n, _, h, w = x.shape
        off, g = self._offsets(h, w)
        oh, ow = int(g[_OH]), int(g[_OW])
        out = torch.empty(n, geom.out_channels, oh, ow)
        if n == 0 or geom.out_channels == 0:
            return out
        x_np = x.detach().contiguous().numpy().reshape(n, -1)
        out_np = out.numpy()
        work = n * self.nnz * ((oh - 1) * int(g[_WQ]) + ow)
        if threads is None:
            threads = cpu_threads.num_threads()
        if work < PARALLEL_MIN_WORK:
            threads = 1
        accs = cpu_threads.SCRATCH.get("accs", (threads, _TILE))
        common = (out_np.reshape(n, geom.out_channels, -1), self.crow, off, self.values,
                  self.bias, g, accs, relu)  # fmt: skip
        if self.direct:
            cpu_threads.run(_conv_direct, (x_np, *common), phases=1, threads=threads)
        else:
            size = geom.in_channels * len(self._phases) * int(g[_HQ]) * int(g[_WQ])
            src = cpu_threads.SCRATCH.get("src", (n, size))
            args = (x_np, src, self._phases, *common)
            cpu_threads.run(_conv_planes, args, phases=2, threads=threads)
        return out
