"""`ticketc pack MODEL -o OUT_DIR`: pruned weights as a sparse safetensors directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ticketc.card import size_phrase
from ticketc.commands._common import (
    add_reading_arguments,
    build_config,
    print_result,
    reading_options,
)
from ticketc.commands._common import console as console_
from ticketc.pack import VALUES, PackConfig, PackResult, pack

NAME = "pack"
HELP = "store a pruned model's weights as sparse safetensors (lossless by default) with a card"
_DEFAULTS = PackConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a Hugging Face directory (config.json + safetensors / pytorch_model.bin, "
        "compressed-tensors sparse ones included), a .safetensors file, or any model file "
        "export reads",
    )
    parser.add_argument(
        "-o", "--output", metavar="OUT_DIR", help="output directory (default: MODEL-packed)"
    )
    parser.add_argument(
        "--values",
        choices=VALUES,
        default=_DEFAULTS.values,
        help="value type of pruned tensors; lossless keeps each tensor's own dtype bit for bit "
        f"(default: {_DEFAULTS.values})",
    )
    parser.add_argument(
        "--max-shard-size",
        default=_DEFAULTS.max_shard_size,
        help=f"packed bytes per shard, e.g. 2GB or 500MB (default: {_DEFAULTS.max_shard_size})",
    )
    parser.add_argument(
        "--keep-zero-signs",
        action="store_true",
        help="also store which pruned weights are -0.0 (1 bit per zero), so unpacked files are "
        "identical to the bit rather than equal in value",
    )
    add_reading_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def default_output(model: str) -> Path:
    p = Path(model.rstrip("/"))
    return p.with_name(f"{p.stem if p.is_file() else p.name}-packed")


def run(args: argparse.Namespace) -> int:
    config = build_config(
        PackConfig,
        values=args.values,
        max_shard_size=args.max_shard_size,
        keep_zero_signs=args.keep_zero_signs,
    )
    out = Path(args.output) if args.output else default_output(args.model)
    result = pack(args.model, out, config, **reading_options(args))
    return print_result(result, args.json, print_summary)


def print_summary(result: PackResult) -> None:
    from rich.table import Table

    table = Table(title=f"{result.path}", title_justify="left")
    for column in ("tensor", "shape", "density", "pattern", "stored as", "bytes", "dense bytes"):
        right = column in ("density", "bytes", "dense bytes")
        table.add_column(column, justify="right" if right else "left")
    for r in result.card.layers:
        if r.layout == "dense":
            continue
        table.add_row(
            r.name,
            "x".join(map(str, r.shape)),
            f"{r.density:.2%}",
            r.pattern,
            f"{r.layout} + {r.values}",
            f"{r.stored_bytes:,}",
            f"{r.dense_bytes:,}",
        )
    console = console_()
    console.print(table)
    t = result.card.totals
    files = " + ".join(f"{f.name} ({f.stat().st_size:,} B)" for f in result.files)
    console.print(f"wrote {files} in {result.seconds:.2f} s")
    if result.card.reference is not None and "times_smaller" in t:
        what, size = result.card.reference
        console.print(f"{size_phrase(t['times_smaller']).capitalize()} the {what} ({size:,} B)")
    if t["file_bytes_over_bound"]:
        console.print(
            f"{t['file_bytes_over_bound']:.3f}x the entropy bound ({t['bound_bytes']:,.0f} B)"
        )
    console.print(f"card: {result.card_files[0]}")
    for note in result.notes:
        console.print(f"note: {note}")
