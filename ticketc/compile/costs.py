"""Cost model: predicted time of one layer's GEMM in each format, per device.

A layer is y[N, M] = x[N, K] @ W.T with W holding `nnz` kept weights (a conv is the same GEMM
over unfolded patches, N = batch x output positions). Each format costs

    t = overhead + N*M*per_output + max(work / flop_rate, bytes / bandwidth)

where work counts the multiply-adds the format really does (all of W for dense, nonzeros for
CSR, stored blocks / tiles for BSR / tiled) and bytes the weight storage plus activations.

Figures: CPU ones were measured on the 2-core development machine (see `_cpu`); the GPU ones
start from H200 data-sheet numbers (4.8 TB/s, ~990 TFLOP/s bf16) times efficiency factors that
are guesses until measured on the GPU. `tune=True` replaces all of this with timings on the
actual device.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from ticketc.compile.config import BSR_BLOCKSIZES
from ticketc.ops import NUMBA_MIN_BATCH, runs_as_chain

TILE = 32  # tiled format: 32 x 32 bitmap tiles (tile_m = 32)


@dataclass(frozen=True)
class Gemm:
    """The work of one layer at the planned batch size."""

    n: int  # rows of x: batch, times output positions for a conv
    k: int  # input features (in_channels/groups-expanded x kh x kw for a conv)
    m: int  # output features
    nnz: int  # kept weights
    itemsize: int  # bytes per value in the compiled dtype
    blocks: dict[int, int] = field(default_factory=dict)  # BSR blocksize -> nonempty blocks
    tiles: int = 0  # nonempty 32 x 32 tiles
    unfold: bool = False  # a conv: sparse formats must materialise the unfolded input
    feature_major: bool = False  # x arrives as [K, N] (from a CPU CSR layer): no transpose

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.m * self.k)


@dataclass(frozen=True)
class FormatCost:
    overhead_s: float  # per call: dispatch, launch, allocation
    flop_rate: float  # FLOP/s on the work the format does
    per_output_s: float = 0.0  # per output element (CPU CSR pays transposes and accumulators)
    per_input_s: float = 0.0  # per input element (CPU CSR from Numba transposes its input)
    per_entry_s: float = 0.0  # per stored weight, on every thread (CPU chain: index, loop)


@dataclass(frozen=True)
class DeviceCosts:
    name: str
    bandwidth: float  # bytes/s from memory
    cache_bandwidth: float  # bytes/s when the working set fits in cache
    cache_bytes: int
    index_bytes: int  # bytes per CSR column index as stored for this device
    formats: dict[str, FormatCost]  # format kind -> cost; a missing kind is no candidate
    # kind -> (batch, cost): from that batch size on the kind runs another kernel at this cost
    from_batch: dict[str, tuple[int, FormatCost]] = field(default_factory=dict)
    # Consecutive csr Linear layers run as one kernel call (CPU: CsrSequential): overhead_s
    # per chain, flop_rate / per_output_s per layer, per_input_s for the first layer's input.
    chain: FormatCost | None = None

    def cost(self, kind: str, n: int) -> FormatCost:
        switch = self.from_batch.get(kind)
        return switch[1] if switch is not None and n >= switch[0] else self.formats[kind]


def _cpu(dtype: torch.dtype) -> DeviceCosts:
    # Measured per thread on the development machine (torch 2.13, MKL, fp32, 300x784 /
    # 1024x1024 / 4096x4096 layers, batch 1-256): dense ~90 GFLOP/s at batch >= 64, scaling
    # sub-linearly with threads (~150 at 2), ~7 us per call (64 x 99 -> 10: 8.4 us). The CSR
    # op on MKL (batch < NUMBA_MIN_BATCH): ~12 GFLOP/s of useful work per thread plus ~18 us
    # per call (custom-op dispatch and checks) and ~1.5 ns per output element; on Numba
    # (larger batches): 30-40 GFLOP/s per thread plus ~6 us per call, ~0.3 ns per output and
    # ~0.4 ns per input element (the transpose into feature-major order; none when the input
    # already is, as after a CSR layer). A chain of CSR layers run as one call
    # (ticketc.kernels.csr_cpu.CsrChain): ~15 us per chain (Python, dispatch, allocation)
    # and ~1.8 ns per stored weight whatever the batch, which every thread pays for its own
    # columns (Lenet-300-100 at batch 1: ~32 us at 3.6 %, ~113 us at 20 % against ~55 us
    # dense; at 3.6 %, batch 64: ~50 us at 2 threads).
    threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    # Half types on CPU: matmuls run far below fp32 speed and the CSR op upcasts the values on
    # every call; scale everything down and let tuning decide.
    slow = 1.0 if dtype in (torch.float32, torch.float64) else 0.25
    return DeviceCosts(
        name=f"cpu{threads}-{dtype}".replace("torch.", ""),
        bandwidth=10e9 * threads,
        cache_bandwidth=55e9,
        cache_bytes=4 << 20,
        index_bytes=4,  # torch's CSR kernels take int32 indices directly
        formats={
            "dense": FormatCost(7e-6, 90e9 * threads**0.75 * slow),
            "csr": FormatCost(18e-6, 12e9 * threads * slow, per_output_s=1.5e-9),
            # The CPU BSR path is the pure-torch reference (gather + einsum + index_add).
            "bsr": FormatCost(40e-6, 10e9 * threads * slow, per_output_s=3e-9),
        },
        from_batch={
            "csr": (
                NUMBA_MIN_BATCH,
                FormatCost(6e-6, 30e9 * threads * slow, per_output_s=0.3e-9, per_input_s=0.4e-9),
            )
        },
        chain=FormatCost(
            15e-6, 30e9 * threads * slow, per_output_s=0.3e-9, per_input_s=0.4e-9,
            per_entry_s=1.8e-9,
        ),
    )


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


def device_costs(kind: str, dtype: torch.dtype) -> DeviceCosts:
    """The cost model for device kind "cpu" or "cuda" at `dtype`."""
    if kind == "cpu":
        return _cpu(dtype)
    if kind == "cuda":
        return _h200(dtype)
    raise ValueError(f"no cost model for device kind {kind!r}; known: cpu, cuda")


_BSR = re.compile(r"bsr\((\d+)\)")


def parse_format(name: str) -> tuple[str, int | None]:
    """ "dense" | "csr" | "tiled" | "bsr(B)" -> (kind, blocksize or None)."""
    if name in ("dense", "csr", "tiled"):
        return name, None
    match = _BSR.fullmatch(name)
    if match and int(match.group(1)) > 0:
        return "bsr", int(match.group(1))
    raise ValueError(f"unknown format {name!r}; known: dense, csr, bsr(B) e.g. bsr(16), tiled")


def candidates(g: Gemm, costs: DeviceCosts, sparse_kinds: tuple[str, ...]) -> list[str]:
    """Formats worth predicting for this layer on this device: dense first."""
    names = ["dense"]
    for kind in sparse_kinds:
        if kind not in costs.formats:
            continue
        if kind == "bsr":
            names += [f"bsr({b})" for b in BSR_BLOCKSIZES if b in g.blocks]
        else:
            names.append(kind)
    return names


def predict(name: str, g: Gemm, costs: DeviceCosts) -> float:
    """Predicted seconds for one call of the layer in format `name`."""
    kind, b = parse_format(name)
    cost = costs.cost(kind, g.n)
    s = g.itemsize
    io = (g.n * g.k + g.n * g.m) * s
    if kind == "dense":
        work, weight_bytes = 2 * g.n * g.m * g.k, g.m * g.k * s
    elif kind == "csr":
        work, weight_bytes = 2 * g.n * g.nnz, g.nnz * (s + costs.index_bytes) + 4 * (g.m + 1)
    elif kind == "bsr":
        assert b is not None
        nb = g.blocks[b]
        work, weight_bytes = 2 * g.n * nb * b * b, nb * (b * b * s + 4) + 4 * (g.m // b + 2)
        if costs.name.startswith("cpu"):
            io += 2 * g.n * nb * b * s  # the reference gathers x once per block
    else:  # tiled: values + a bitmap word and a row offset per tile row + per-tile indices
        work = 2 * g.n * g.tiles * TILE * TILE
        weight_bytes = g.nnz * s + g.tiles * (TILE * 6 + 8)
    if g.unfold and kind != "dense":
        io += 2 * g.n * g.k * s  # unfold writes the patches and the GEMM reads them back
    nbytes = weight_bytes + io
    bandwidth = costs.cache_bandwidth if nbytes <= costs.cache_bytes else costs.bandwidth
    return (
        cost.overhead_s
        + g.n * g.m * cost.per_output_s
        + (0.0 if g.feature_major else g.n * g.k * cost.per_input_s)
        + max(work / cost.flop_rate, nbytes / bandwidth)
    )


def predict_chain(gemms: list[Gemm], costs: DeviceCosts) -> float | None:
    """Predicted seconds for consecutive CSR layers run as one kernel call, or None where the
    device has no such kernel or the runtime would run them layer by layer (see
    ticketc.compile.modules.CsrSequential)."""
    cost, n = costs.chain, gemms[0].n
    if cost is None or len(gemms) < 2 or not runs_as_chain(n, sum(g.nnz for g in gemms)):
        return None
    return (
        cost.overhead_s
        + n * gemms[0].k * cost.per_input_s
        + sum(
            g.nnz * (cost.per_entry_s + 2 * g.n / cost.flop_rate) + g.n * g.m * cost.per_output_s
            for g in gemms
        )
    )


def gemm_stats(keep: torch.Tensor, n: int, itemsize: int, *, unfold: bool = False) -> Gemm:
    """Gemm for a kept-weight mask `keep` [M, K] (bool) at N rows of input."""
    m, k = keep.shape
    blocks = {b: _nonempty(keep, b, b) for b in BSR_BLOCKSIZES}
    return Gemm(
        n=n,
        k=k,
        m=m,
        nnz=int(keep.sum()),
        itemsize=itemsize,
        blocks=blocks,
        tiles=_nonempty(keep, TILE, TILE),
        unfold=unfold,
    )


def _nonempty(keep: torch.Tensor, bm: int, bk: int) -> int:
    m, k = keep.shape
    mp, kp = -(-m // bm) * bm, -(-k // bk) * bk
    padded = torch.nn.functional.pad(keep.to(torch.uint8), (0, kp - k, 0, mp - m))
    return int(padded.reshape(mp // bm, bm, kp // bk, bk).amax(dim=(1, 3)).sum())
