"""Summaries of one or more run directories (seeds): a table, JSON and the paper's plots
(`ticketc.find.plots`).

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
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ticketc.errors import UserError, first_line
from ticketc.find.plots import metric_figure, plot, size_figure
from ticketc.find.summary import (
    METRICS,
    Experiment,
    LevelSummary,
    collect,
    experiment,
    has_controls,
    member_roles,
    table,
    table_markdown,
    to_json,
)
from ticketc.safe_load import read_json

# what callers of this module (commands/report, tests, benchmarks) import from it
__all__ = [
    "METRICS",
    "NO_CONTROLS",
    "OUTPUTS",
    "Experiment",
    "LevelSummary",
    "collect",
    "experiment",
    "export_size",
    "has_controls",
    "member_roles",
    "metric_figure",
    "plot",
    "run_arch",
    "size_figure",
    "table",
    "table_markdown",
    "to_json",
    "write_report",
]

OUTPUTS = (
    "report.md",
    "report.json",
    "accuracy.png",
    "accuracy_final.png",
    "early_stop.png",
    "export_size.png",
)
NO_CONTROLS = (
    "No controls were trained (find's --controls is off by default: they multiply the "
    "training time), so this shows the ticket alone: it cannot tell a winning ticket "
    "from any sparse network of the same size. Rerun find with --controls "
    "reinit,random-mask to compare."
)


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


def export_size(
    level_dir: Path, user_arch: str | None = None, format: str = "portable"
) -> int | None:
    """Bytes of the fp32 ONNX export (`format` portable or dense, all files) of a level's
    trained weights; None if it fails.

    The architecture is built as `run_arch` allows (built in, or the user's --arch)."""
    size = _export_size(level_dir, user_arch, format)
    return size if isinstance(size, int) else None


def _export_size(level_dir: Path, user_arch: str | None, format: str) -> int | str:
    try:
        from ticketc.export import ExportConfig, export_model
        from ticketc.factory import build_trained
        from ticketc.safe_load import load_tensor_dict

        arch = run_arch(level_dir.parent, user_arch)
        state = load_tensor_dict(level_dir / "final.pt", "run file")
        model = build_trained(
            arch["arch"],
            arch.get("arch_kwargs", {}),
            state,
            source=str(level_dir.parent / "arch.json"),
            user_arch=user_arch,
        )
        model.eval()
        shape = arch.get("input_shape")
        if not (
            isinstance(shape, list)
            and all(type(d) is int and d > 0 for d in shape)
            and math.prod(shape) <= 2**28
        ):  # not a shape ticketc writes: nothing is allocated from it
            return f"arch.json's input_shape {str(shape)[:60]} is not a list of sizes"
        example = torch.zeros(1, *shape)
        with tempfile.TemporaryDirectory() as tmp:
            result = export_model(
                model, example, Path(tmp) / "model.onnx", ExportConfig(format=format, values="fp32")
            )
            return int(result.total_bytes)
    except Exception as e:  # noqa: BLE001 - a size that cannot be measured is left out, said
        return first_line(e)


# ---------------------------------------------------------------------------------------------
# The report


def _refuse_inside_runs(out: Path, run_dirs: Sequence[Path]) -> None:
    for run_dir in run_dirs:
        if out.resolve().is_relative_to(run_dir.resolve()):
            raise UserError(
                f"--out {out} is inside the run directory {run_dir}: write the report "
                "to a folder of its own"
            )


def _prepare_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create report directory {out}: {e.strerror}") from e
    for name in OUTPUTS:  # a previous report's files, e.g. a size plot this one will not draw
        (out / name).unlink(missing_ok=True)


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    export: bool = True,
    arch: str | None = None,
) -> tuple[list[LevelSummary], list[Path], list[str]]:
    """Collect the runs (seeds of one experiment), export each level of the first run (sizes),
    write report.md, report.json and the PNGs into `out_dir` (its own folder: never inside a
    run directory; a previous report's files there are replaced).

    `arch`: the user's --arch, needed to export the levels of a run whose architecture is not
    built into ticketc (UserError otherwise, before anything is written). Returns the rows,
    the files written and notes (levels left out, sizes not measured, and why)."""
    exp = experiment(run_dirs)
    rows = collect(run_dirs)
    out = Path(out_dir)
    _refuse_inside_runs(out, exp.run_dirs)
    if export:
        run_arch(exp.run_dirs[0], arch)
    _prepare_out_dir(out)
    dense_bytes = None
    notes = _level_gaps(rows)
    if export:
        first = exp.run_dirs[0]
        for r in rows:
            size = _export_size(first / f"level_{r.level:02d}", arch, "portable")
            r.export_bytes = size if isinstance(size, int) else None
            if isinstance(size, str):
                notes.append(f"level {r.level}: export size not measured ({size})")
        if rows[0].level == 0:
            dense_bytes = export_size(first / "level_00", arch, format="dense")
    (out / "report.json").write_text(
        json.dumps(
            {
                "runs": [str(p) for p in exp.run_dirs],
                "seeds": exp.seeds,
                "settings": exp.config.to_json(),
                "dense_export_bytes": dense_bytes,
                "levels": to_json(rows),
                "notes": notes,
            },
            indent=1,
        )
    )
    paths = plot(rows, out, exp=exp, dense_bytes=dense_bytes)
    md = [
        f"# ticketc find report: {exp.name}",
        "",
        f"{exp.describe()}. Runs: {', '.join(map(str, exp.run_dirs))}"
        + ("; every number is the mean ± std over them." if len(exp.run_dirs) > 1 else "."),
        "",
        "Accuracies are measured in eval mode on the saved weights of each level: "
        '"val" on the validation split the ticket is chosen on, "test" on the test split; '
        '"end" after the level\'s last iteration, "early stop" at the iteration of minimum '
        "validation loss.",
        "",
    ]
    if not has_controls(rows):
        md += [NO_CONTROLS, ""]
    md.append(table_markdown(rows))
    md += [f"Note: {note}." for note in notes]
    md.append(" ".join(f"![{p.stem}]({p.name})" for p in paths))
    (out / "report.md").write_text("\n".join(md) + "\n")
    return rows, [out / "report.md", out / "report.json", *paths], notes


def _level_gaps(rows: Sequence[LevelSummary]) -> list[str]:
    """A note for every level missing between the first and the last one read (a level folder
    without metrics.json, or not a folder)."""
    levels = {r.level for r in rows}
    missing = [n for n in range(min(levels, default=0), max(levels, default=0)) if n not in levels]
    return [f"level {n}: no readable level_{n:02d}/metrics.json, left out" for n in missing]
