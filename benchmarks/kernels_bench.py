"""Sweep ticketc's sparse linear kernels against dense and torch's sparse baselines.

y = x @ W.T for W [M, K] at several densities and mask kinds, x [N, K]. Methods:

    dense            F.linear (cuBLAS / MKL)                                  the baseline
    torch_csr        torch CSR matmul (mv at batch 1), sparse tensor built once (cuSPARSE / MKL)
    torch_triton_bsr torch.sparse._triton_ops.bsr_dense_mm (CUDA, block masks)
    semi_2:4         torch 2:4 semi-structured (CUDA, fp16/bf16, 2:4 masks)
    ticketc_csr      ticketc.ops.csr_linear   (CUDA only for N <= 64: its regime)
    ticketc_bsr      ticketc.ops.bsr_linear   (block masks, 32 x 32)
    ticketc_tiled    ticketc.ops.tiled_linear (CUDA)

(ticketc.ops.* are the eager entry points of torch.ops.ticketc.*: same kernels, no dispatcher.)

Times are medians: triton.testing.do_bench on CUDA (L2 flushed between runs, so they are
GPU times without Python launch overhead; `host_us` adds the wall time per call of a
back-to-back loop, which includes it), ticketc.compile.measure.time_interleaved on CPU.
Each result is checked against dense before it is timed. Bytes moved are counted from the
buffers each method must read (weights, indices, x) and write (y): GB/s = bytes / time,
and `roofline` = max(bytes / peak bandwidth, useful flops / peak flops) / time.

Writes benchmarks/results/kernels_<device>.{json,md,png}.

    python benchmarks/kernels_bench.py --device cuda            # full sweep (H200: ~10 min)
    python benchmarks/kernels_bench.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from ticketc import ops
from ticketc.compile.measure import TimingConfig, time_interleaved
from ticketc.formats import BSR, CSR, Tiled

RESULTS = Path(__file__).parent / "results"
T = TypeVar("T")
Timing = tuple[tuple[float, float, float], float | None]  # (p25, median, p75) s, host s

SHAPES = {  # name -> (M, K): Lenet-300-100's layers, then LLM-size layers
    "lenet.fc1": (300, 784),
    "lenet.fc2": (100, 300),
    "lenet.fc3": (10, 100),
    "4096x4096": (4096, 4096),
    "14336x4096": (14336, 4096),
    "4096x14336": (4096, 14336),
}
DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
BATCHES = (1, 16, 64, 256, 4096)
MASKS = ("random", "ticket", "block32")
BLOCK = 32

# (bandwidth B/s, fp16/bf16 dense tensor-core flop/s, fp32 non-tensor flop/s) by device name
# fragment, from the data sheets (SXM parts). fp32 kernels here use IEEE dots, not TF32.
GPU_PEAKS = {
    "H200": (4.8e12, 989e12, 67e12),
    "H100": (3.35e12, 989e12, 67e12),
    "A100": (2.0e12, 312e12, 19.5e12),
    "L40S": (0.864e12, 362e12, 91.6e12),
    "RTX 4090": (1.0e12, 330e12, 82.6e12),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Row:
    shape: str
    m: int
    k: int
    mask: str
    density: float  # of W's entries actually kept
    batch: int
    method: str
    median_us: float | None
    p25_us: float | None  # spread of the timing runs: on a shared CPU it is wide
    p75_us: float | None
    host_us: float | None
    speedup_vs_dense: float | None
    gbps: float | None
    roofline: float | None
    max_rel_err: float | None
    note: str = ""


# ---------------------------------------------------------------------------------- masks


def make_mask(kind: str, m: int, k: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Bool [M, K] mask of about `density` of the entries.

    random: uniform unstructured. ticket: magnitude pruning of a weight whose rows and
    columns have log-normal scales, as trained layers do: some units and input features keep
    most of their weights, others lose them all (dead pixels, dead units), as in real
    lottery tickets. block32: whole 32 x 32 blocks kept or dropped. 2:4: two of every four.
    """
    if kind == "random":
        return torch.rand(m, k, generator=gen) < density
    if kind == "ticket":
        row = torch.exp(0.7 * torch.randn(m, 1, generator=gen))
        col = torch.exp(0.7 * torch.randn(1, k, generator=gen))
        score = (torch.randn(m, k, generator=gen) * row * col).abs()
        keep = max(1, round(density * m * k))
        threshold = score.flatten().kthvalue(m * k - keep + 1).values  # the keep-th largest
        return score >= threshold
    if kind == "block32":
        mb, kb = -(-m // BLOCK), -(-k // BLOCK)
        chosen = torch.randperm(mb * kb, generator=gen)[: max(1, round(density * mb * kb))]
        blocks = torch.zeros(mb * kb, dtype=torch.bool)
        blocks[chosen] = True
        blocks = blocks.reshape(mb, kb)
        full = blocks.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        return full[:m, :k]
    if kind == "2:4":
        groups = torch.rand(m, k // 4, 4, generator=gen).argsort(dim=2)[..., :2]
        mask = torch.zeros(m, k // 4, 4, dtype=torch.bool)
        mask.scatter_(2, groups, True)
        return mask.reshape(m, k)
    raise ValueError(f"unknown mask kind {kind!r}; known: {', '.join((*MASKS, '2:4'))}")


# --------------------------------------------------------------------------------- timing


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]],
    budget_s: float = 1.0,
    stat: Callable[[list[float]], T] = statistics.median,  # type: ignore[assignment]
) -> dict[str, T]:
    """`stat` of each fn's seconds per call, from ticketc's one timing loop
    (ticketc.compile.measure.time_interleaved: warm-up, then shuffled interleaved rounds so that
    load from other processes on a shared CPU hits every method alike; 5 to 50 rounds within
    `budget_s`)."""
    timings = time_interleaved(fns, TimingConfig(budget_s=budget_s, min_rounds=5, max_rounds=50))
    return {name: stat(list(t.samples)) for name, t in timings.items()}


