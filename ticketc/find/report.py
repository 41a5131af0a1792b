"""Summaries of one or more run directories (seeds): a table, JSON and the paper's plots.

Accuracy against % of weights remaining (ticket vs controls, with the dense network as a
baseline), early-stopping iteration against % remaining, and the exported file size per level.
Several run directories must be seeds of one experiment (same settings, same data): every
number is then a mean ± std over them; runs with different settings are refused, naming the
setting, since one mean over them would mix two experiments. The report goes to its own folder,
never into a run directory.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ticketc.errors import UserError
from ticketc.find.config import FindConfig
from ticketc.safe_load import read_json

METRICS = ("final_val_acc", "final_test_acc", "early_stop_test_acc", "early_stop_iteration")
# What report writes: removed from the output folder first, so no stale file survives.
OUTPUTS = ("report.md", "report.json", "accuracy.png", "accuracy_final.png", "early_stop.png",
           "export_size.png")
LABELS = {
    "ticket": "ticket",
    "reinit": "control: same mask, new random weights",
    "random-mask": "control: random mask of the same layer densities",
}
NO_CONTROLS = ("No controls were trained (find's --controls is off by default: they multiply the "
               "training time), so this shows the ticket alone: it cannot tell a winning ticket "
               "from any sparse network of the same size. Rerun find with --controls "
               "reinit,random-mask to compare.")


@dataclass
class LevelSummary:
    """One pruning level across seeds: per member role (ticket or control), per metric, the
    values of each seed."""

    level: int
    density: float
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    wall_s: list[float] = field(default_factory=list)
    export_bytes: int | None = None

    def stat(self, role: str, metric: str) -> tuple[float, float, int]:
        """(mean, std, number of seeds); std is 0 for one seed, NaN when absent."""
        vals = [v for v in self.values.get(role, {}).get(metric, []) if v == v]  # NaN: none
        if not vals:
            return math.nan, math.nan, 0
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


@dataclass(frozen=True)
class Experiment:
    """The run directories of one experiment and the settings they share."""

    run_dirs: list[Path]
    config: FindConfig
    seeds: list[int]

    @property
    def name(self) -> str:
        return ", ".join(p.name or str(p) for p in self.run_dirs)

    def describe(self) -> str:
        c = self.config
        rates = (f"global {c.global_rate:g}" if c.strategy == "global" else
                 f"fc {c.fc_rate:g} / conv {c.conv_rate:g} / output {c.output_rate:g}")
        return (f"{c.model} on {c.dataset or c.data}, {c.iterations} iterations per level, "
                f"pruning {rates} per round, rewind {c.rewind}, "
                f"{len(self.seeds)} seed{'s' if len(self.seeds) > 1 else ''}")


def _read_config(run_dir: Path) -> FindConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a ticketc find run directory (no config.json)")
    try:
        return FindConfig.from_json(read_json(path, "run configuration")).resolved()
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is not a readable find config: {e}") from None


def _data_md5(run_dir: Path) -> str | None:
    path = run_dir / "data.json"
    if not path.is_file():
        return None
    data = read_json(path, "run data description")
    if not isinstance(data, dict) or "md5" not in data:
        raise UserError(f"run data description {path}: has no 'md5' entry")
    return str(data["md5"])


def experiment(run_dirs: Sequence[str | Path]) -> Experiment:
    """The runs as one experiment; UserError when they are not seeds of the same one."""
    dirs = [Path(p) for p in run_dirs]
    configs = [_read_config(d) for d in dirs]
    first, md5 = configs[0], _data_md5(dirs[0])
    for d, c in zip(dirs[1:], configs[1:], strict=True):
        diff = first.result_differences(c, ignore=("seed",))
        if diff:
            shown = ", ".join(f"--{n.replace('_', '-')} ({dirs[0]}: {first.shown(n)}, {d}: "
                              f"{c.shown(n)})" for n in diff)
            raise UserError(f"the runs differ in settings that change results: {shown}; a mean "
                            "over them would mix two experiments: report each separately")
        other = _data_md5(d)
        if md5 is not None and other is not None and other != md5:
            raise UserError(f"{dirs[0]} and {d} were trained on different data (md5 {md5} vs "
                            f"{other}): report each separately")
    seeds = [c.seed for c in configs]
    for i, s in enumerate(seeds):
        if s in seeds[:i]:
            raise UserError(f"{dirs[seeds.index(s)]} and {dirs[i]} are both seed {s}: a mean over "
                            "them would count one run twice")
    return Experiment(dirs, first, seeds)


def collect(run_dirs: Sequence[str | Path]) -> list[LevelSummary]:
    """Read every finished level of every run directory (seeds of one experiment)."""
    exp = experiment(run_dirs)
    levels: dict[int, LevelSummary] = {}
    for run_dir in exp.run_dirs:
        for path in sorted(run_dir.glob("level_*/metrics.json")):
            m = read_json(path, "level metrics")
            try:
                row = levels.setdefault(m["level"], LevelSummary(m["level"], m["density"]))
                row.wall_s.append(m["wall_s"])
                for role, member in m["members"].items():
                    per_role = row.values.setdefault(role, {})
                    for metric in METRICS:
                        per_role.setdefault(metric, []).append(
                            float(member.get(metric, math.nan)))
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


def export_size(level_dir: Path, user_arch: str | None = None,
                format: str = "portable") -> int | None:
    """Bytes of the fp32 ONNX export (`format` portable or dense, all files) of a level's
    trained weights; None if it fails.

    The architecture is built as `run_arch` allows (built in, or the user's --arch)."""
    try:
        from ticketc.export import ExportConfig, export_model
        from ticketc.factory import build_trained
        from ticketc.safe_load import load_tensor_dict

        arch = run_arch(level_dir.parent, user_arch)
        state = load_tensor_dict(level_dir / "final.pt", "run file")
        model = build_trained(arch["arch"], arch.get("arch_kwargs", {}), state,
                              source=str(level_dir.parent / "arch.json"), user_arch=user_arch)
        model.eval()
        shape = arch.get("input_shape")
        if not (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape)
                and math.prod(shape) <= 2**28):
            return None  # not a shape ticketc writes: nothing is allocated from it
        example = torch.zeros(1, *shape)
        with tempfile.TemporaryDirectory() as tmp:
            result = export_model(model, example, Path(tmp) / "model.onnx",
                                  ExportConfig(format=format, values="fp32"))
            return int(result.total_bytes)
    except Exception:  # noqa: BLE001 - a size that cannot be measured is left out, not fatal
        return None


