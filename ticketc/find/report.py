"""Summaries of one or more run directories (seeds): a table, JSON and the paper's plots.

Accuracy against % of weights remaining (ticket vs controls), early-stopping iteration against
% remaining, and the exported file size per level. With several run directories every number
is a mean ± std over them.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ticketc.errors import UserError
from ticketc.safe_load import read_json

METRICS = ("final_test_acc", "early_stop_test_acc", "early_stop_iteration")


@dataclass
class LevelSummary:
    """One pruning level across seeds: per member kind, per metric, the values of each seed."""

    level: int
    density: float
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    wall_s: list[float] = field(default_factory=list)
    export_bytes: int | None = None

    def stat(self, kind: str, metric: str) -> tuple[float, float, int]:
        """(mean, std, number of seeds); std is 0 for one seed, NaN when absent."""
        vals = self.values.get(kind, {}).get(metric, [])
        if not vals:
            return math.nan, math.nan, 0
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def collect(run_dirs: Sequence[str | Path]) -> list[LevelSummary]:
    """Read every finished level of every run directory."""
    levels: dict[int, LevelSummary] = {}
    for run_dir in map(Path, run_dirs):
        if not (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} is not a ticketc find run directory (no config.json)")
        for path in sorted(run_dir.glob("level_*/metrics.json")):
            m = read_json(path, "level metrics")
            try:
                row = levels.setdefault(m["level"], LevelSummary(m["level"], m["density"]))
                row.wall_s.append(m["wall_s"])
                for kind, member in m["members"].items():
                    per_kind = row.values.setdefault(kind, {})
                    for metric in METRICS:
                        per_kind.setdefault(metric, []).append(float(member[metric]))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise UserError(f"level metrics {path}: not as ticketc find writes them "
                                f"({type(e).__name__}: {e})") from e
    if not levels:
        raise UserError(f"no finished level in {', '.join(map(str, run_dirs))}")
    return [levels[k] for k in sorted(levels)]


def run_arch(run_dir: Path, user_arch: str | None = None) -> dict[str, Any]:
    """The run's arch.json; its architecture must be built in or be the user's --arch (a
    reference written in a file is never imported on its own: UserError naming --arch)."""
    from ticketc.factory import resolve_from_file

    path = Path(run_dir) / "arch.json"
    arch = read_json(path, "run architecture")
    if not isinstance(arch, dict) or "arch" not in arch:
        raise UserError(f"run architecture {path}: has no 'arch' entry")
    resolve_from_file(arch["arch"], str(path), user_arch)
    return arch


def export_size(level_dir: Path, user_arch: str | None = None) -> int | None:
    """Bytes of the portable fp32 ONNX export of a level's trained weights; None if it fails.

    The architecture is built as `run_arch` allows (built in, or the user's --arch)."""
    try:
        from ticketc.export import ExportConfig, export_model
        from ticketc.factory import build_model
        from ticketc.safe_load import load_tensor_dict

        arch = run_arch(level_dir.parent, user_arch)
        state = load_tensor_dict(level_dir / "final.pt", "run file")
        model = build_model(arch["arch"], arch.get("arch_kwargs", {}),
                            source=str(level_dir.parent / "arch.json"), user_arch=user_arch,
                            state_dict=state)
        model.load_state_dict(state)
        model.eval()
        shape = arch.get("input_shape")
        if not (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape)
                and math.prod(shape) <= 2**28):
            return None  # not a shape ticketc writes: nothing is allocated from it
        example = torch.zeros(1, *shape)
        with tempfile.TemporaryDirectory() as tmp:
            result = export_model(model, example, Path(tmp) / "model.onnx",
                                  ExportConfig(format="portable", values="fp32"))
            return int(result.total_bytes)
    except Exception:  # noqa: BLE001 - a size that cannot be measured is left out, not fatal
        return None


