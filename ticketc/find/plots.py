"""The paper's plots of a find report: x = % of weights remaining on a log axis, decreasing.

Accuracy against % remaining (ticket vs controls, the dense network as a baseline), the
early-stopping iteration, and the exported file size per level. matplotlib is imported on use.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ticketc.find.summary import Experiment, LevelSummary, has_controls, member_roles

LABELS = {
    "ticket": "ticket",
    "reinit": "control: same mask, new random weights",
    "random-mask": "control: random mask of the same layer densities",
}


def _level_axis(ax: Any, densities: Sequence[float]) -> None:
    """Log x axis of % of weights remaining, decreasing to the right, one labelled tick per
    level (rotated when there are many)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    # one decimal from 1% up, two significant digits below (0.14 and 0.11 stay apart)
    xs = sorted(
        {float(f"{100 * d:.2g}") if d < 0.01 else round(100 * d, 1) for d in densities},
        reverse=True,
    )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.set_xticklabels(
        [f"{x:g}" for x in xs],
        rotation=45 if len(xs) > 8 else 0,
        ha="right" if len(xs) > 8 else "center",
    )
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(max(xs) * 1.15, min(xs) / 1.15)  # reversed: sparser to the right
    ax.set_xlabel("% of prunable weights remaining (one tick per level)")


def _plain_log_y(ax: Any, lo: float, hi: float) -> None:
    """Log y axis with plain-number ticks at 1-2-5 steps (no 10^x or 9x10^2 labels)."""
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, NullLocator

    ax.set_yscale("log")
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    for steps in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 7)):  # finer when the range is narrow
        ticks = [m * 10**e for e in decades for m in steps]
        ticks = [t for t in ticks if lo / 1.3 <= t <= hi * 1.3]
        if len(ticks) >= 4:
            break
    else:  # less than a factor of ~2: evenly spaced round numbers
        ticks = [t for t in MaxNLocator(5).tick_values(lo, hi) if lo / 1.1 <= t <= hi * 1.1]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.set_yticklabels([f"{t:,.0f}" if t >= 1 else f"{t:g}" for t in ticks])
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _title(ax: Any, exp: Experiment | None, title: str, what: str) -> None:
    """The run name (or `title`) and what is plotted, over the experiment's settings."""
    head = title or (exp.name if exp is not None else "")
    sub = textwrap.fill(exp.describe(), 95) if exp is not None else ""
    ax.set_title(f"{head}: {what}" + (f"\n{sub}" if sub else ""), fontsize=9)


def _label(role: str, exp: Experiment | None, controls: bool) -> str:
    label = LABELS.get(role, role)
    if role == "ticket" and exp is not None:
        rewind = str(exp.config.rewind)
        label = (
            "ticket (survivors reset to their initial values)"
            if rewind == "init"
            else f"ticket (survivors rewound to {rewind.replace(':', ' ')})"
        )
    if role == "ticket" and not controls:
        label += "; no controls trained (find --controls)"
    return label


def metric_figure(
    rows: Sequence[LevelSummary],
    metric: str,
    ylabel: str,
    exp: Experiment | None = None,
    title: str = "",
) -> Any:
    """One metric against % remaining: ticket and controls (mean ± std over seeds), and the
    dense network's value as a dashed baseline. Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1 if metric == "early_stop_iteration" else 100
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    dense = rows[0] if rows and rows[0].level == 0 else None
    controls = has_controls(rows)
    for role in member_roles(rows):
        pts = [
            (100 * r.density, *r.stat(role, metric)[:2]) for r in rows if r.stat(role, metric)[2]
        ]
        if role != "ticket" and dense is not None and dense.stat("ticket", metric)[2]:
            # Controls are not trained at 100%: the dense network is their common start.
            pts.insert(0, (100 * dense.density, *dense.stat("ticket", metric)[:2]))
        if not pts:
            continue
        ax.errorbar(
            [p[0] for p in pts],
            [scale * p[1] for p in pts],
            yerr=[scale * p[2] for p in pts],
            marker="o",
            capsize=3,
            label=_label(role, exp, controls),
        )
    if dense is not None and dense.stat("ticket", metric)[2]:
        ax.axhline(
            scale * dense.stat("ticket", metric)[0],
            color="0.4",
            linestyle="--",
            linewidth=1,
            label="dense network (level 0)",
        )
    _level_axis(ax, [r.density for r in rows])
    ax.set_ylabel(ylabel)
    _title(ax, exp, title, ylabel.split(" (")[0])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def size_figure(
    rows: Sequence[LevelSummary],
    dense_bytes: int | None,
    exp: Experiment | None = None,
    title: str = "",
) -> Any:
    """Exported size (KiB, all files) per level on a log axis, with the dense ONNX export as a
    dashed baseline; None when no size was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = [(100 * r.density, r.export_bytes / 1024) for r in rows if r.export_bytes is not None]
    if not sized:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.plot(
        [s[0] for s in sized],
        [s[1] for s in sized],
        marker="o",
        label="portable ONNX, fp32 values (ticketc export)",
    )
    values = [s[1] for s in sized]
    if dense_bytes is not None:
        ax.axhline(
            dense_bytes / 1024,
            color="0.4",
            linestyle="--",
            linewidth=1,
            label=f"dense ONNX export ({dense_bytes / 1024:,.0f} KiB)",
        )
        values.append(dense_bytes / 1024)
    _plain_log_y(ax, min(values), max(values))
    _level_axis(ax, [s[0] / 100 for s in sized])
    ax.set_ylabel("exported size (KiB, all files)")
    _title(
        ax,
        exp,
        title,
        f"exported size of {exp.run_dirs[0].name}'s levels" if exp is not None else "exported size",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


PLOTS = (
    ("early_stop_test_acc", "test accuracy at the early-stopping iteration (%)", "accuracy.png"),
    ("final_test_acc", "test accuracy at the end of training (%)", "accuracy_final.png"),
    (
        "early_stop_iteration",
        "early-stopping iteration (minimum validation loss)",
        "early_stop.png",
    ),
)


def plot(
    rows: Sequence[LevelSummary],
    out_dir: Path,
    title: str = "",
    exp: Experiment | None = None,
    dense_bytes: int | None = None,
) -> list[Path]:
    """PNG plots like the paper's: x = % of weights remaining on a log axis, decreasing."""
    import matplotlib.pyplot as plt

    paths = []
    for metric, ylabel, name in PLOTS:
        fig = metric_figure(rows, metric, ylabel, exp, title)
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        paths.append(out_dir / name)
    fig = size_figure(rows, dense_bytes, exp, title)
    if fig is not None:
        fig.savefig(out_dir / "export_size.png", dpi=120)
        plt.close(fig)
        paths.append(out_dir / "export_size.png")
    return paths