def member_roles(rows: Sequence[LevelSummary]) -> list[str]:
    """"ticket" first, then the controls, of every level."""
    return sorted({k for r in rows for k in r.values}, key=lambda k: (k != "ticket", k))


def has_controls(rows: Sequence[LevelSummary]) -> bool:
    return any(k != "ticket" for k in member_roles(rows))


# Each member's columns: header, metric; the terminal table (`table(..., short=True)`) leaves
# out the early-stop accuracy.
COLUMNS = (("val acc % (end)", "final_val_acc"), ("test acc % (end)", "final_test_acc"),
           ("test acc % (early stop)", "early_stop_test_acc"),
           ("early-stop it", "early_stop_iteration"))


def table(rows: Sequence[LevelSummary], *,
          short: bool = False) -> tuple[list[str], list[list[str]]]:
    """The per-level table: header and cells (mean, ± std over seeds). `short`: the columns a
    terminal shows (export size in KiB, no wall time); else every column (bytes)."""
    roles = member_roles(rows)
    columns = [c for c in COLUMNS if not (short and c[1] == "early_stop_test_acc")]
    head = ["level", "% weights"] + [f"{k} {name}" for k in roles for name, _ in columns]
    head += ["export KiB"] if short else ["export bytes", "wall s"]
    cells = []
    for r in rows:
        row = [str(r.level), f"{100 * r.density:.1f}"]
        row += [_stat_cell(r, k, metric) for k in roles for _, metric in columns]
        if short:
            row.append("" if r.export_bytes is None else f"{r.export_bytes / 1024:.1f}")
        else:
            row.append("" if r.export_bytes is None else str(r.export_bytes))
            row.append(f"{sum(r.wall_s) / max(len(r.wall_s), 1):.0f}")
        cells.append(row)
    return head, cells


