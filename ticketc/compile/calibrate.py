"""Calibrate the CPU cost model by measurement on this machine.

A few small kernels are timed at torch's current thread count (dense GEMM and convs through
torch, ticketc's CSR and direct sparse-conv kernels, per-call overheads), within about a
second, once per process and thread count. `REFERENCE` holds the same rates as measured on the
development machine (a shared 2-core x86 VM, 1 thread): the fallback when calibration is off,
so that plans made without measuring are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ticketc.compile.measure import TimingConfig, time_one


@dataclass(frozen=True)
class CpuCalibration:
    """Seconds per unit of work on this CPU (fp32). Sparse-kernel rates are per thread; a call
    with less work than the kernels' parallel threshold runs on one thread."""

    threads: int
    source: str  # "measured" or "reference"
    module_call_s: float  # per nn.Module call (Python): every layer not run inside a chain
    dense_call_s: float  # per torch op call
    dense_gemm_s: float  # per multiply-add, F.linear at batch >= 64
    bandwidth: float  # bytes/s streaming a dense weight (F.linear at batch 1)
    dense_conv_s: float  # per multiply-add, 3x3 conv
    dense_conv1x1_s: float  # per multiply-add, 1x1 conv
    dense_depthwise_s: float  # per multiply-add, depthwise 3x3 conv
    csr_call_s: float  # per CSR kernel call (Python, dispatch, allocation)
    csr_fma_s: float  # per multiply-add, CSR kernel at batch >= 2, one thread
    csr_dot_s: float  # per stored weight, CSR kernel at batch 1, one thread
    transpose_s: float  # per activation element transposed in and out, one thread
    conv_call_s: float  # per sparse-conv kernel call
    conv_fma_s: float  # per multiply-add, direct sparse conv, one thread
    fill_s: float  # per element of the padded phase planes filled, one thread
    parallel_efficiency: float = 0.8  # speed-up per extra thread on large calls
    parallel_min_work: int = 1 << 17  # the kernels' threshold (ticketc.kernels)

    def parallel(self, work: float, per_unit_s: float) -> float:
        """Seconds for `work` units at `per_unit_s` on one thread, spread over the threads
        the kernels use for that much work."""
        if self.threads <= 1 or work < self.parallel_min_work:
            return work * per_unit_s
        return work * per_unit_s / (1 + self.parallel_efficiency * (self.threads - 1))


# Measured on the development machine (shared 2-core x86 KVM guest, AVX-512, torch 2.13,
# Numba 0.68, 1 thread) by `measure_calibration`.
# csr_fma_s and transpose_s re-measured after the register-tiled CSR kernel and the 16 x 16
# transposes (load ~4.4: 19 G multiply-adds/s and 0.35 ns beside dense_gemm at 52 G/s),
# scaled by dense_gemm's 75 / 52 to the idle machine the other rates were measured on.
REFERENCE = CpuCalibration(
    threads=1,
    source="reference",
    module_call_s=3e-6,
    dense_call_s=3e-6,
    dense_gemm_s=1 / 75e9,
    bandwidth=12e9,
    dense_conv_s=1 / 55e9,
    dense_conv1x1_s=1 / 45e9,
    dense_depthwise_s=1 / 4e9,
    csr_call_s=4e-6,
    csr_fma_s=1 / 27e9,
    csr_dot_s=0.9e-9,
    transpose_s=0.25e-9,
    conv_call_s=8e-6,
    conv_fma_s=1 / 14e9,
    fill_s=0.5e-9,
)

_MEASURED: dict[int, CpuCalibration] = {}


def calibration(*, measure: bool = True) -> CpuCalibration:
    """The rates for torch's current thread count: measured once per process and thread
    count when `measure`, else REFERENCE (scaled to the thread count)."""
    from ticketc.kernels.cpu_threads import num_threads

    threads = num_threads()
    if not measure:
        return replace(REFERENCE, threads=threads)
    cached = _MEASURED.get(threads)
    if cached is None:
        cached = _MEASURED[threads] = measure_calibration(threads)
    return cached


