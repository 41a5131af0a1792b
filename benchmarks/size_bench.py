"""Size benchmark: bytes on disk of every export format and value type against dense.

For Lenet-300-100 and Conv-2, magnitude-pruned with the paper's layer-wise rates (fully
connected 20 % per round, conv 10 %, output 10 %) to 20 / 10 / 3.6 / 1.9 / 1 % of weights,
and for real tickets given with --ticket: every file of each artifact counted, ratios to the
dense fp32 export, gzip / xz of the dense file, the entropy bound of each encoding, export
and onnxruntime session-creation times, and (for tickets) MNIST test accuracy through
onnxruntime. Writes JSON, a markdown table and a PNG plot under benchmarks/results/.

    python benchmarks/size_bench.py [--ticket RUN/ticket.pt ...] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import platform
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

import ticketc
from ticketc.compile.measure import TimingConfig, commit, time_one
from ticketc.export import ExportConfig, export_model
from ticketc.export.trace import quiet
from ticketc.models import conv2, example_input, lenet300

PRUNABLE = (nn.Linear, nn.Conv2d)
RESULTS = Path(__file__).parent / "results"
DENSITIES = (0.20, 0.10, 0.036, 0.019, 0.01)
VALUES = ("fp32", "fp16", "int8", "int4")
GOALS = {"fp32": 15, "fp16": 25, "int8": 45, "int4": 60}  # x smaller than dense fp32, Lenet @ 3.6 %


def layer_rates(model: nn.Module) -> dict[str, float]:
    """Per-round pruning rate of each prunable weight: conv 10 %, fc 20 %, output layer 10 %."""
    layers = [(f"{n}.weight", m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    rates = {name: 0.1 if isinstance(m, nn.Conv2d) else 0.2 for name, m in layers}
    rates[layers[-1][0]] = 0.1
    return rates


@torch.no_grad()
def prune_to_(model: nn.Module, density: float) -> None:
    """Magnitude-prune each layer to its density after r rounds of the paper's schedule, with the
    (fractional) round count r chosen so that the whole model keeps `density` of its weights."""
    params = dict(model.named_parameters())
    rates = layer_rates(model)
    numel = {n: params[n].numel() for n in rates}

    def overall(r: float) -> float:
        return sum(numel[n] * (1 - rates[n]) ** r for n in rates) / sum(numel.values())

    lo, hi = 0.0, 200.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if overall(mid) > density else (lo, mid)
    for name, rate in rates.items():
        w = params[name]
        keep = max(1, round(w.numel() * (1 - rate) ** hi))
        threshold = w.abs().flatten().kthvalue(w.numel() - keep + 1).values
        w.mul_(w.abs() >= threshold)


def files_bytes(result) -> int:
    return sum(f.stat().st_size for f in result.files)


def dense_fp16_bytes(model: nn.Module, x: torch.Tensor, work: Path) -> int:
    """The dense export of the model cast to fp16 (every file)."""
    config = ExportConfig(format="dense", dtype="fp16", verify=False)
    return files_bytes(export_model(model, x, work / "dense16.onnx", config))


def median_seconds(fn, repeat: int) -> float:
    """Median seconds per call over `repeat` calls after one warm-up (ticketc's timing loop)."""
    config = TimingConfig(budget_s=0.0, min_rounds=repeat, max_rounds=repeat, warmup=1)
    return time_one(fn, config).median


def measure(model: nn.Module, x: torch.Tensor, work: Path, label: str) -> dict[str, object]:
    row: dict[str, object] = {"model": label}
    nnz = sum(
        int(p.count_nonzero()) for n, p in model.named_parameters() if n in layer_rates(model)
    )
    numel = sum(p.numel() for n, p in model.named_parameters() if n in layer_rates(model))
    row["density"] = nnz / numel
    dense = export_model(model, x, work / "dense.onnx", ExportConfig(format="dense", verify=False))
    dense_bytes = files_bytes(dense)
    data = b"".join(f.read_bytes() for f in dense.files)
    row["bytes"] = {
        "dense fp32": dense_bytes,
        "dense fp16": dense_fp16_bytes(model, x, work),
        "dense gzip -9": len(gzip.compress(data, 9)),
        "dense xz -9": len(lzma.compress(data, preset=9)),
    }
    si = export_model(model, x, work / "si.onnx", ExportConfig(format="sparse-initializer"))
    row["bytes"]["sparse-initializer fp32"] = files_bytes(si)
    row["bound"], row["payload"], row["max_rel_error"] = {}, {}, {}
    for values in VALUES:
        result = export_model(model, x, work / f"p-{values}.onnx", ExportConfig(values=values))
        key = f"portable {values}"
        row["bytes"][key] = files_bytes(result)
        # the entropy bound of every float initializer of the graph for this value type
        row["bound"][key] = result.bound_bytes + (
            files_bytes(result) - sum(layer.nbytes for layer in result.layers)
        )
        row["payload"][key] = sum(layer.nbytes for layer in result.layers)
        assert result.verification is not None
        row["max_rel_error"][key] = result.verification.max_rel
    row["ratio"] = {k: dense_bytes / v for k, v in row["bytes"].items()}
    row["over_bound"] = {k: row["bytes"][k] / b for k, b in row["bound"].items()}
    return row


def timings(model: nn.Module, x: torch.Tensor, work: Path, repeat: int) -> dict[str, float]:
    """Export time vs torch's own dense export; session creation portable vs dense."""

    def torch_export() -> None:
        with quiet():
            torch.onnx.export(
                model,
                (x,),
                str(work / "torch.onnx"),
                dynamo=True,
                verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )

    def ticketc_export(values: str) -> None:
        export_model(model, x, work / f"t-{values}.onnx", ExportConfig(values=values, verify=False))

    out = {"torch dense export s": median_seconds(torch_export, repeat)}
    for values in ("fp32", "int4"):
        out[f"ticketc portable {values} export s"] = median_seconds(
            lambda v=values: ticketc_export(v), repeat
        )
    export_model(model, x, work / "d.onnx", ExportConfig(format="dense", verify=False))
    for name, path in (
        ("dense", "d.onnx"),
        ("portable fp32", "t-fp32.onnx"),
        ("portable int4", "t-int4.onnx"),
    ):
        out[f"session {name} s"] = median_seconds(
            lambda p=path: ort.InferenceSession(str(work / p), providers=["CPUExecutionProvider"]),
            repeat * 2,
        )
    return out


def accuracy(path: Path, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x, y = data
    correct = 0
    for start in range(0, len(y), 2000):
        logits = session.run(None, {name: x[start : start + 2000].numpy()})[0]
        correct += int((logits.argmax(1) == y[start : start + 2000].numpy()).sum())
    return correct / len(y)


def real_tickets(paths: list[str], runs: list[str]) -> list[tuple[str, nn.Module]]:
    """(label, masked model) for ticket checkpoints and for every level of `ticketc find` runs."""
    from ticketc.factory import resolve
    from ticketc.load import load_model
    from ticketc.masks import apply_masks_

    models = [(f"ticket {path}", load_model(path).model) for path in paths]
    for run in map(Path, runs):
        arch = json.loads((run / "arch.json").read_text())
        for level in sorted(run.glob("level_*")):
            model = resolve(arch["arch"])(**arch["arch_kwargs"]).eval()
            model.load_state_dict(torch.load(level / "final.pt", weights_only=True))
            apply_masks_(model, torch.load(level / "mask.pt", weights_only=True))
            models.append((f"{run.name}/{level.name}", model))
    return models


def ticket_rows(
    tickets: list[tuple[str, nn.Module]], data_dir: str | None, work: Path
) -> list[dict[str, object]]:
    """measure() plus MNIST test accuracy in torch and, for every value type, in onnxruntime."""
    from ticketc.data.mnist import load_mnist

    _, test = load_mnist(data_dir, download=False)
    rows = []
    for label, model in tickets:
        row = measure(model, example_input("lenet300"), work, label)
        with torch.no_grad():
            row["torch_accuracy"] = float((model(test.x).argmax(1) == test.y).float().mean())
        row["onnx_accuracy"] = {
            f"portable {v}": accuracy(work / f"p-{v}.onnx", (test.x, test.y)) for v in VALUES
        }
        print(
            f"{label}: {row['density']:.2%}, torch acc {row['torch_accuracy']:.2%}, "
            + ", ".join(
                f"{k} {a:.2%} ({row['ratio'][k]:.0f}x)" for k, a in row["onnx_accuracy"].items()
            ),
            flush=True,
        )
        rows.append(row)
    return rows


def markdown(report: dict[str, object]) -> str:
    rows = report["rows"]
    keys = list(rows[0]["bytes"])
    lines = [
        "# Size benchmark",
        "",
        f"ticketc {report['ticketc']}, torch {report['torch']}, onnx {report['onnx']}, onnxruntime "
        f"{report['onnxruntime']}, {report['machine']}, commit {report.get('commit')}. Bytes on "
        "disk, every file of the artifact; "
        "ratio = dense fp32 file / this file. Bound = entropy bound of the encoding (mask entropy "
        "H(d) per weight + value bits per nonzero + side info + other parameters), no graph.",
        "",
        "| model | density | " + " | ".join(keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]
    for r in rows:
        cells = [f"{r['bytes'][k]:,} ({r['ratio'][k]:.1f}x)" for k in keys]
        lines.append(f"| {r['model']} | {r['density']:.2%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bytes over the encoding's entropy bound (1.00 = at the bound):",
        "",
        "| model | density | " + " | ".join(VALUES) + " | max rel. output error (fp16/int8/int4) |",
        "|---|---:|" + "---:|" * (len(VALUES) + 1),
    ]
    for r in rows:
        over = " | ".join(f"{r['over_bound'][f'portable {v}']:.2f}" for v in VALUES)
        err = " / ".join(f"{r['max_rel_error'][f'portable {v}']:.1e}" for v in VALUES[1:])
        lines.append(f"| {r['model']} | {r['density']:.2%} | {over} | {err} |")
    goal_row = next(
        (r for r in rows if r["model"] == "lenet300" and abs(r["density"] - 0.036) < 0.002), None
    )
    if goal_row:
        lines += ["", "Goals, Lenet-300-100 at 3.6 %:", ""]
        for v, goal in GOALS.items():
            ratio = goal_row["ratio"][f"portable {v}"]
            over = goal_row["over_bound"][f"portable {v}"]
            met = "met" if ratio >= goal else "NOT met"
            near = "met" if over <= 1.25 else "NOT met"
            lines.append(
                f"- portable {v}: {ratio:.1f}x (goal >= {goal}x: {met}); "
                f"{over:.2f}x its bound (goal <= 1.25: {near})"
            )
    if report.get("timings"):
        t = report["timings"]
        lines += ["", "Speed, Lenet-300-100 at 3.6 %, medians on this CPU:", ""]
        lines += [f"- {k}: {v * 1000:.1f} ms" for k, v in t.items()]
        lines.append(
            f"- export time ratio portable fp32 / torch dense: "
            f"{t['ticketc portable fp32 export s'] / t['torch dense export s']:.2f} (goal <= 2)"
        )
        lines.append(
            f"- session creation ratio portable fp32 / dense: "
            f"{t['session portable fp32 s'] / t['session dense s']:.2f} (goal <= 3)"
        )
    tickets = [r for r in rows if "torch_accuracy" in r]
    if tickets:
        lines += [
            "",
            "Real tickets (MNIST test accuracy through onnxruntime):",
            "",
            "| ticket | density | torch acc. | "
            + " | ".join(f"{v} acc. (ratio)" for v in VALUES)
            + " |",
            "|---|---:|---:|" + "---:|" * len(VALUES),
        ]
        for r in tickets:
            cells = [
                f"{r['onnx_accuracy'][f'portable {v}']:.2%} ({r['ratio'][f'portable {v}']:.0f}x)"
                for v in VALUES
            ]
            lines.append(
                f"| {r['model']} | {r['density']:.2%} | {r['torch_accuracy']:.2%} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, model in zip(axes, ("lenet300", "conv2"), strict=True):
        rows = [r for r in report["rows"] if r["model"] == model]
        if not rows:
            continue
        d = [100 * r["density"] for r in rows]
        for key in rows[0]["ratio"]:
            if key == "dense fp32":
                continue
            ax.plot(d, [r["ratio"][key] for r in rows], marker="o", label=key)
        for v in VALUES:
            dense = [r["bytes"]["dense fp32"] for r in rows]
            ax.plot(
                d,
                [db / r["bound"][f"portable {v}"] for db, r in zip(dense, rows, strict=True)],
                linestyle=":",
                color="gray",
                linewidth=1,
            )
        ax.set(xscale="log", yscale="log", xlabel="% of weights remaining", title=model)
        ax.invert_xaxis()
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("x smaller than dense fp32 ONNX (dotted: entropy bounds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticket", action="append", default=[], help="Lenet ticket checkpoints")
    parser.add_argument("--run", action="append", default=[], help="ticketc find run dirs (Lenet)")
    parser.add_argument("--only-tickets", action="store_true", help="skip the synthetic sweep")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    parser.add_argument(
        "--data-dir",
        default=str(shared) if shared.is_dir() else None,
        help="MNIST directory, for the tickets' accuracy",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timing repetitions")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sweep = [] if args.only_tickets else [("lenet300", lenet300), ("conv2", conv2)]
        for label, factory in sweep:
            for density in DENSITIES:
                model = factory().eval()
                prune_to_(model, density)
                rows.append(measure(model, example_input(label), work, label))
                print(
                    f"{label} {density:.1%}: "
                    + ", ".join(f"{k} {v:.1f}x" for k, v in rows[-1]["ratio"].items()),
                    flush=True,
                )
        model = lenet300().eval()
        prune_to_(model, 0.036)
        timing = (
            {}
            if args.only_tickets
            else timings(model, example_input("lenet300"), work, args.repeat)
        )
        rows += ticket_rows(real_tickets(args.ticket, args.run), args.data_dir, work)
    report = {
        "ticketc": ticketc.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "commit": commit(),
        "rows": rows,
        "timings": timing,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "size.json").write_text(json.dumps(report, indent=2))
    (args.out / "size.md").write_text(markdown(report))
    plot(report, args.out / "size.png")
    print((args.out / "size.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
