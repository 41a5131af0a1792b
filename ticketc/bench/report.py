"""What `ticketc bench` shows: a terminal table with a verdict per batch size
(`ticketc.bench.result.verdicts`), a PNG that reads without the table, and the JSON of
everything measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ticketc.bench import runtimes as rt
from ticketc.bench.result import BenchResult

MARKERS = {rt.TORCH_DENSE: "s", rt.COMPILED: "o", rt.PT2: "D", rt.ORT: "^", rt.TORCH_CSR: "x"}


def table_rows(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per runtime, one column per batch size; a cell holds the
    median time and the speed-up against torch dense, or why it was not timed."""
    header = ["runtime", *[f"batch {b}" for b in result.batch_sizes], "note"]
    rows = []
    for name in rt.RUNTIMES:
        cells = [result.cell(name, b) for b in result.batch_sizes]
        texts = []
        for c in cells:
            if c.median_us is None:
                texts.append(f"n/a: {c.why}")
            else:
                texts.append(f"{_us(c.median_us)}  {c.speedup:.2f}x")
            if name == rt.COMPILED and c.note:
                texts[-1] += f"\nplan: {c.note}"  # the plan depends on the batch size
        notes = sorted({c.note for c in cells if c.note and name != rt.COMPILED})
        rows.append([name, *texts, "; ".join(notes)])
    return header, rows


def _us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def print_report(result: BenchResult, console: Any) -> None:
    from rich.table import Table

    env = result.environment
    console.print(
        f"[bold]{result.model}[/bold]: {result.params:,} parameters, "
        f"{result.density:.1%} of prunable weights nonzero; {result.device} "
        f"({env.get('cpu_model')}), {result.threads} thread(s), fp32, load average "
        f"{env.get('load_average')}"
    )
    header, rows = table_rows(result)
    table = Table(title="median time per call, speed-up vs torch dense (paired rounds)")
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    if result.sizes:
        sizes = Table(title="bytes on disk")
        for h in ("artifact", "bytes", "vs dense ONNX"):
            sizes.add_column(h)
        base = result.sizes[0].bytes
        for s in result.sizes:
            if s.bytes is None:
                sizes.add_row(s.name, f"n/a: {s.why}", "")
            else:
                ratio = f"{base / s.bytes:.1f}x smaller" if base and s.bytes else ""
                ratio = "(baseline)" if s is result.sizes[0] else ratio
                sizes.add_row(s.name, f"{s.bytes:,}", ratio)
        console.print(sizes)
    for v in result.verdicts:
        console.print(v)


def plot(result: BenchResult, path: Path) -> None:
    """Left: speed-up against torch dense per runtime over batch size (1.0x marked, runtimes
    that could not run listed with the reason). Right: bytes on disk per artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = [s for s in result.sizes if s.bytes]
    if sized:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(8, 5))
    missing = []
    for name in rt.RUNTIMES:
        pts = [(c.batch, c.speedup) for c in result.cells if c.runtime == name and c.speedup]
        if pts:
            xs, ys = zip(*pts, strict=True)
            line = ax.plot(
                xs, ys, marker=MARKERS[name], label=name, lw=2 if "ticketc" in name else 1
            )
            for x, y in pts if name != rt.TORCH_DENSE else []:
                ax.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(4, 3),
                            fontsize=7, color=line[0].get_color())  # fmt: skip
        gaps = [c for c in result.cells if c.runtime == name and c.speedup is None]
        if gaps:
            batches = ",".join(str(c.batch) for c in gaps)
            missing.append(f"{name} (batch {batches}): {gaps[0].why}"[:110])
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.annotate("1.0x = torch dense", (0.99, 1.0), xycoords=("axes fraction", "data"),
                va="bottom", ha="right", fontsize=8)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    low, high = ax.get_ylim()
    nice = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20, 30, 50, 100, 200, 500]
    if high / low < 4:  # a narrow range: steps of 0.1x
        nice = [round(0.1 * i, 1) for i in range(1, 41)]
    ticks = [t for t in nice if low <= t <= high] or [1]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(result.batch_sizes, [str(b) for b in result.batch_sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("speed-up vs torch dense (higher is faster)")
    env = result.environment
    ax.set_title(
        f"{result.model}: {result.density:.1%} nonzero, {result.device} "
        f"{result.threads} thread(s), fp32", fontsize=10,
    )  # fmt: skip
    ax.legend(fontsize=8)
    if missing:
        ax.text(0.01, -0.2, "not timed: " + "\n".join(missing), transform=ax.transAxes,
                fontsize=7, va="top")  # fmt: skip
    if sized:
        names = [s.name for s in sized]
        mb = [s.bytes / 1e6 for s in sized]  # type: ignore[operator]
        bars = bx.barh(names, mb, color=["gray"] + ["C0"] * (len(sized) - 1))
        base = sized[0].bytes
        for bar, s in zip(bars, sized, strict=True):
            bx.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {s.bytes / 1e6:.2f} MB ({base / s.bytes:.1f}x)", va="center",  # type: ignore[operator]
                    fontsize=8)  # fmt: skip
        bx.invert_yaxis()
        bx.set_xlabel("MB on disk (x: smaller than the dense ONNX export)")
        bx.set_xlim(0, max(mb) * 1.6)
        bx.set_title("size", fontsize=10)
        absent = [f"{s.name}: {s.why}" for s in result.sizes if not s.bytes]
        if absent:
            bx.text(0.0, -0.2, "not measured: " + "\n".join(absent), transform=bx.transAxes,
                    fontsize=7, va="top")  # fmt: skip
    fig.text(0.01, 0.01, f"{env.get('cpu_model')}, torch {env.get('torch')}, "
             f"load average {env.get('load_average')}", fontsize=7)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write(result: BenchResult, out: Path) -> list[Path]:
    """Write bench.json and bench.png into `out` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / "bench.json", out / "bench.png"
    js.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    plot(result, png)
    return [js, png]