def _per(fn, units: float, budget_s: float = 0.04) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of fn() per unit of work."""
    t = time_one(fn, TimingConfig(budget_s=budget_s, min_rounds=3, max_rounds=200, warmup=2))
    return t.median / units


@torch.no_grad()
def measure_calibration(threads: int) -> CpuCalibration:
    """Time the reference kernels at `threads` (torch's setting): about a second."""
    from ticketc.formats.csr import CSR, index_dtype_for
    from ticketc.kernels import csr_chain_cpu, csr_conv_cpu

    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def sparse(m: int, k: int, density: float) -> torch.Tensor:
        return rand(m, k) * (torch.rand(m, k, generator=g) < density)

    tiny_x, tiny_w = rand(1, 16), rand(16, 16)
    dense_call = _per(lambda: F.linear(tiny_x, tiny_w), 1)
    x64, w1k = rand(64, 1024), rand(1024, 1024)
    dense_gemm = _per(lambda: F.linear(x64, w1k), 64 * 1024 * 1024)
    x1, w2k = rand(1, 2048), rand(2048, 2048)
    bandwidth = 2048 * 2048 * 4 / _per(lambda: F.linear(x1, w2k), 1)
    img, w3 = rand(1, 64, 28, 28), rand(64, 64, 3, 3)
    dense_conv = _per(lambda: F.conv2d(img, w3, padding=1), 64 * 64 * 9 * 28 * 28)
    img2, w1 = rand(1, 128, 28, 28), rand(128, 128, 1, 1)
    dense_1x1 = _per(lambda: F.conv2d(img2, w1), 128 * 128 * 28 * 28)
    wd = rand(128, 1, 3, 3)
    dense_dw = _per(lambda: F.conv2d(img2, wd, padding=1, groups=128), 128 * 9 * 28 * 28)

    def chain_of(w: torch.Tensor) -> csr_chain_cpu.CsrChain:
        p = CSR.from_dense(w, index_dtype=index_dtype_for("cpu"))
        layer = csr_chain_cpu.CsrLayer.of(p.crow_indices, p.col_indices, p.values, None, p.cols)
        return csr_chain_cpu.CsrChain([layer], [False])

    small = chain_of(sparse(16, 16, 0.5))
    csr_call = _per(lambda: small(tiny_x), 1)
    big = chain_of(sparse(1024, 1024, 0.05))
    nnz = big.nnz
    csr_dot = _per(lambda: big(x1[:, :1024], threads=1), nnz)
    csr_fma = _per(lambda: big(x64, threads=1), 64 * nnz)
    thin = chain_of(sparse(1024, 1024, 0.001))
    transpose = max(0.0, _per(lambda: thin(x64, threads=1), 1) - csr_call - csr_fma * 64 * thin.nnz)
    transpose /= 64 * 2048

    def conv_of(w: torch.Tensor, stride: int, pad: int) -> csr_conv_cpu.CsrConv:
        p = CSR.from_dense(w, index_dtype=index_dtype_for("cpu"))
        m, c, kh, kw = w.shape
        geom = csr_conv_cpu.ConvGeometry(c, m, (kh, kw), (stride, stride), (pad,) * 4, (1, 1), 1)
        return csr_conv_cpu.CsrConv(p.crow_indices, p.col_indices, p.values, None, geom)

    tiny_img = rand(1, 4, 4, 4)
    tiny_conv = conv_of(sparse(4, 36, 0.5).reshape(4, 4, 3, 3), 1, 1)
    conv_call = _per(lambda: tiny_conv(tiny_img), 1)
    conv = conv_of(sparse(64, 576, 0.1).reshape(64, 64, 3, 3), 1, 1)
    run = 27 * 30 + 28
    conv_fma = _per(lambda: conv(img, threads=1), conv.nnz * run)
    sub = conv_of(sparse(8, 128, 0.01).reshape(8, 128, 1, 1), 2, 0)  # fill (subsample) bound
    fill = max(0.0, _per(lambda: sub(img2, threads=1), 1) - conv_call) / (128 * 14 * 14)
    identity = nn.Identity()
    module_call = _per(lambda: identity(tiny_x), 1)
    return CpuCalibration(
        threads=threads,
        source="measured",
        module_call_s=module_call,
        dense_call_s=dense_call,
        dense_gemm_s=dense_gemm,
        bandwidth=bandwidth,
        dense_conv_s=dense_conv,
        dense_conv1x1_s=dense_1x1,
        dense_depthwise_s=dense_dw,
        csr_call_s=csr_call,
        csr_fma_s=csr_fma,
        csr_dot_s=csr_dot,
        transpose_s=transpose,
        conv_call_s=conv_call,
        conv_fma_s=conv_fma,
        fill_s=fill,
    )
