"""`ticketc export MODEL -o OUT.onnx`: the main command."""

from __future__ import annotations

import argparse
from pathlib import Path

from ticketc.card import size_phrase
from ticketc.commands._common import (
    add_model_arguments,
    build_config,
    inputs_from_args,
    load_from_args,
    print_result,
)
from ticketc.commands._common import console as console_
from ticketc.errors import UserError
from ticketc.export import DTYPES, FORMATS, VALUES, ExportConfig, ExportResult, export_model
from ticketc.export.config import POSITIONS
from ticketc.verify import OUTPUT_RTOL

NAME = "export"
HELP = "export a pruned model (or an ONNX file) to a small, verified ONNX file"
_DEFAULTS = ExportConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT.onnx",
        help="output file (default: MODEL with the suffix .onnx; DIR.onnx for a directory; "
        "MODEL.ticketc.onnx for an .onnx MODEL); its sparsity card is written beside it as "
        "OUT.card.md and OUT.card.json, replacing files of those names",
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
        help="value type of the weights: fp32 is lossless (each weight in the narrowest float "
        "type that holds it exactly, e.g. fp16 in an fp16 model); fp16 / int8 / int4 are lossy, "
        f"every weight checked against the quantiser's bound (default: {_DEFAULTS.values})",
    )
    parser.add_argument(
        "--positions",
        choices=POSITIONS,
        default=_DEFAULTS.positions,
        help="how positions are coded: auto = the smallest per tensor "
        f"(default: {_DEFAULTS.positions})",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=_DEFAULTS.dtype,
        help="export the model in this float type (default: its own; fp32 where onnxruntime's "
        "CPU provider cannot run it, e.g. bf16 convolutions)",
    )
    parser.add_argument(
        "--input-names",
        metavar="A,B",
        help="names of the ONNX inputs, in order (default: the forward's argument names)",
    )
    parser.add_argument(
        "--output-names",
        metavar="A,B",
        help="names of the ONNX outputs, in order (default: the output's keys, e.g. logits)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=_DEFAULTS.tolerance,
        help="fail when the outputs' relative error exceeds this (default: "
        f"{OUTPUT_RTOL['float32']:g} for fp32 models in fp32, looser for fp16 / bf16 graphs; "
        "lossy output errors are reported, their weights always checked)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    parser.add_argument(
        "--dead-units",
        action="store_true",
        help="remove units whose weights in or out are all pruned (Sequential "
        "chains): smaller dims, so faster and leaner in onnxruntime too",
    )
    parser.add_argument(
        "--opset", type=int, default=_DEFAULTS.opset, help="ONNX opset (>= 18; default: torch's)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise UserError(f"names {text!r} must be a comma-separated list without empty entries")
    return names


def run(args: argparse.Namespace) -> int:
    config = build_config(
        ExportConfig,
        format=args.format,
        values=args.values,
        verify=not args.no_verify,
        tolerance=args.tolerance,
        opset=args.opset,
        dead_units=args.dead_units,
        positions=args.positions,
        dtype=args.dtype,
        input_names=_names(args.input_names),
        output_names=_names(args.output_names),
    )
    if Path(args.model).suffix == ".onnx":
        result = _export_onnx(args, config)
    else:
        loaded = load_from_args(args)
        example, sample = inputs_from_args(args, loaded)
        out = Path(args.output) if args.output else default_output(args.model)
        _refuse_overwriting_inputs(out, args)
        result = export_model(loaded.model, example, out, config, sample=sample, source=args.model)
        result.notes[:0] = loaded.notes
    return print_result(result, args.json, print_summary)


def _export_onnx(args: argparse.Namespace, config: ExportConfig) -> ExportResult:
    from ticketc.export.onnx_in import export_onnx_file
    from ticketc.inputs import ExampleInputs
    from ticketc.load import load_sample

    given = ("arch", "mask", "input", "input_shape", "dtype", "dead_units")
    ignored = [flag for flag in (*given, "input_names", "output_names") if getattr(args, flag)]
    if ignored:
        flags = ", ".join("--" + f.replace("_", "-") for f in ignored)
        verb = "does" if len(ignored) == 1 else "do"
        raise UserError(f"{flags} {verb} not apply to an ONNX file: its graph is used as it is")
    source = Path(args.model)
    out = Path(args.output) if args.output else source.with_suffix(".ticketc.onnx")
    _refuse_overwriting_inputs(out, args)
    sample = ExampleInputs.of(load_sample(args.sample)) if args.sample else None
    return export_onnx_file(source, out, config, sample)


def _refuse_overwriting_inputs(out: Path, args: argparse.Namespace) -> None:
    """UserError when the output is the model, its mask file or its sample."""
    for given in (args.model, getattr(args, "mask", None), getattr(args, "sample", None)):
        if given and Path(given).exists() and out.resolve() == Path(given).resolve():
            raise UserError(f"-o {out} would overwrite the input file {given}: choose another")


def default_output(model: str) -> Path:
    """MODEL with the suffix .onnx; for a directory, a file beside it (bert -> bert.onnx)."""
    p = Path(model.rstrip("/"))
    return p.with_name(p.name + ".onnx") if p.is_dir() else p.with_suffix(".onnx")


def print_summary(result: ExportResult) -> None:
    from rich.table import Table

    table = Table(title=f"{result.path}", title_justify="left")
    for column in ("initializer", "from (PyTorch)", "shape", "density", "stored as", "bytes"):
        table.add_column(column, justify="right" if column in ("density", "bytes") else "left")
    shown = [layer for layer in result.layers if layer.codec != layer.dtype]
    for layer in shown:
        table.add_row(
            layer.initializer,
            ", ".join(layer.sources),
            "x".join(map(str, layer.shape)),
            f"{layer.density:.2%}",
            layer.codec,
            f"{layer.nbytes:,}",
        )
    kept = [layer for layer in result.layers if layer.codec == layer.dtype]
    if kept:
        table.add_row(
            f"({len(kept)} kept as they are)",
            "",
            "",
            "",
            ", ".join(sorted({layer.dtype for layer in kept})),
            f"{sum(layer.nbytes for layer in kept):,}",
        )
    console = console_()
    console.print(table)
    files = " + ".join(f"{f.name} ({f.stat().st_size:,} B)" for f in result.files)
    console.print(f"wrote {files} in {result.seconds:.2f} s")
    console.print(
        f"graph type {_short(result.dtype)}, values {result.values}"
        + (" (lossless)" if result.values == "fp32" else "")
    )
    if result.weight_bytes:
        size = size_phrase(result.weight_bytes / result.total_bytes)
        bound = result.bound_bytes
        console.print(
            f"{size.capitalize()} the graph's weights as "
            f"exported ({result.weight_bytes:,} B); {result.total_bytes / bound:.2f}x the entropy "
            f"bound of its zeros and value type ({bound:,.0f} B)"
            if bound
            else f"{size.capitalize()} the graph's weights ({result.weight_bytes:,} B)"
        )
    if result.verification is not None:
        v = result.verification
        console.print(f"verified in onnxruntime on batch {v.batch}: {v.summary()}")
    for note in result.notes:
        console.print(f"note: {note}")


def _short(dtype: str) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}.get(
        dtype, dtype
    )
