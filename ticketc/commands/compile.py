"""`ticketc compile MODEL -o OUT.pt2`: sparse kernels where they beat dense, as a torch.export
program that runs with ticketc installed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ticketc.commands._common import (
    add_model_arguments,
    build_config,
    example_and_sample,
    load_from_args,
)
from ticketc.compile.config import DTYPES, CompileConfig
from ticketc.errors import UserError
from ticketc.transforms import SPARSE_LAYERS

NAME = "compile"
HELP = "compile a pruned model to sparse kernels (planned per layer) as a .pt2 program"
_DEFAULTS = CompileConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "-o", "--output", metavar="OUT.pt2", help="output program (default: MODEL with .pt2)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULTS.batch_size,
        help="batch size the plan is for (default: the example input's)",
    )
    parser.add_argument(
        "--device",
        default=_DEFAULTS.device,
        choices=["cpu", "cuda"],
        help=f"where it runs (default: {_DEFAULTS.device})",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=_DEFAULTS.dtype,
        help=f"compute dtype (default: {_DEFAULTS.dtype})",
    )
    parser.add_argument(
        "--plan", metavar="PLAN.json", help="take layer formats from this plan (edit one we wrote)"
    )
    parser.add_argument(
        "--tune", action="store_true", help="time every candidate format on the device"
    )
    parser.add_argument(
        "--no-dead-units", action="store_true", help="keep dead units (skip the exact pass)"
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="do not run the compiled model against dense at the planned batch size (outputs "
        "and speed; layers measured slower go back to dense)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from ticketc.compile import compile_model, export_program, save_compiled
    from ticketc.compile.lower import plan_of

    config = build_config(
        CompileConfig,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        plan_path=args.plan,
        tune=args.tune,
        dead_units=not args.no_dead_units,
        check=not args.no_check,
    )
    if config.device_kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {config.device}: no CUDA device is available")
    if args.plan is not None and not Path(args.plan).is_file():
        raise UserError(f"--plan {args.plan}: no such file")
    out = _output_path(args)
    loaded = load_from_args(args)
    # The example: every --input (positional or keyword), else one tensor from --input-shape,
    # --sample or the model file; compile, the check and export_program take them all.
    example, sample = example_and_sample(args, loaded)
    if not any(isinstance(m, SPARSE_LAYERS) for m in loaded.model.modules()):
        raise UserError(
            f"{args.model} has no Linear/Conv modules to compile (a torch.export program is "
            "already lowered: compile the model it was exported from)"
        )
    empty = [
        n
        for n, m in loaded.model.named_modules()
        if isinstance(m, SPARSE_LAYERS)
        and isinstance(m.weight, torch.Tensor)
        and m.weight.numel() == 0
    ]
    if empty:
        raise UserError(
            f"{args.model}: layer {empty[0]!r} has a zero-size weight: nothing to "
            "compile (remove the layer)"
        )
    compiled = compile_model(loaded.model, config, masks=loaded.masks, example_input=example)
    plan = plan_of(compiled)
    assert plan is not None
    error = _max_error(loaded.model, compiled, sample if sample is not None else example, config)
    program = export_program(compiled, example)
    paths = save_compiled(program, plan, out)
    result = {
        "output": str(paths[0]),
        "plan_path": str(paths[1]),
        "max_abs_error": error[0],
        "max_rel_error": error[1],
        "predicted_dense_us": round(plan.predicted_dense_us, 3),
        "predicted_us": round(plan.predicted_us, 3),
        "measured": plan.check,
        "plan": plan.to_json(),
        "notes": list(loaded.notes),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_summary(result)
    return 0


def _output_path(args: argparse.Namespace) -> Path:
    model = Path(args.model)
    if args.output:
        out = Path(args.output)
        if out.suffix != ".pt2":
            raise UserError(f"-o {out}: a compiled program must end in .pt2")
    else:
        out = model.with_suffix(".pt2")
        if out.resolve() == model.resolve():
            out = model.with_name(model.stem + ".compiled.pt2")
    if out.exists() and out.resolve() == model.resolve():
        raise UserError(f"-o {out}: would overwrite the input model")
    return out


def _max_error(
    dense: torch.nn.Module, compiled: torch.nn.Module, example: Any, config: CompileConfig
) -> tuple[float, float]:
    """(max absolute, max relative) |compiled - masked model| on the sample, a check the user
    can read. Floating-point inputs go to each model's dtype; token ids and masks stay."""
    from ticketc.compile.check import output_error
    from ticketc.inputs import ExampleInputs

    inputs = ExampleInputs.of(example)
    dtype = next((p.dtype for p in dense.parameters() if p.is_floating_point()), None)
    with torch.no_grad():
        ref = inputs.to(dtype=dtype)(dense)  # load_model already put it in eval mode
        got = inputs.to(device=config.device, dtype=config.torch_dtype)(compiled)
    return output_error(ref, got)


def _print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    plan = result["plan"]
    title = (
        f"{result['output']}: {plan['device']} {plan['dtype']} batch {plan['batch_size']} "
        f"({plan['cost_model']})"
    )
    table = Table(title=title, title_justify="left")
    for column in ("layer", "shape", "density", "format", "dense us", "chosen us", "reason"):
        table.add_column(
            column, justify="right" if "us" in column or column == "density" else "left"
        )
    chained = {name: chain for chain in plan["chains"] for name in chain["layers"]}
    for lp in plan["layers"]:
        times = lp["measured_us"] or lp["predicted_us"]
        chain = chained.get(lp["name"])
        table.add_row(
            lp["name"],
            "x".join(map(str, lp["shape"])),
            f"{lp['density']:.2%}",
            lp["format"],
            f"{times.get('dense', float('nan')):.1f}",
            f"{times.get(lp['format'], float('nan')):.1f}" if chain is None else "(chain)",
            lp["reason"],
        )
    console = Console()
    console.print(table)
    for chain in plan["chains"]:
        console.print(
            f"chain {' -> '.join(chain['layers'])}: one kernel call, predicted "
            f"{chain['predicted_us']:.1f} us"
        )
    dense, chosen = result["predicted_dense_us"], result["predicted_us"]
    if chosen > 0:
        console.print(
            f"predicted (cost model, planned layers only): {chosen:.1f} us vs {dense:.1f} us "
            f"dense ({dense / chosen:.2f}x)"
        )
    measured = result["measured"] or {}
    if "speedup" in measured:
        console.print(
            f"measured (whole model, batch {measured['batch_size']}, "
            f"{measured['threads']} threads): {measured['compiled_us']:.1f} us vs "
            f"{measured['dense_us']:.1f} us dense ({measured['speedup']:.2f}x)"
        )
    elif "skipped" in measured:
        console.print(f"not measured: {measured['skipped']}")
    dead = plan.get("dead_units") or {}
    if dead.get("removed_units"):
        console.print(f"dead units removed: {dead['removed_units']}")
    console.print(
        f"max |compiled - masked model| on the sample: {result['max_abs_error']:.3g} "
        f"(relative {result['max_rel_error']:.3g})"
    )
    console.print(f"wrote {result['output']} and {result['plan_path']}")
    for note in result["notes"]:
        console.print(f"note: {note}")