def quartiles(ts: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return q[0], statistics.median(ts), q[2]


def time_cuda(fn: Callable[[], object]) -> Timing:
    """((p25, median, p75) GPU seconds via do_bench with L2 flushes, host seconds per call)."""
    import triton.testing

    gpu_ms = triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=[0.25, 0.5, 0.75])
    reps = 50
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return tuple(q * 1e-3 for q in gpu_ms), (time.perf_counter() - t0) / reps


# -------------------------------------------------------------------------------- methods


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def build_methods(
    w: torch.Tensor, mask_kind: str, device: str, dtype: torch.dtype
) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int, str]]:
    """method -> (fn(x) -> y, weight-side bytes read per call, note). Built once per W."""
    m, k = w.shape
    methods: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int, str]] = {}
    methods["dense"] = (lambda x: F.linear(x, w), nbytes(w), "")

    p32 = CSR.from_dense(w, index_dtype=torch.int32).buffers()
    # Built once, as a user holding a torch sparse weight would; a dtype cuSPARSE / MKL lacks
    # fails at the first call and is recorded as such.
    sw = torch.sparse_csr_tensor(
        p32["crow_indices"], p32["col_indices"], p32["values"], (m, k), check_invariants=False
    )

    def torch_csr(x: torch.Tensor) -> torch.Tensor:
        # mv at batch 1 on CPU: MKL's fastest call there (2.5-3x its one-column mm)
        if x.shape[0] == 1 and x.device.type == "cpu":
            return torch.mv(sw, x[0])[None]
        return torch.mm(sw, x.t()).t()

    methods["torch_csr"] = (
        torch_csr,
        nbytes(p32["crow_indices"], p32["col_indices"], sw.values()),
        "",
    )

    csr = p32 if device == "cpu" else CSR.from_dense(w).buffers()
    csr_args = (csr["crow_indices"], csr["col_indices"], csr["values"], csr["row_order"])
    methods["ticketc_csr"] = (
        lambda x: ops.csr_linear(x, *csr_args, None),
        nbytes(*csr_args),
        "",
    )

    if mask_kind == "block32":
        bsr = BSR.from_dense(w, BLOCK).buffers()
        bsr_args = (bsr["crow_indices"], bsr["col_indices"], bsr["values"])
        methods["ticketc_bsr"] = (
            lambda x: ops.bsr_linear(x, *bsr_args, None, m),
            nbytes(*bsr_args),
            "",
        )
        if device == "cuda" and m % BLOCK == 0 and k % BLOCK == 0:
            from torch.sparse._triton_ops import bsr_dense_mm

            tw = torch.sparse_bsr_tensor(*bsr_args, (m, k), check_invariants=False)
            if bsr_dense_mm is None:  # torch sets it to None when it finds no usable Triton
                methods["torch_triton_bsr"] = (None, 0, "unavailable in this torch build")  # type: ignore[assignment]
            else:
                methods["torch_triton_bsr"] = (
                    lambda x: bsr_dense_mm(tw, x.t()).t(),
                    nbytes(*bsr_args),
                    "",
                )

    if device == "cuda":
        tiled = Tiled.from_dense(w).buffers()
        keys = ("tile_crow", "tile_col", "tile_offsets", "row_offsets", "bitmaps", "values")
        tiled_args = tuple(tiled[key] for key in keys)
        methods["ticketc_tiled"] = (
            lambda x: ops.tiled_linear(x, *tiled_args, None, m),  # type: ignore[call-arg,arg-type]
            nbytes(*tiled_args),
            "",
        )
        if mask_kind == "2:4" and dtype != torch.float32:
            try:
                from torch.sparse import to_sparse_semi_structured

                sw24 = to_sparse_semi_structured(w)
                methods["semi_2:4"] = (lambda x: F.linear(x, sw24), nbytes(w) * 9 // 16, "")
            except (RuntimeError, ValueError, NotImplementedError) as e:
                note = f"unsupported: {e}".splitlines()[0][:80]
                methods["semi_2:4"] = (None, 0, note)  # type: ignore[assignment]
    return methods


def build_tunables(
    w: torch.Tensor, mask_kind: str
) -> dict[str, Callable[[dict[str, int]], Callable[[torch.Tensor], torch.Tensor]]]:
    """method -> make(config) -> fn(x): the Triton kernels with an explicit launch config."""
    import ticketc.kernels as kernels

    m = w.shape[0]
    csr = CSR.from_dense(w).buffers()
    csr_args = (csr["crow_indices"], csr["col_indices"], csr["values"], csr["row_order"])
    tiled = Tiled.from_dense(w).buffers()
    keys = ("tile_crow", "tile_col", "tile_offsets", "row_offsets", "bitmaps", "values")
    tiled_args = tuple(tiled[key] for key in keys)
    makers = {
        "ticketc_csr": lambda cfg: lambda x: kernels.csr_linear(x, *csr_args, config=cfg),
        "ticketc_tiled": lambda cfg: (
            lambda x: kernels.tiled_linear(x, *tiled_args, None, m, config=cfg)
        ),
    }
    if mask_kind == "block32":
        bsr = BSR.from_dense(w, BLOCK).buffers()
        bsr_args = (bsr["crow_indices"], bsr["col_indices"], bsr["values"])
        makers["ticketc_bsr"] = lambda cfg: (
            lambda x: kernels.bsr_linear(x, *bsr_args, None, m, config=cfg)
        )
    return makers


def candidate_configs(method: str, batch: int) -> list[dict[str, int]]:
    """The launch configurations `--tune` tries: the same lists TICKETC_AUTOTUNE=1 uses."""
    from ticketc.kernels._launch import dot_candidates
    from ticketc.kernels.csr_linear import csr_candidates

    return csr_candidates(batch) if method == "ticketc_csr" else dot_candidates(batch)


def tune_case(tunables, x: torch.Tensor, ref: torch.Tensor, batch: int):
    """method -> (best seconds, best config), over `candidate_configs` that give right results."""
    import triton.testing

    best = {}
    for method, make in tunables.items():
        if not in_regime(method, batch, "cuda"):
            continue
        results = []
        for cfg in candidate_configs(method, batch):
            fn = make(cfg)
            try:
                y = fn(x)
            except Exception as e:  # noqa: BLE001 - a config may not compile; skip it
                print(f"  {method} {cfg}: {type(e).__name__}", flush=True)
                continue
            if ((y.double() - ref).abs().max() / (ref.abs().max() + 1e-12)).item() > 2e-2:
                continue
            ms = triton.testing.do_bench(lambda fn=fn: fn(x), warmup=5, rep=20,
                                         return_mode="median")  # fmt: skip
            results.append((ms * 1e-3, cfg))
        if results:
            best[method] = min(results, key=lambda r: r[0])
    return best


def in_regime(method: str, batch: int, device: str) -> bool:
    """Skip runs that are known to be hopeless and slow to time."""
    if method == "ticketc_csr" and device == "cuda":
        return batch <= 64  # CUDA-core gather kernel: the small-batch path
    return True


# ---------------------------------------------------------------------------------- sweep


def peaks(device: str, dtype: torch.dtype) -> tuple[float, float, str]:
    """(bytes/s, flop/s, where the numbers come from)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, (bw, flops_half, flops_fp32) in GPU_PEAKS.items():
            if key in name:
                flops = flops_fp32 if dtype == torch.float32 else flops_half
                return bw, flops, f"data sheet ({key})"
        return math.nan, math.nan, "unknown GPU"
    # CPU: the best this (shared) machine reached here: a 64 MiB copy (DRAM, not cache) and a
    # 1024^3 matmul. Layers whose working set fits in cache can exceed a roofline of 1.
    big = torch.empty(64 * 2**20 // 4)
    a = torch.randn(1024, 1024)
    best = time_cpu_interleaved({"copy": big.clone, "mm": lambda: a @ a}, stat=min)
    copy_s, mm_s = best["copy"], best["mm"]
    return (
        2 * nbytes(big) / copy_s,
        2 * 1024**3 / mm_s,
        "best of a 64 MiB copy and a 1024^3 matmul, measured",
    )


def environment(args: argparse.Namespace, bw: float, flops: float, source: str) -> dict[str, Any]:
    cuda = args.device == "cuda"
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "device_type": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "peak_bandwidth_Bps": bw,
        "peak_flops": flops,
        "peak_source": source,
        "timing": "triton.testing.do_bench median (L2 flushed)"
        if cuda
        else "ticketc.compile.measure.time_interleaved: median of 5-50 shuffled rounds",
        "quick": args.quick,
        "tuned": bool(args.tune),
    }


def sweep(args: argparse.Namespace, stem: Path) -> list[Row]:
    """Run every case; reports are rewritten after each (shape, mask) so a cut run keeps data."""
    device, dtype = args.device, DTYPES[args.dtype]
    bw, flops, peak_source = peaks(device, dtype)
    env = environment(args, bw, flops, peak_source)
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)
    masks = (*args.masks, "2:4") if device == "cuda" and not args.quick else args.masks
    for shape in args.shapes:
        m, k = SHAPES[shape]
        for mask_kind in masks:
            densities = (0.5,) if mask_kind == "2:4" else args.densities
            for density in densities:
                mask = make_mask(mask_kind, m, k, density, gen)
                w = (torch.randn(m, k, generator=gen) * mask).to(device=device, dtype=dtype)
                methods = build_methods(w, mask_kind, device, dtype)
                tunables = build_tunables(w, mask_kind) if args.tune else None
                kept = mask.float().mean().item()
                for batch in args.batches:
                    if device == "cpu" and batch * m * k > args.cpu_max_macs:
                        continue
                    case = (shape, m, k, mask_kind, kept, batch, w, methods, device, bw, flops)
                    rows += run_case(*case, tunables)
                    print(format_case(rows, shape, mask_kind, kept, batch), flush=True)
            write_reports(rows, env, stem)
    return rows


def run_case(
    shape, m, k, mask_kind, kept, batch, w, methods, device, bw, flops, tunables=None
) -> list[Row]:
    methods = dict(methods)  # tuned entries are added per case
    x = torch.randn(batch, k, device=device).to(w.dtype)
    ref = (x.double() @ w.double().T) if batch * m * k <= 2**28 else F.linear(x, w).double()
    io_bytes = nbytes(x) + batch * m * w.element_size()
    useful_flops = 2 * batch * kept * m * k
    base = dict(shape=shape, m=m, k=k, mask=mask_kind, density=round(kept, 5), batch=batch)
    skipped: list[Row] = []
    runnable: dict[str, Callable[[], object]] = {}
    errors: dict[str, float] = {}
    for name, (fn, _, note) in methods.items():
        if fn is not None and in_regime(name, batch, device):
            try:
                y = fn(x)
            except (RuntimeError, ValueError, NotImplementedError) as e:
                note = f"failed: {e}".splitlines()[0][:100]
            else:
                errors[name] = ((y.double() - ref).abs().max() / (ref.abs().max() + 1e-12)).item()
                runnable[name] = functools.partial(fn, x)
                continue
        skipped.append(Row(**base, method=name, median_us=None, p25_us=None, p75_us=None,
                           host_us=None,
                           speedup_vs_dense=None, gbps=None, roofline=None, max_rel_err=None,
                           note=note or "out of regime"))  # fmt: skip
    timed: dict[str, Timing]
    if device == "cuda":
        timed = {name: time_cuda(fn) for name, fn in runnable.items()}
    else:
        quarts = time_cpu_interleaved(runnable, stat=quartiles)
        timed = {name: (q, None) for name, q in quarts.items()}
    dense_s = timed["dense"][0][1]
    configs: dict[str, str] = {}
    if tunables:
        for name, (secs, cfg) in tune_case(tunables, x, ref, batch).items():
            timed[f"{name}*"] = ((secs, secs, secs), None)
            methods[f"{name}*"] = methods[name]
            errors[f"{name}*"] = errors.get(name, 0.0)
            configs[f"{name}*"] = json.dumps(cfg)
    out: list[Row] = []
    for name, ((p25, secs, p75), host) in timed.items():
        moved = methods[name][1] + io_bytes
        bound = max(moved / bw, useful_flops / flops)
        out.append(
            Row(
                **base,
                method=name,
                median_us=secs * 1e6,
                p25_us=p25 * 1e6,
                p75_us=p75 * 1e6,
                host_us=None if host is None else host * 1e6,
                speedup_vs_dense=dense_s / secs,
                gbps=moved / secs / 1e9,
                roofline=bound / secs if math.isfinite(bound) else None,
                max_rel_err=errors[name],
                note="WRONG RESULT" if errors[name] > 2e-2 else configs.get(name, ""),
            )
        )
    return out + skipped


def format_case(rows: list[Row], shape, mask_kind, kept, batch) -> str:
    here = [r for r in rows if (r.shape, r.mask, r.batch) == (shape, mask_kind, batch)
            and r.density == round(kept, 5)]  # fmt: skip
    cells = [
        f"{r.method}={r.median_us:.1f}us"
        + (f"({r.speedup_vs_dense:.2f}x)" if r.method != "dense" else "")  # fmt: skip
        for r in here
        if r.median_us is not None and r.speedup_vs_dense is not None
    ]
    return f"{shape:>11} {mask_kind:>7} d={kept:.3f} N={batch:<5} " + " ".join(cells)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# -------------------------------------------------------------------------------- reports


def write_reports(rows: list[Row], env: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, "rows": [asdict(r) for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, env))
    plot(rows, env, stem.with_suffix(".png"))


def markdown(rows: list[Row], env: dict[str, Any]) -> str:
    methods = list(dict.fromkeys(r.method for r in rows))
    lines = [
        "# ticketc kernel sweep",
        "",
        f"Device: {env['device']} ({env['device_type']}), dtype {env['dtype']}, torch "
        f"{env['torch']}, triton {env['triton']}, python {env['python']}, "
        f"{env['cpu_threads']} CPU threads. Timing: {env['timing']}. Roofline peaks: "
        f"{env['peak_bandwidth_Bps'] / 1e9:.0f} GB/s, {env['peak_flops'] / 1e12:.2f} TFLOP/s "
        f"({env['peak_source']}).",
        "",
        *(
            [
                "CPU caveat: this machine has 2 cores shared with other jobs running at the "
                "same time; single runs vary by up to ~10x, so neighbouring cells can disagree. "
                "Methods were timed round-robin so that load hits them alike.",
                "",
            ]
            if env["device_type"] == "cpu"
            else []
        ),
        "Cells: median time in us and speedup over dense (>1 = faster than dense). "
        "`-`: not run (out of the method's regime or not applicable). The JSON also holds "
        "p25/p75 of the runs, bytes-based GB/s, the roofline fraction, the error against a "
        "float64 product and, on CUDA, host wall time per call (Python launch overhead "
        "included; do_bench times hide it). `name*`: best of `--tune`'s launch configs.",
        "",
        "| shape | mask | density | batch | " + " | ".join(methods) + " | best roofline |",
        "|---|---|---|---|" + "---|" * len(methods) + "---|",
    ]
    cases = dict.fromkeys((r.shape, r.mask, r.density, r.batch) for r in rows)
    for case in cases:
        here = {r.method: r for r in rows if (r.shape, r.mask, r.density, r.batch) == case}
        cells = []
        for meth in methods:
            r = here.get(meth)
            if r is None or r.median_us is None:
                cells.append("-")
            elif meth == "dense" or r.speedup_vs_dense is None:
                cells.append(f"{r.median_us:.1f}")
            else:
                flag = " WRONG" if r.note == "WRONG RESULT" else ""
                cells.append(f"{r.median_us:.1f} ({r.speedup_vs_dense:.2f}x){flag}")
        best = [r for r in here.values() if r.method.startswith("ticketc") and r.median_us]
        best_roof = max((r.roofline or 0.0) for r in best) if best else None
        roof = f"{best_roof:.2f}" if best_roof is not None else "-"
        shape, mask, density, batch = case
        lines.append(f"| {shape} | {mask} | {density * 100:.1f}% | {batch} | "
                     + " | ".join(cells) + f" | {roof} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[Row], env: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = max((r.shape for r in rows), key=lambda s: SHAPES[s][0] * SHAPES[s][1])
    masks = list(dict.fromkeys(r.mask for r in rows if r.shape == shape and r.mask != "2:4"))
    fig, axes = plt.subplots(1, len(masks), figsize=(5 * len(masks), 4), squeeze=False)
    for ax, mask in zip(axes[0], masks, strict=True):
        here = [r for r in rows if r.shape == shape and r.mask == mask and r.speedup_vs_dense]
        for method in dict.fromkeys(r.method for r in here):
            for batch in sorted({r.batch for r in here}):
                pts = sorted((r.density, r.speedup_vs_dense) for r in here
                             if r.method == method and r.batch == batch)  # fmt: skip
                if pts and method != "dense":
                    style = "-" if method.startswith("ticketc") else "--"
                    ax.plot([100 * (1 - d) for d, _ in pts], [s for _, s in pts], style,
                            marker="o", ms=3, label=f"{method} N={batch}")  # fmt: skip
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("speedup over dense")
        ax.set_title(f"{shape}, {mask} mask")
        ax.legend(fontsize=6)
    fig.suptitle(f"{env['device']} ({env['dtype']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--quick", action="store_true", help="a small subset")
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES))
    parser.add_argument("--masks", nargs="+", choices=MASKS)
    parser.add_argument("--densities", nargs="+", type=float)
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument(
        "--tune", action="store_true", help="CUDA: also time a grid of launch configs (name*)"
    )
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument(
        "--cpu-max-macs", type=float, default=2e9, help="skip larger CPU cases (dense is slow)"
    )
    parser.add_argument("--out", type=Path, help="output stem (default results/kernels_<device>)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    quick = args.quick
    args.shapes = args.shapes or (
        ["lenet.fc1", "4096x4096"] if quick else list(SHAPES)
    )  # fmt: skip
    args.masks = args.masks or (["random", "block32"] if quick else list(MASKS))
    args.densities = args.densities or ([0.1, 0.01] if quick else list(DENSITIES))
    args.batches = args.batches or ([1, 64] if quick else list(BATCHES))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = args.out or RESULTS / f"kernels_{args.device}{'_quick' if args.quick else ''}"
    sweep(args, stem)
    print(f"wrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
