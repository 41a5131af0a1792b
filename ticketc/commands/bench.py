"""`ticketc bench MODEL`: how much faster and smaller a pruned model is on this machine, against
what its user would otherwise run (torch dense, onnxruntime on the dense export, torch CSR)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ticketc.bench.config import BenchConfig
from ticketc.commands._common import (
    add_model_arguments,
    check_runs,
    console,
    example_and_sample,
    input_specs,
    load_from_args,
)
from ticketc.errors import UserError

NAME = "bench"
HELP = "time a pruned model in torch dense, ticketc, onnxruntime and torch CSR; sizes on disk"
_DEFAULTS = BenchConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)  # with --input NAME:DTYPE:SHAPE[:LOW-HIGH]; dim 0 is the batch
    batch_sizes = ",".join(str(b) for b in _DEFAULTS.batch_sizes)
    parser.add_argument(
        "--batch-sizes", default=batch_sizes, help=f"comma-separated (default: {batch_sizes})"
    )
    parser.add_argument(
        "--threads", type=int, help="torch and onnxruntime threads (default: torch's setting)"
    )
    parser.add_argument("--device", default=_DEFAULTS.device, choices=["cpu", "cuda"])
    parser.add_argument(
        "--budget",
        type=float,
        default=_DEFAULTS.budget_s,
        help=f"seconds of timed rounds per batch size (default: {_DEFAULTS.budget_s:g})",
    )
    parser.add_argument("--no-sizes", action="store_true", help="skip the size exports")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "-o", "--output", metavar="REPORT_DIR", help="where bench.json and bench.png go "
        "(default: MODEL's name + .bench)"
    )  # fmt: skip


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise UserError(f"--batch-sizes {text!r}: expected positive integers like 1,16,64")
    return tuple(sorted(set(sizes)))


def run(args: argparse.Namespace) -> int:
    from ticketc.bench import bench_model
    from ticketc.bench.report import print_report, write

    sizes = _batch_sizes(args.batch_sizes)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    if not args.budget > 0:
        raise UserError(f"--budget {args.budget}: must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    specs = input_specs(args)
    if specs and args.sample:
        raise UserError("give the inputs either with --input or with --sample, not both")
    out = Path(args.output) if args.output else Path(args.model).with_suffix(".bench")
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a directory")
    loaded = load_from_args(args)
    if _calls_ticketc_ops(loaded.model):
        raise UserError(
            f"{args.model} is a ticketc-compiled program, so it has no dense baseline: "
            "bench the model it was compiled from"
        )
    example, _ = example_and_sample(args, loaded)  # a --sample is the example here
    given = " ".join(f"--input {text}" for text in args.input or []) or "its example inputs"
    check_runs(loaded.model, example, given)  # a runtime that fails later is a cell, not an error
    config = BenchConfig(
        batch_sizes=sizes,
        threads=args.threads,
        device=args.device,
        budget_s=args.budget,
        sizes=not args.no_sizes,
    )
    progress = (lambda s: None) if args.json else (lambda s: print(f"  {s}", file=sys.stderr))
    result = bench_model(loaded.model, example, config, name=Path(args.model).name, log=progress)
    paths = write(result, out)
    if args.json:
        print(json.dumps({**result.to_json(), "files": [str(p) for p in paths]}, indent=2))
    else:
        print_report(result, console())
        print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _calls_ticketc_ops(model: torch.nn.Module) -> bool:
    """Whether a loaded torch.export program calls torch.ops.ticketc.* (ticketc compiled it)."""
    graph = getattr(model, "graph", None)
    nodes = getattr(graph, "nodes", [])
    return any(str(getattr(n, "target", "")).startswith("ticketc.") for n in nodes)