def _stat_cell(r: LevelSummary, role: str, metric: str) -> str:
    mean, std, n = r.stat(role, metric)
    scale, fmt = (1, ".0f") if metric == "early_stop_iteration" else (100, ".2f")
    if n == 0:
        return ""
    return f"{scale * mean:{fmt}}" + (f" ± {scale * std:{fmt}}" if n > 1 else "")


def table_markdown(rows: Sequence[LevelSummary]) -> str:
    head, cells = table(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def to_json(rows: Sequence[LevelSummary]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        entry: dict[str, Any] = {"level": r.level, "density": r.density,
                                 "export_bytes": r.export_bytes, "wall_s": r.wall_s}
        for role in r.values:
            entry[role] = {}
            for metric in METRICS:
                mean, std, n = r.stat(role, metric)
                entry[role][metric] = {"mean": None if n == 0 else mean,
                                       "std": None if n == 0 else std, "n": n,
                                       "values": r.values[role].get(metric, [])}
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# Plots


def _level_axis(ax: Any, densities: Sequence[float]) -> None:
    """Log x axis of % of weights remaining, decreasing to the right, one labelled tick per
    level (rotated when there are many)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    # one decimal from 1% up, two significant digits below (0.14 and 0.11 stay apart)
    xs = sorted({float(f"{100 * d:.2g}") if d < 0.01 else round(100 * d, 1) for d in densities},
                reverse=True)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.set_xticklabels([f"{x:g}" for x in xs], rotation=45 if len(xs) > 8 else 0,
                       ha="right" if len(xs) > 8 else "center")
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
        ticks = [m * 10 ** e for e in decades for m in steps]
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
        label = ("ticket (survivors reset to their initial values)" if rewind == "init"
                 else f"ticket (survivors rewound to {rewind.replace(':', ' ')})")
    if role == "ticket" and not controls:
        label += "; no controls trained (find --controls)"
    return label


def metric_figure(rows: Sequence[LevelSummary], metric: str, ylabel: str,
                  exp: Experiment | None = None, title: str = "") -> Any:
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
        pts = [(100 * r.density, *r.stat(role, metric)[:2]) for r in rows
               if r.stat(role, metric)[2]]
        if role != "ticket" and dense is not None and dense.stat("ticket", metric)[2]:
            # Controls are not trained at 100%: the dense network is their common start.
            pts.insert(0, (100 * dense.density, *dense.stat("ticket", metric)[:2]))
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [scale * p[1] for p in pts],
                    yerr=[scale * p[2] for p in pts], marker="o", capsize=3,
                    label=_label(role, exp, controls))
    if dense is not None and dense.stat("ticket", metric)[2]:
        ax.axhline(scale * dense.stat("ticket", metric)[0], color="0.4", linestyle="--",
                   linewidth=1, label="dense network (level 0)")
    _level_axis(ax, [r.density for r in rows])
    ax.set_ylabel(ylabel)
    _title(ax, exp, title, ylabel.split(" (")[0])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def size_figure(rows: Sequence[LevelSummary], dense_bytes: int | None,
                exp: Experiment | None = None, title: str = "") -> Any:
    """Exported size (KiB, all files) per level on a log axis, with the dense ONNX export as a
    dashed baseline; None when no size was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = [(100 * r.density, r.export_bytes / 1024) for r in rows if r.export_bytes is not None]
    if not sized:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.plot([s[0] for s in sized], [s[1] for s in sized], marker="o",
            label="portable ONNX, fp32 values (ticketc export)")
    values = [s[1] for s in sized]
    if dense_bytes is not None:
        ax.axhline(dense_bytes / 1024, color="0.4", linestyle="--", linewidth=1,
                   label=f"dense ONNX export ({dense_bytes / 1024:,.0f} KiB)")
        values.append(dense_bytes / 1024)
    _plain_log_y(ax, min(values), max(values))
    _level_axis(ax, [s[0] / 100 for s in sized])
    ax.set_ylabel("exported size (KiB, all files)")
    _title(ax, exp, title, f"exported size of {exp.run_dirs[0].name}'s levels" if exp is not None
           else "exported size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


PLOTS = (
    ("early_stop_test_acc", "test accuracy at the early-stopping iteration (%)", "accuracy.png"),
    ("final_test_acc", "test accuracy at the end of training (%)", "accuracy_final.png"),
    ("early_stop_iteration", "early-stopping iteration (minimum validation loss)",
     "early_stop.png"),
)


def plot(rows: Sequence[LevelSummary], out_dir: Path, title: str = "",
         exp: Experiment | None = None, dense_bytes: int | None = None) -> list[Path]:
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


# ---------------------------------------------------------------------------------------------
# The report


def _refuse_inside_runs(out: Path, run_dirs: Sequence[Path]) -> None:
    for run_dir in run_dirs:
        if out.resolve().is_relative_to(run_dir.resolve()):
            raise UserError(f"--out {out} is inside the run directory {run_dir}: write the report "
                            "to a folder of its own")


def _prepare_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create report directory {out}: {e.strerror}") from e
    for name in OUTPUTS:  # a previous report's files, e.g. a size plot this one will not draw
        (out / name).unlink(missing_ok=True)


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, *, export: bool = True,
    arch: str | None = None,
) -> tuple[list[LevelSummary], list[Path]]:
    """Collect the runs (seeds of one experiment), export each level of the first run (sizes),
    write report.md, report.json and the PNGs into `out_dir` (its own folder: never inside a
    run directory; a previous report's files there are replaced).

    `arch`: the user's --arch, needed to export the levels of a run whose architecture is not
    built into ticketc (UserError otherwise, before anything is written)."""
    exp = experiment(run_dirs)
    rows = collect(run_dirs)
    out = Path(out_dir)
    _refuse_inside_runs(out, exp.run_dirs)
    if export:
        run_arch(exp.run_dirs[0], arch)
    _prepare_out_dir(out)
    dense_bytes = None
    if export:
        first = exp.run_dirs[0]
        for r in rows:
            r.export_bytes = export_size(first / f"level_{r.level:02d}", arch)
        if rows[0].level == 0:
            dense_bytes = export_size(first / "level_00", arch, format="dense")
    (out / "report.json").write_text(json.dumps(
        {"runs": [str(p) for p in exp.run_dirs], "seeds": exp.seeds,
         "settings": exp.config.to_json(), "dense_export_bytes": dense_bytes,
         "levels": to_json(rows)}, indent=1))
    paths = plot(rows, out, exp=exp, dense_bytes=dense_bytes)
    md = [f"# ticketc find report: {exp.name}", "",
          f"{exp.describe()}. Runs: {', '.join(map(str, exp.run_dirs))}"
          + ("; every number is the mean ± std over them." if len(exp.run_dirs) > 1 else "."),
          "", "Accuracies are measured in eval mode on the saved weights of each level: "
          "\"val\" on the validation split the ticket is chosen on, \"test\" on the test split; "
          "\"end\" after the level's last iteration, \"early stop\" at the iteration of minimum "
          "validation loss.", ""]
    if not has_controls(rows):
        md += [NO_CONTROLS, ""]
    md.append(table_markdown(rows))
    md.append(" ".join(f"![{p.stem}]({p.name})" for p in paths))
    (out / "report.md").write_text("\n".join(md) + "\n")
    return rows, [out / "report.md", out / "report.json", *paths]
