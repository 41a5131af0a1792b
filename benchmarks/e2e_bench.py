"""End-to-end speed of compiled models: dense vs ticketc-compiled (planned, and tuned) vs torch CSR.

Models: Lenet-300-100 pruned layer-wise as in the lottery-ticket paper (hidden layers 20 % per
round, output layer 10 %) to 20 / 10 / 3.6 / 1.9 / 1 % overall density, and a 4096-wide MLP
(3 layers of 4096 x 4096) pruned to 5 / 2 / 1 %. Magnitude pruning of a randomly initialised
model: speed depends on the mask's shape, not on trained values. When examples/lenet300-ticket.pt
exists, its real masks are measured too.

Timing: every variant is run once per round, rounds interleaved in random order (the machine is
shared, so drift hits all variants alike), after warm-up; the median over rounds is reported.

    python benchmarks/e2e_bench.py [--quick] [--threads 1] [--device cpu|cuda] [--models ...]

Writes e2e_<device>[_<N>threads].json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

import ticketc
import ticketc.compile as tc
from ticketc.compile import CompileConfig, plan_of
from ticketc.models import lenet300

LENET_DENSITIES = (0.20, 0.10, 0.036, 0.019, 0.01)
MLP_DENSITIES = (0.05, 0.02, 0.01)
BATCHES = (1, 16, 64, 256)


# --------------------------------------------------------------------------------- models


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def prune_layerwise_(model: nn.Module, density: float) -> None:
    """The paper's schedule: hidden layers keep 0.8^r, the output layer 0.9^r; pick r (real)
    so the overall density is `density`, then keep the largest-magnitude weights per layer."""
    layers = _linears(model)
    sizes = [m.weight.numel() for m in layers]

    def overall(r: float) -> float:
        keep = [0.8**r] * (len(layers) - 1) + [0.9**r]
        return sum(k * s for k, s in zip(keep, sizes, strict=True)) / sum(sizes)

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if overall(mid) > density else (lo, mid)
    keeps = [0.8**lo] * (len(layers) - 1) + [0.9**lo]
    for layer, keep in zip(layers, keeps, strict=True):
        _keep_largest_(layer, keep)


@torch.no_grad()
def prune_uniform_(model: nn.Module, density: float) -> None:
    for layer in _linears(model):
        _keep_largest_(layer, density)


def _keep_largest_(layer: nn.Linear, keep: float) -> None:
    w = layer.weight
    k = max(1, round(keep * w.numel()))
    threshold = w.abs().flatten().kthvalue(w.numel() - k + 1).values
    w.mul_(w.abs() >= threshold)


def mlp4096(depth: int = 3, width: int = 4096) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TorchCSRLinear(nn.Module):
    """Baseline: torch's own sparse CSR matmul (MKL on CPU, cuSPARSE on GPU)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.weight = layer.weight.detach().to_sparse_csr()
        self.bias = None if layer.bias is None else layer.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.mm(self.weight, x.reshape(-1, x.shape[-1]).t()).t()
        return y + self.bias if self.bias is not None else y


def torch_csr(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[TorchCSRLinear(m) if isinstance(m, nn.Linear) else m for m in model])


# --------------------------------------------------------------------------------- timing


