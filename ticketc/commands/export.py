"""`ticketc export MODEL -o OUT.onnx`: the main command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ticketc.commands._common import (
    add_model_arguments,
    example_and_sample,
    hf_inputs,
    load_from_args,
)
from ticketc.commands._common import console as console_
from ticketc.errors import UserError
from ticketc.export import FORMATS, VALUES, ExportConfig, ExportResult, export_model
from ticketc.export.onnx_export import POSITIONS

NAME = "export"
HELP = "export a pruned model to a small, verified ONNX file"
_DEFAULTS = ExportConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT.onnx",
        help="output file (default: MODEL with the suffix .onnx; DIR.onnx for a directory)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=_DEFAULTS.format,
        help=f"how pruned weights are stored (default: {_DEFAULTS.format})",
    )
    parser.add_argument(
        "--values",
        choices=VALUES,
        default=_DEFAULTS.values,
        help=f"value type of pruned weights; fp32 is lossless (default: {_DEFAULTS.values})",
    )
    parser.add_argument(
        "--positions",
        choices=POSITIONS,
        default=_DEFAULTS.positions,
        help="how positions are coded: auto = smallest per tensor; gap8 is a little larger "
        f"but faster for onnxruntime to load (default: {_DEFAULTS.positions})",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=_DEFAULTS.tolerance,
        help="fail when the relative error exceeds this (default: 1e-5 for fp32, "
        "lossy values are only reported)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    parser.add_argument(
        "--dead-units",
        action="store_true",
        help="remove units whose weights in or out are all pruned (Sequential "
        "chains): smaller dims, so faster and leaner in onnxruntime too",
    )
    parser.add_argument("--opset", type=int, default=_DEFAULTS.opset, help="ONNX opset (>= 18)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        config = ExportConfig(
            format=args.format,
            values=args.values,
            verify=not args.no_verify,
            tolerance=args.tolerance,
            opset=args.opset,
            dead_units=args.dead_units,
            positions=args.positions,
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    loaded = load_from_args(args)
    out = Path(args.output) if args.output else default_output(args.model)
    named = hf_inputs(args, loaded)
    if named is not None:  # a transformers model: input_ids + attention_mask, pixel_values, ...
        result = export_model(
            loaded.model,
            named.example,
            out,
            config,
            masks=loaded.masks,
            sample=named.sample,
            dynamic_axes=named.dynamic_axes,
            source=args.model,
        )
    else:
        example, sample = example_and_sample(args, loaded)
        result = export_model(
            loaded.model, example, out, config, masks=loaded.masks, sample=sample, source=args.model
        )
    result.notes[:0] = loaded.notes
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_summary(result)
    return 0


def default_output(model: str) -> Path:
    """MODEL with the suffix .onnx; for a directory, a file beside it (bert -> bert.onnx)."""
    p = Path(model.rstrip("/"))
    return p.with_name(p.name + ".onnx") if p.is_dir() else p.with_suffix(".onnx")


def print_summary(result: ExportResult) -> None:
    from rich.table import Table

    table = Table(title=f"{result.path}", title_justify="left")
    for column in ("layer", "shape", "density", "stored as", "bytes"):
        table.add_column(column, justify="right" if column in ("density", "bytes") else "left")
    for layer in result.layers:
        table.add_row(
            layer.name,
            "x".join(map(str, layer.shape)),
            f"{layer.density:.2%}",
            layer.codec,
            f"{layer.nbytes:,}",
        )
    console = console_()
    console.print(table)
    files = " + ".join(f"{f.name} ({f.stat().st_size:,} B)" for f in result.files)
    console.print(f"wrote {files}: {result.total_bytes:,} bytes in {result.seconds:.2f} s")
    if result.weight_bytes:
        ratio = result.weight_bytes / result.total_bytes
        console.print(
            f"{ratio:.1f}x smaller than the model's weights as dense fp32 "
            f"({result.weight_bytes:,} B)"
        )
    if result.verification is not None:
        v = result.verification
        console.print(f"verified in onnxruntime on batch {v.batch}: {v.summary()}")
    for note in result.notes:
        console.print(f"note: {note}")
