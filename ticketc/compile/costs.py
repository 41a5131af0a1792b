"""Cost model: predicted time of one layer in each format, per device.

A layer's work is described by `Gemm` (a Linear: y[N, M] = x[N, K] @ W.T; a conv carries its
`ConvShape` too). On CPU the prediction uses rates measured on this machine by
`ticketc.compile.calibrate` (dense GEMM and conv, ticketc's CSR and sparse-conv kernels, per-call
overheads); on CUDA it starts from H200 data-sheet numbers times efficiency factors that are
guesses until measured on the GPU. Either way the compiled model is then measured against dense
(`CompileConfig.check`), and `tune=True` replaces predictions by timings of every candidate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ticketc.compile.calibrate import CpuCalibration
from ticketc.compile.config import BSR_BLOCKSIZES
from ticketc.formats.layout import nonempty_blocks

TILE = 32  # tiled format: 32 x 32 bitmap tiles (tile_m = 32)


@dataclass(frozen=True)
class ConvShape:
    """A conv layer's geometry at one input size (2-D; a Conv1d has h == 1)."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    h: int  # input height / width (unpadded)
    w: int
    oh: int  # output height / width
    ow: int
    hq: int  # height / width of one phase plane of the padded input (the CPU kernel's grid)
    wq: int
    phases: int  # phase planes the kernel fills per channel (stride phases its taps use)
    direct: bool  # stride 1, no padding: the kernel reads x in place, no planes to fill

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def macs_per_sample(self) -> int:
        kh, kw = self.kernel
        return self.out_channels * self.oh * self.ow * (self.in_channels // self.groups) * kh * kw

    @property
    def run_length(self) -> int:
        """Outputs one stored weight updates in the CPU kernel, per sample."""
        return (self.oh - 1) * self.wq + self.ow


@dataclass(frozen=True)
class Gemm:
    """The work of one layer at the planned batch size."""

    n: int  # rows of x: batch (times tokens / positions for a Linear on [N, T, K])
    k: int  # input features (in_channels/groups * kh * kw for a conv)
    m: int  # output features
    nnz: int  # kept weights
    itemsize: int  # bytes per value in the compiled dtype
    blocks: dict[int, int] = field(default_factory=dict)  # BSR blocksize -> nonempty blocks
    tiles: int = 0  # nonempty 32 x 32 tiles
    conv: ConvShape | None = None  # a conv: n is then the batch size

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.m * self.k)


# ------------------------------------------------------------------------------------- CPU


@dataclass(frozen=True)
class CpuCosts:
    """CPU predictions from measured rates (ticketc.compile.calibrate.CpuCalibration)."""

    calibration: CpuCalibration
    itemsize: int = 4
    slow: float = 1.0  # fp16/bf16: torch's dense CPU kernels run well below fp32 speed

    @property
    def name(self) -> str:
        c = self.calibration
        return f"cpu{c.threads}-{c.source}"

    def candidates(self, g: Gemm, formats: tuple[str, ...]) -> list[str]:
        """dense, and csr where allowed (the CPU's only fast sparse kernels)."""
        return ["dense", "csr"] if "csr" in formats else ["dense"]

    def predict(self, fmt: str, g: Gemm) -> float:
        """Predicted seconds for one call of the layer in format `fmt` (dense or csr)."""
        c = self.calibration
        if fmt == "dense":
            if g.conv is not None:
                return c.module_call_s + self._dense_conv(g.conv, g.n)
            flops_s = g.n * g.m * g.k * c.dense_gemm_s * self.slow
            weight_s = g.m * g.k * self.itemsize / c.bandwidth
            return c.module_call_s + c.dense_call_s + max(flops_s, weight_s)
        if fmt != "csr":
            raise ValueError(f"the CPU cost model prices dense and csr, not {fmt!r}")
        if g.conv is not None:
            s = g.conv
            work = g.n * g.nnz * s.run_length
            fill = 0 if s.direct else g.n * s.in_channels * s.phases * s.hq * s.wq
            kernel = c.conv_call_s + c.parallel(work, c.conv_fma_s) + c.parallel(fill, c.fill_s)
            return c.module_call_s + kernel
        return c.module_call_s + c.csr_call_s + self._csr_work(g)

    def predict_chain(self, gemms: list[Gemm]) -> float | None:
        """Consecutive csr Linear layers run as one kernel call, without a module call per
        layer."""
        if len(gemms) < 2:
            return None
        return self.calibration.csr_call_s + sum(self._csr_work(g) for g in gemms)

    def _csr_work(self, g: Gemm) -> float:
        c = self.calibration
        if g.n == 1:
            return c.parallel(g.nnz, c.csr_dot_s)
        return c.parallel(g.n * g.nnz, c.csr_fma_s) + c.parallel(g.n * (g.k + g.m), c.transpose_s)

    def _dense_conv(self, s: ConvShape, n: int) -> float:
        c = self.calibration
        macs = n * s.macs_per_sample
        if s.groups > 1:
            rate = c.dense_depthwise_s
        elif s.kernel == (1, 1):
            rate = c.dense_conv1x1_s
        else:
            rate = c.dense_conv_s
        return c.dense_call_s + macs * rate * self.slow


# -------------------------------------------------------------------------------- CUDA


@dataclass(frozen=True)
class FormatCost:
    overhead_s: float  # per call: dispatch, launch, allocation
    flop_rate: float  # FLOP/s on the work the format does


