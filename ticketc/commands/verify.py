"""`ticketc verify OUT.onnx --against MODEL`: compare an ONNX file with its PyTorch model."""

from __future__ import annotations

import argparse
import json

from ticketc.commands._common import add_model_arguments, example_and_sample, load_from_args
from ticketc.errors import UserError
from ticketc.load import check_file
from ticketc.verify import FP32_RTOL, random_sample, verify

NAME = "verify"
HELP = "run an ONNX file in onnxruntime and compare it with the PyTorch model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", help="the exported .onnx file")
    add_model_arguments(parser, "--against")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=FP32_RTOL,
        help=f"maximum relative error (default: {FP32_RTOL:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    if args.against is None:
        raise UserError("pass --against MODEL: the PyTorch model to compare with")
    if args.tolerance < 0:
        raise UserError(f"tolerance {args.tolerance} must be >= 0")
    check_file(args.onnx)
    args.model = args.against
    loaded = load_from_args(args)
    example, sample = example_and_sample(args, loaded)
    result = verify(
        args.onnx,
        loaded.model,
        sample if sample is not None else random_sample(example),
        args.tolerance,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "passed": result.passed,
                    "tolerance": result.tolerance,
                    "outputs": [o.__dict__ for o in result.outputs],
                },
                indent=2,
            )
        )
    elif result.passed:
        print(f"ok: {result.summary()} (relative tolerance {result.tolerance:g})")
    if not result.passed:  # exit 2 with the one line on stderr, as for any other bad input
        raise UserError(
            f"{args.onnx}: verification FAILED: {result.summary()} "
            f"(relative tolerance {result.tolerance:g})"
        )
    return 0
