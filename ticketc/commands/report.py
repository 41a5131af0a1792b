"""`ticketc report`: table and plots of a `ticketc find` run (or several seeds of one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ticketc.errors import UserError

NAME = "report"
HELP = (
    "summarise ticketc find run(s): accuracy of ticket and controls, early stopping and "
    "export size per level"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories: one, or several seeds of the same settings (mean ± std)",
    )
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        help="output folder, never inside a run directory "
        "(default for one run: RUN_DIR-report beside it; needed for several)",
    )
    p.add_argument("--no-export", action="store_true", help="skip the ONNX size per level")
    p.add_argument(
        "--arch",
        metavar="MODULE:FACTORY",
        help="(runs code) import this factory to build a run whose architecture is "
        "not built into ticketc; arch.json alone is never imported",
    )
    p.add_argument("--json", action="store_true", help="print the per-level summary as JSON")


def default_out(run_dirs: list[Path]) -> Path:
    if len(run_dirs) > 1:
        raise UserError("give -o OUT for a report of several runs")
    run = run_dirs[0]
    return run.parent / f"{run.resolve().name}-report"


def run(args: argparse.Namespace) -> int:
    from ticketc.commands._common import console
    from ticketc.find.report import NO_CONTROLS, has_controls, table, to_json, write_report

    out = args.out or default_out(args.run_dirs)
    rows, paths, notes = write_report(args.run_dirs, out, export=not args.no_export, arch=args.arch)
    if args.json:
        print(json.dumps({"out": str(out), "levels": to_json(rows), "notes": notes}))
        return 0
    from rich.table import Table

    head, cells = table(rows, short=True)
    shown = Table(title=f"ticketc find: {', '.join(map(str, args.run_dirs))}")
    for name in head:
        shown.add_column(name, justify="right")
    for row in cells:
        shown.add_row(*row)
    console().print(shown)
    if not has_controls(rows):
        print(NO_CONTROLS)
    for note in notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