def table_markdown(rows: Sequence[LevelSummary]) -> str:
    kinds = sorted({k for r in rows for k in r.values}, key=lambda k: (k != "ticket", k))
    head = ["level", "% weights"]
    for k in kinds:
        head += [f"{k} test acc % (final)", f"{k} test acc % (early stop)", f"{k} early-stop it"]
    head += ["export bytes", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.level), f"{100 * r.density:.1f}"]
        for k in kinds:
            for metric, scale, fmt in (("final_test_acc", 100, ".2f"),
                                       ("early_stop_test_acc", 100, ".2f"),
                                       ("early_stop_iteration", 1, ".0f")):
                mean, std, n = r.stat(k, metric)
                cells.append("" if n == 0 else (f"{scale * mean:{fmt}}" + (
                    f" ± {scale * std:{fmt}}" if n > 1 else "")))
        cells.append("" if r.export_bytes is None else str(r.export_bytes))
        cells.append(f"{sum(r.wall_s) / max(len(r.wall_s), 1):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(rows: Sequence[LevelSummary]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        entry: dict[str, Any] = {"level": r.level, "density": r.density,
                                 "export_bytes": r.export_bytes, "wall_s": r.wall_s}
        for kind in r.values:
            entry[kind] = {}
            for metric in METRICS:
                mean, std, n = r.stat(kind, metric)
                entry[kind][metric] = {"mean": mean, "std": std, "n": n,
                                       "values": r.values[kind][metric]}
        out.append(entry)
    return out


def _percent_axis(ax: Any, xs: Sequence[float]) -> None:
    """Log x axis of % remaining, decreasing to the right, with plain-number ticks."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ticks = [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1)
             if min(xs) * 0.8 <= t <= max(xs) * 1.25]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.invert_xaxis()


def plot(rows: Sequence[LevelSummary], out_dir: Path, title: str = "") -> list[Path]:
    """PNG plots like the paper's: x = % of weights remaining on a log axis, decreasing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    kinds = sorted({k for r in rows for k in r.values}, key=lambda k: (k != "ticket", k))
    for metric, ylabel, name in (
        ("early_stop_test_acc", "test accuracy at early stopping (%)", "accuracy.png"),
        ("final_test_acc", "test accuracy at end of training (%)", "accuracy_final.png"),
        ("early_stop_iteration", "early-stopping iteration", "early_stop.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind in kinds:
            pts = [(100 * r.density, *r.stat(kind, metric)[:2]) for r in rows
                   if r.stat(kind, metric)[2]]
            if kind != "ticket" and rows and rows[0].stat("ticket", metric)[2]:
                # Controls are not trained at 100%: the dense network is their common start.
                dense = rows[0]
                if dense.level == 0 and not dense.stat(kind, metric)[2]:
                    pts.insert(0, (100 * dense.density, *dense.stat("ticket", metric)[:2]))
            if not pts:
                continue
            scale = 100 if metric != "early_stop_iteration" else 1
            xs = [p[0] for p in pts]
            ys = [scale * p[1] for p in pts]
            es = [scale * p[2] for p in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=kind)
        _percent_axis(ax, [100 * r.density for r in rows])
        ax.set_xlabel("% of weights remaining")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        paths.append(out_dir / name)
    sized = [(100 * r.density, r.export_bytes / 1024) for r in rows if r.export_bytes is not None]
    if sized:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([s[0] for s in sized], [s[1] for s in sized], marker="o",
                label="portable ONNX, fp32 values")
        ax.set_yscale("log")
        _percent_axis(ax, [p[0] for p in sized])
        ax.set_xlabel("% of weights remaining")
        ax.set_ylabel("exported size (KiB, all files)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "export_size.png", dpi=120)
        plt.close(fig)
        paths.append(out_dir / "export_size.png")
    return paths


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, *, export: bool = True,
    arch: str | None = None,
) -> tuple[list[LevelSummary], list[Path]]:
    """Collect, export each level of the first run (sizes), write report.md/json and PNGs.

    `arch`: the user's --arch, needed to export the levels of a run whose architecture is not
    built into ticketc (UserError otherwise, before anything is written)."""
    rows = collect(run_dirs)
    if export:
        run_arch(Path(run_dirs[0]), arch)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create report directory {out}: {e.strerror}") from e
    if export:
        first = Path(run_dirs[0])
        for r in rows:
            r.export_bytes = export_size(first / f"level_{r.level:02d}", arch)
    (out / "report.json").write_text(json.dumps(to_json(rows), indent=1))
    paths = plot(rows, out)
    seeds = f"{len(run_dirs)} run(s): " + ", ".join(map(str, run_dirs))
    md = f"# ticketc find report\n\n{seeds}; mean ± std over runs.\n\n" + table_markdown(rows)
    md += "\n" + " ".join(f"![{p.stem}]({p.name})" for p in paths) + "\n"
    (out / "report.md").write_text(md)
    return rows, [out / "report.md", out / "report.json", *paths]
