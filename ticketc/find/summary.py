"""What a find report summarises: the runs as one experiment, each level's metrics over seeds,
and the per-level table (markdown file and terminal alike)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ticketc.errors import UserError
from ticketc.find.config import FindConfig
from ticketc.safe_load import read_json

METRICS = ("final_val_acc", "final_test_acc", "early_stop_test_acc", "early_stop_iteration")


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
        rates = (
            f"global {c.global_rate:g}"
            if c.strategy == "global"
            else f"fc {c.fc_rate:g} / conv {c.conv_rate:g} / output {c.output_rate:g}"
        )
        return (
            f"{c.model} on {c.dataset or c.data}, {c.iterations} iterations per level, "
            f"pruning {rates} per round, rewind {c.rewind}, "
            f"{len(self.seeds)} seed{'s' if len(self.seeds) > 1 else ''}"
        )


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
            shown = ", ".join(
                f"--{n.replace('_', '-')} ({dirs[0]}: {first.shown(n)}, {d}: {c.shown(n)})"
                for n in diff
            )
            raise UserError(
                f"the runs differ in settings that change results: {shown}; a mean "
                "over them would mix two experiments: report each separately"
            )
        other = _data_md5(d)
        if md5 is not None and other is not None and other != md5:
            raise UserError(
                f"{dirs[0]} and {d} were trained on different data (md5 {md5} vs "
                f"{other}): report each separately"
            )
    seeds = [c.seed for c in configs]
    for i, s in enumerate(seeds):
        if s in seeds[:i]:
            raise UserError(
                f"{dirs[seeds.index(s)]} and {dirs[i]} are both seed {s}: a mean over "
                "them would count one run twice"
            )
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
                        per_role.setdefault(metric, []).append(float(member.get(metric, math.nan)))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise UserError(
                    f"level metrics {path}: not as ticketc find writes them "
                    f"({type(e).__name__}: {e})"
                ) from e
    if not levels:
        raise UserError(f"no finished level in {', '.join(map(str, run_dirs))}")
    return [levels[k] for k in sorted(levels)]


def member_roles(rows: Sequence[LevelSummary]) -> list[str]:
    """ "ticket" first, then the controls, of every level."""
    return sorted({k for r in rows for k in r.values}, key=lambda k: (k != "ticket", k))


def has_controls(rows: Sequence[LevelSummary]) -> bool:
    return any(k != "ticket" for k in member_roles(rows))


# Each member's columns: header, metric; the terminal table (`table(..., short=True)`) leaves
# out the early-stop accuracy.
COLUMNS = (
    ("val acc % (end)", "final_val_acc"),
    ("test acc % (end)", "final_test_acc"),
    ("test acc % (early stop)", "early_stop_test_acc"),
    ("early-stop it", "early_stop_iteration"),
)


def table(
    rows: Sequence[LevelSummary], *, short: bool = False
) -> tuple[list[str], list[list[str]]]:
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
        entry: dict[str, Any] = {
            "level": r.level,
            "density": r.density,
            "export_bytes": r.export_bytes,
            "wall_s": r.wall_s,
        }
        for role in r.values:
            entry[role] = {}
            for metric in METRICS:
                mean, std, n = r.stat(role, metric)
                entry[role][metric] = {
                    "mean": None if n == 0 else mean,
                    "std": None if n == 0 else std,
                    "n": n,
                    "values": r.values[role].get(metric, []),
                }
        out.append(entry)
    return out