def time_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None]
) -> dict[str, dict[str, float]]:
    """Median and 10th-percentile seconds per variant; variants run once per round, shuffled.

    On a loaded machine a run longer than a scheduler time slice is often preempted, which
    inflates the median of slow variants more than that of fast ones; the 10th percentile shows
    the uncontended time. Both are reported.
    """
    for fn in fns.values():
        for _ in range(3):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            start = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in samples.items():
        ts.sort()
        out[name] = {"median": statistics.median(ts), "p10": ts[len(ts) // 10]}
    return out


def _rounds(dense_s: float, quick: bool) -> int:
    budget = 0.5 if quick else 2.0  # seconds of dense time per case
    return int(min(2000, max(7, budget / max(dense_s, 1e-6))))


# ------------------------------------------------------------------------------------ main


def bench_case(
    name: str,
    model: nn.Sequential,
    density: float,
    batch: int,
    shape: tuple[int, ...],
    device: str,
    quick: bool,
) -> dict:
    model = model.eval().to(device)
    x = torch.randn(batch, *shape, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    planned = tc.compile(
        model.cpu(), CompileConfig(device=device, batch_size=batch), example_input=x.cpu()
    )
    tuned = tc.compile(
        model.cpu(),
        CompileConfig(device=device, batch_size=batch, tune=True, tune_reps=7 if quick else 15),
        example_input=x.cpu(),
    )
    model = model.to(device)
    baseline = torch_csr(model)
    variants = {"dense": model, "compiled": planned, "compiled_tuned": tuned, "torch_csr": baseline}
    with torch.no_grad():
        ref = model(x)
        for v in variants.values():
            torch.testing.assert_close(v(x), ref, rtol=1e-4, atol=1e-4)
        probe = time_interleaved({"dense": lambda: model(x)}, 3, sync)["dense"]["median"]
        times = time_interleaved(
            {k: (lambda m=m: m(x)) for k, m in variants.items()}, _rounds(probe, quick), sync
        )
    med = {k: t["median"] for k, t in times.items()}
    p10 = {k: t["p10"] for k, t in times.items()}
    return {
        "model": name,
        "density": round(density, 4),
        "batch": batch,
        "median_us": {k: round(t * 1e6, 2) for k, t in med.items()},
        "p10_us": {k: round(t * 1e6, 2) for k, t in p10.items()},
        "speedup_vs_dense": {k: round(med["dense"] / t, 3) for k, t in med.items()},
        "speedup_vs_dense_p10": {k: round(p10["dense"] / t, 3) for k, t in p10.items()},
        "plan": [lp.format for lp in plan_of(planned).layers],
        "plan_tuned": [lp.format for lp in plan_of(tuned).layers],
        "layer_shapes": [list(lp.shape) for lp in plan_of(planned).layers],
    }


def environment(device: str) -> dict:
    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "dtype": "float32",
        "torch": torch.__version__,
        "ticketc": ticketc.__version__,
        "commit": _commit(),
        "python": platform.python_version(),
        "mkl": torch.backends.mkl.is_available(),
        "load_average_at_start": list(os.getloadavg()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _commit() -> str | None:
    """The git commit measured (with "+dirty" if the tree has changes), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        run = partial(subprocess.run, cwd=root, capture_output=True, text=True, check=True)
        head = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def cases(quick: bool) -> list[tuple[str, Callable[[], nn.Sequential], float, tuple[int, ...]]]:
    out = []
    ticket = Path(__file__).resolve().parents[1] / "examples" / "lenet300-ticket.pt"
    for d in LENET_DENSITIES[::2] if quick else LENET_DENSITIES:
        out.append(
            ("lenet300", lambda d=d: _pruned(lenet300(), prune_layerwise_, d), d, (1, 28, 28))
        )
    if ticket.is_file():
        from ticketc.checkpoint import load_ticket

        t = load_ticket(ticket)
        total = sum(m.numel() for m in t.masks.values())
        d = sum(int(m.sum()) for m in t.masks.values()) / total
        out.append(("lenet300-ticket", t.build, d, (1, 28, 28)))
    for d in MLP_DENSITIES[::2] if quick else MLP_DENSITIES:
        out.append(("mlp4096x3", lambda d=d: _pruned(mlp4096(), prune_uniform_, d), d, (4096,)))
    return out


def _pruned(model: nn.Sequential, prune: Callable[[nn.Module, float], None], d: float):
    torch.manual_seed(0)
    prune(model, d)
    return model


def write_markdown(results: dict, path: Path) -> None:
    env = results["environment"]
    lines = [
        "# End-to-end: dense vs ticketc-compiled vs torch CSR",
        "",
        f"Device: {env['device']} ({env['device_name']}, {env['cpu_threads']} threads), "
        f"dtype {env['dtype']}, torch {env['torch']}, triton {env['triton']}. Median time per "
        "forward pass; speedup = dense time / variant time (> 1 is faster than dense). "
        "`compiled` uses the cost-model plan, `compiled_tuned` times candidates on the device "
        "(`--tune`). Baseline: the same model dense (torch.nn.Linear, MKL). Each cell: speedup "
        "from medians, then from 10th percentiles in parentheses (the machine is shared: "
        f"load average {env['load_average_at_start'][0]:.1f} at start, "
        f"{env.get('load_average_at_end', [float('nan')])[0]:.1f} at end, on "
        f"{os.cpu_count()} cores; preemption inflates long runs, so the p10 figure is the "
        "uncontended one).",
        "",
        "| model | density | batch | dense us (median / p10) | compiled | compiled (tuned) "
        "| torch CSR | plan (tuned) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["cases"]:
        s, q = r["speedup_vs_dense"], r["speedup_vs_dense_p10"]
        cells = " | ".join(
            f"{s[k]:.2f}x ({q[k]:.2f}x)" for k in ("compiled", "compiled_tuned", "torch_csr")
        )
        lines.append(
            f"| {r['model']} | {r['density']:.1%} | {r['batch']} "
            f"| {r['median_us']['dense']:.0f} / {r['p10_us']['dense']:.0f} | {cells} "
            f"| {'/'.join(r['plan'])} ({'/'.join(r['plan_tuned'])}) |"
        )
    slow = [
        r
        for r in results["cases"]
        if min(r["speedup_vs_dense"]["compiled"], r["speedup_vs_dense_p10"]["compiled"]) < 1.0
    ]
    listed = ", ".join(
        f"{r['model']} {r['density']:.1%} b{r['batch']}: {r['speedup_vs_dense']['compiled']:.2f}x "
        f"({r['speedup_vs_dense_p10']['compiled']:.2f}x)"
        for r in slow
    )
    same = [r for r in slow if set(r["plan"]) == {"dense"}]
    lines += [
        "",
        f"Cases where the planned model measured slower than dense (by median or p10): "
        f"{len(slow)} of {len(results['cases'])}" + (f": {listed}." if slow else "."),
        f"Of these, {len(same)} have an all-dense plan: the compiled model then runs the very "
        "same modules as dense (after dead-unit elimination, which only removes work), so "
        "the difference is timing noise on the shared machine.",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results["cases"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in results["cases"] if r["model"] == model]
        for i, batch in enumerate(BATCHES):
            sel = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["density"])
            if not sel:
                continue
            d = [r["density"] * 100 for r in sel]
            color = f"C{i}"
            ax.plot(
                d,
                [r["speedup_vs_dense"]["compiled"] for r in sel],
                "o-",
                color=color,
                label=f"compiled, batch {batch}",
            )
            ax.plot(
                d,
                [r["speedup_vs_dense"]["torch_csr"] for r in sel],
                "x--",
                color=color,
                alpha=0.6,
                label=f"torch CSR, batch {batch}",
            )
        ax.axhline(1.0, color="gray", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (%)")
        ax.set_ylabel("speedup vs dense")
        ax.set_title(f"{model} ({results['environment']['device']}, fp32)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--report-only",
        metavar="RESULTS.json",
        help="rewrite the markdown and PNG from an earlier run's JSON, without measuring",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds")
    parser.add_argument("--models", default="lenet300,lenet300-ticket,mlp4096x3",
                        help="comma-separated subset of the models to measure")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--suffix", default="", help="appended to the output files' stem")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine single-threaded timings stay "
        "stable; planning uses the same count)",
    )
    args = parser.parse_args()
    if args.report_only:
        src = Path(args.report_only)
        old = json.loads(src.read_text())
        write_markdown(old, src.with_suffix(".md"))
        plot(old, src.with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    random.seed(0)
    started = time.time()
    results = {"environment": environment(args.device), "cases": []}
    wanted = set(args.models.split(","))
    for name, make, density, shape in cases(args.quick):
        if name not in wanted:
            continue
        model = make()
        for batch in BATCHES:
            r = bench_case(name, model, density, batch, shape, args.device, args.quick)
            results["cases"].append(r)
            print(
                f"{name:16s} d={density:6.2%} b={batch:4d} dense {r['median_us']['dense']:9.1f}us "
                + " ".join(
                    f"{k} {v:.2f}x" for k, v in r["speedup_vs_dense"].items() if k != "dense"
                )
                + f"  plan {'/'.join(r['plan'])} tuned {'/'.join(r['plan_tuned'])}",
                flush=True,
            )
    results["seconds"] = round(time.time() - started, 1)
    results["environment"]["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = f"_{args.threads}threads" if args.device == "cpu" and args.threads != 1 else ""
    stem = out / f"e2e_{args.device}{threads}{args.suffix}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, stem.with_suffix(".md"))
    plot(results, stem.with_suffix(".png"))
    print(f"wrote {stem}.json/.md/.png in {results['seconds']} s")


if __name__ == "__main__":
    main()