@dataclass(frozen=True)
class DeviceCosts:
    """GPU predictions: t = overhead + max(work / flop_rate, bytes / bandwidth)."""

    name: str
    bandwidth: float  # bytes/s from memory
    cache_bandwidth: float  # bytes/s when the working set fits in cache
    cache_bytes: int
    index_bytes: int  # bytes per CSR column index as stored for this device
    formats: dict[str, FormatCost]  # layout -> cost; a missing layout is no candidate

    def candidates(self, g: Gemm, formats: tuple[str, ...]) -> list[str]:
        """Formats worth predicting for this layer on this device: dense first."""
        names = ["dense"]
        for layout in formats:
            if layout not in self.formats:
                continue
            if layout == "bsr":
                names += [f"bsr({b})" for b in BSR_BLOCKSIZES if b in g.blocks]
            else:
                names.append(layout)
        return names

    def predict(self, fmt: str, g: Gemm) -> float:
        """Predicted seconds for one call of the layer in format `fmt`."""
        layout, b = parse_format(fmt)
        cost = self.formats[layout]
        s = g.itemsize
        n = g.n * (g.conv.oh * g.conv.ow if g.conv is not None else 1)  # GEMM rows
        io = (n * g.k + n * g.m) * s
        if layout == "dense":
            work, weight_bytes = 2 * n * g.m * g.k, g.m * g.k * s
        elif layout == "csr":
            work, weight_bytes = 2 * n * g.nnz, g.nnz * (s + self.index_bytes) + 4 * (g.m + 1)
        elif layout == "bsr":
            assert b is not None
            nb = g.blocks[b]
            work, weight_bytes = 2 * n * nb * b * b, nb * (b * b * s + 4) + 4 * (g.m // b + 2)
        else:  # tiled: values + a bitmap word and a row offset per tile row + per-tile indices
            work = 2 * n * g.tiles * TILE * TILE
            weight_bytes = g.nnz * s + g.tiles * (TILE * 6 + 8)
        if g.conv is not None and layout != "dense":
            io += 2 * n * g.k * s  # unfold writes the patches and the GEMM reads them back
        nbytes = weight_bytes + io
        bandwidth = self.cache_bandwidth if nbytes <= self.cache_bytes else self.bandwidth
        return cost.overhead_s + max(work / cost.flop_rate, nbytes / bandwidth)

    def predict_chain(self, gemms: list[Gemm]) -> float | None:
        return None  # no chain kernel on the GPU


def _h200(dtype: torch.dtype) -> DeviceCosts:
    tensor_core = dtype in (torch.float16, torch.bfloat16)
    peak = 990e12 if tensor_core else 67e12  # fp32 without TF32 runs on CUDA cores
    return DeviceCosts(
        name=f"h200-{dtype}".replace("torch.", ""),
        bandwidth=4.8e12 * 0.8,
        cache_bandwidth=10e12,
        cache_bytes=40 << 20,  # of the 50 MB L2
        index_bytes=2,  # int16 column indices when K <= 32768
        formats={
            "dense": FormatCost(5e-6, peak * 0.6),
            "csr": FormatCost(6e-6, 67e12 * 0.1),  # gathers on CUDA cores
            "bsr": FormatCost(6e-6, peak * 0.35),
            "tiled": FormatCost(6e-6, peak * 0.3),
        },
    )


CostModel = CpuCosts | DeviceCosts


def device_costs(device: str, dtype: torch.dtype, *, calibrate: bool = False) -> CostModel:
    """The cost model for device type "cpu" or "cuda" at `dtype`. CPU: rates measured on this
    machine at torch's thread count when `calibrate` (cached per process), else the reference
    rates of ticketc.compile.calibrate."""
    if device == "cpu":
        from ticketc.compile.calibrate import calibration

        slow = 1.0 if dtype in (torch.float32, torch.float64) else 0.25
        itemsize = torch.empty((), dtype=dtype).element_size()
        return CpuCosts(calibration(measure=calibrate), itemsize, slow)
    if device == "cuda":
        return _h200(dtype)
    raise ValueError(f"no cost model for device type {device!r}; known: cpu, cuda")


_BSR = re.compile(r"bsr\((\d+)\)")


def parse_format(name: str) -> tuple[str, int | None]:
    """ "dense" | "csr" | "tiled" | "bsr(B)" -> (layout, blocksize or None): the layout is
    "dense" or a name in ticketc.formats.LAYOUTS."""
    if name in ("dense", "csr", "tiled"):
        return name, None
    match = _BSR.fullmatch(name)
    if match and int(match.group(1)) > 0:
        return "bsr", int(match.group(1))
    raise ValueError(f"unknown format {name!r}; known: dense, csr, bsr(B) e.g. bsr(16), tiled")


def gemm_stats(keep: torch.Tensor, n: int, itemsize: int, *, conv: ConvShape | None = None) -> Gemm:
    """Gemm for a kept-weight mask `keep` [M, K] (bool) at N rows of input (a conv: N samples
    and its ConvShape; keep is its weight flattened to [M, C/groups * kh * kw])."""
    m, k = keep.shape
    blocks = {b: _nonempty(keep, b, b) for b in BSR_BLOCKSIZES} if conv is None else {}
    return Gemm(
        n=n,
        k=k,
        m=m,
        nnz=int(keep.sum()),
        itemsize=itemsize,
        blocks=blocks,
        tiles=_nonempty(keep, TILE, TILE) if conv is None else 0,
        conv=conv,
    )


def _nonempty(keep: torch.Tensor, bm: int, bk: int) -> int:
    return int(nonempty_blocks(keep, bm, bk).sum())
