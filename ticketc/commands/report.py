"""`ticketc report`: table and plots of a `ticketc find` run (or several seeds of one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "report"
HELP = "summarise ticketc find run(s): accuracy, early stopping and export size per level"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (several: mean ± std)")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/report)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX size per level")
    p.add_argument("--arch", metavar="MODULE:FACTORY",
                   help="(runs code) import this factory to build a run whose architecture is "
                   "not built into ticketc; arch.json alone is never imported")
    p.add_argument("--json", action="store_true", help="print the per-level summary as JSON")


def run(args: argparse.Namespace) -> int:
    from ticketc.find.report import to_json, write_report

    out = args.out or args.run_dirs[0] / "report"
    rows, paths = write_report(args.run_dirs, out, export=not args.no_export, arch=args.arch)
    if args.json:
        print(json.dumps(to_json(rows)))
        return 0
    from rich.console import Console
    from rich.table import Table

    kinds = sorted({k for r in rows for k in r.values}, key=lambda k: (k != "ticket", k))
    table = Table(title=f"ticketc find: {', '.join(map(str, args.run_dirs))}")
    table.add_column("level", justify="right")
    table.add_column("% weights", justify="right")
    for k in kinds:
        table.add_column(f"{k} test acc %", justify="right")
        table.add_column(f"{k} early stop", justify="right")
    table.add_column("export KiB", justify="right")
    for r in rows:
        cells = [str(r.level), f"{100 * r.density:.1f}"]
        for k in kinds:
            acc, acc_sd, n = r.stat(k, "early_stop_test_acc")
            it, it_sd, _ = r.stat(k, "early_stop_iteration")
            cells.append("" if not n else f"{100 * acc:.2f}" + (f" ± {100 * acc_sd:.2f}" if n > 1
                                                                  else ""))
            cells.append("" if not n else f"{it:.0f}")
        cells.append("" if r.export_bytes is None else f"{r.export_bytes / 1024:.1f}")
        table.add_row(*cells)
    console = Console()
    console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0
