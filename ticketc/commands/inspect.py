"""`ticketc inspect FILE`: per-layer density, nnz and bytes in every storage form."""

from __future__ import annotations

import argparse

from ticketc.commands._common import add_reading_arguments, console, print_result, reading_options
from ticketc.inspect import BLOCK_SIZES, Inspection, inspect_file

NAME = "inspect"
HELP = "per-layer density, nnz and bytes (dense / CSR / codec) of a model or ONNX file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", help="a model file (as for export), a Hugging Face directory or an .onnx file"
    )
    add_reading_arguments(parser, remote_code=False)
    parser.add_argument("--json", action="store_true", help="print the same as JSON")


def run(args: argparse.Namespace) -> int:
    return print_result(inspect_file(args.file, **reading_options(args)), args.json, print_table)


def print_table(result: Inspection) -> None:
    if result.plan is not None:
        print_plan(result)
        return
    from rich.table import Table

    table = Table(title=f"{result.path} ({result.kind})", title_justify="left")
    columns = ["layer", "shape", "density", "nnz", "dense B", "CSR B", "codec B", "codec"]
    columns += [f"blocks {b}" for b in BLOCK_SIZES]
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("layer", "shape", "codec") else "right"
        )
    for x in result.layers:
        table.add_row(
            f"{x.name} ({x.source})" if x.source else x.name,
            "x".join(map(str, x.shape)),
            f"{x.density:.2%}",
            f"{x.nnz:,}",
            f"{x.dense_bytes:,}",
            f"{x.csr_bytes:,}",
            f"{x.codec_bytes:,}",
            x.codec,
            *(f"{x.block_occupancy[b]:.0%}" for b in BLOCK_SIZES),
        )
    t = result.totals
    table.add_row(
        "total",
        "",
        f"{t['density']:.2%}",
        f"{int(t['nnz']):,}",
        f"{int(t['dense_bytes']):,}",
        f"{int(t['csr_bytes']):,}",
        f"{int(t['codec_bytes']):,}",
        "",
        *[""] * len(BLOCK_SIZES),
        style="bold",
    )
    console().print(table)


def print_plan(result: Inspection) -> None:
    from rich.table import Table

    assert result.plan is not None
    table = Table(title=f"{result.path} (compiled: plan per layer)", title_justify="left")
    for column in ("layer", "shape", "density", "format", "predicted us (per format)", "reason"):
        table.add_column(column, justify="right" if column == "density" else "left")
    for row in result.plan:
        predicted = ", ".join(
            f"{k} {v:.1f}" for k, v in dict(row.get("predicted_us") or {}).items()
        )
        table.add_row(
            str(row["name"]),
            "x".join(map(str, row.get("shape", []))),
            f"{float(row.get('density', 1.0)):.2%}",
            str(row["format"]),
            predicted,
            str(row.get("reason", "")),
        )
    console().print(table)
