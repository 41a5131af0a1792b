"""Arguments and steps shared by the subcommands that read a model file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ticketc.errors import UserError, first_line
from ticketc.inputs import (
    INPUT_FORM,
    ExampleInputs,
    InputSpec,
    check_fits_memory,
    check_input_names,
    float_dtype,
    infer_example,
    inputs_from_specs,
    parse_shape,
)
from ticketc.load import LoadedModel, load_model, load_sample
from ticketc.program_inputs import as_program_call, from_graph_module

T = TypeVar("T")

ARCH_HELP = (
    "(runs code) import MODULE:FACTORY and call it to build the architecture of a state dict, "
    "or of a ticket whose architecture is not built into ticketc, e.g. mypkg.nets:resnet"
)
TRUST_PICKLE_HELP = (
    "(runs code) allow what runs code from the file itself: a whole pickled module "
    "(torch.save(model)), pickled tensors or Python objects in a .pt2, AOTInductor libraries; "
    "only for files you trust"
)


MASK_HELP = (
    "explicit masks: a torch file of parameter name -> bool tensor, or of layer -> "
    "{tensor name -> mask} (as NNI writes)"
)


def build_config(cls: type[T], **fields: Any) -> T:
    """The configuration `cls(**fields)` of a subcommand; the ValueError / TypeError its
    validation raises (naming the bad value) becomes a UserError (one line, exit 2)."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def add_reading_arguments(parser: argparse.ArgumentParser, *, remote_code: bool = True) -> None:
    """The flags that say how a model file is read: --arch, --trust-pickle, --trust-remote-code
    (unless `remote_code` is False) and --mask. Every command that reads a model takes these."""
    parser.add_argument("--arch", metavar="MODULE:FACTORY", help=ARCH_HELP)
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    if remote_code:
        parser.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="(runs code) accept a Hugging Face directory whose config.json names code "
            "from the directory (auto_map) or a Hub kernel (attn_implementation org/repo), "
            "and run that code",
        )
    parser.add_argument("--mask", metavar="MASKS.pt", help=MASK_HELP)


def add_model_arguments(parser: argparse.ArgumentParser, name: str = "model") -> None:
    """The model (`name`: positional, or a required --flag), how it is read, and its inputs
    (--input, --input-shape, --sample)."""
    required = {"required": True, "metavar": "MODEL"} if name.startswith("--") else {}
    parser.add_argument(
        name,
        **required,  # type: ignore[arg-type]
        help="model file: ticket checkpoint, state dict or .safetensors (+ --arch), pickled "
        "module (+ --trust-pickle), torch.export program (.pt2), or a Hugging Face directory "
        "(config.json + safetensors); reading it runs no code from it unless --trust-pickle "
        "or --trust-remote-code",
    )
    add_reading_arguments(parser)
    parser.add_argument(
        "--input",
        metavar="NAME:DTYPE:SHAPE",
        action="append",
        help=f"a model input, {INPUT_FORM}; repeat for several. Integer inputs take values "
        "in LOW-HIGH, by default token ids below the smallest embedding's size (all ones for "
        "*mask* inputs). Dim 0 is the batch. Exported dynamic: the batch, and dim 1 (the "
        "sequence) of integer inputs and of 2-D / 3-D float inputs where the model leaves it "
        "free (a batch-first sequence, audio samples; not a Linear's features)",
    )
    parser.add_argument(
        "--input-shape", metavar="N,C,H,W", help="the shape of a single float input (as --input)"
    )
    parser.add_argument(
        "--sample",
        metavar="X.pt",
        help="a tensor to verify on (real data) instead of a random input",
    )


def reading_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments the reading flags (`add_reading_arguments`) stand for, as
    load_model, inspect_file and pack take them: arch, trust_pickle, mask_path and, where the
    command has the flag, trust_remote_code."""
    options = {"arch": args.arch, "trust_pickle": args.trust_pickle, "mask_path": args.mask}
    if hasattr(args, "trust_remote_code"):
        options["trust_remote_code"] = args.trust_remote_code
    return options


def load_from_args(args: argparse.Namespace, path: str | None = None) -> LoadedModel:
    return load_model(path or args.model, **reading_options(args))


def print_result(result: Any, as_json: bool, show: Callable[[Any], None]) -> int:
    """Print `result.to_json()` as JSON (--json) or `show(result)` for a person; returns 0, the
    command's exit code."""
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        show(result)
    return 0


def input_specs(args: argparse.Namespace) -> list[InputSpec]:
    """The --input specs (`InputSpec.parse`); UserError on one that does not parse or when
    --input-shape is given as well."""
    specs = [InputSpec.parse(text) for text in (getattr(args, "input", None) or [])]
    if specs and args.input_shape:
        raise UserError("give the inputs either with --input or with --input-shape, not both")
    return specs


def inputs_from_args(
    args: argparse.Namespace, loaded: LoadedModel
) -> tuple[ExampleInputs, ExampleInputs | None]:
    """The tracing example and (optional) verification sample: from --input / --input-shape /
    --sample, else what the model file tells, else the model's first layer (Linear,
    Embedding). UserError when none of these gives it."""
    sample = ExampleInputs.of(load_sample(args.sample)) if args.sample else None
    specs = input_specs(args)
    if specs:
        check_input_names(loaded.model, specs)
        example = inputs_from_specs(specs, loaded.model)
        if loaded.source == "export":
            example = as_program_call(loaded.model, example)
        check_runs(loaded.model, example, " ".join(f"--input {text}" for text in args.input))
        return example, sample
    if args.input_shape:
        # in the model's float type: an fp16 / bf16 model takes its own
        shape, dtype = parse_shape(args.input_shape), float_dtype(loaded.model)
        check_fits_memory(shape, dtype, f"--input-shape {args.input_shape}")
        zeros = torch.zeros(shape, dtype=dtype)
        shaped = ExampleInputs((zeros,))
        check_runs(loaded.model, shaped, f"--input-shape {args.input_shape}")
        return shaped, sample
    if sample is not None:
        check_runs(loaded.model, sample, f"--sample {args.sample}")
        return sample, sample
    from ticketc.hf.model import is_transformers_model

    if loaded.source == "hf" or is_transformers_model(loaded.model):
        # a transformers model (from its directory, a pickle or --arch): its named inputs,
        # attention_mask included, verified at other sizes
        from ticketc.hf import default_input_specs
        from ticketc.hf import example_inputs as hf_example
        from ticketc.hf import sample_inputs as hf_sample

        hf_specs = default_input_specs(loaded.model)
        finals: dict[str | int, int] = {s.name: s.final for s in hf_specs if s.final is not None}
        # token ids over the whole vocabulary wherever inputs are drawn again (the check at
        # another batch and length): below the smallest Embedding they were 0 or 1 (BERT's
        # token types), or below CLIP's vision position table
        ranges: dict[str | int, tuple[int, int]] = {
            s.name: (0, s.high) for s in hf_specs if s.high is not None
        }
        return (
            ExampleInputs((), hf_example(hf_specs), ranges, finals=finals),
            ExampleInputs((), hf_sample(hf_specs), ranges, finals=finals),
        )
    found = from_graph_module(loaded.model) if loaded.source == "export" else None
    if found is None and loaded.example_input is not None:
        found = ExampleInputs.of(loaded.example_input)
    found = found or infer_example(loaded.model)
    if found is None:
        raise UserError(
            f"cannot tell the input of {args.model}: pass --input NAME:DTYPE:SHAPE (e.g. "
            "--input x:float32:1,3,32,32, or input_ids:int64:1,128), --input-shape or --sample"
        )
    return found, sample


def example_and_sample(
    args: argparse.Namespace, loaded: LoadedModel
) -> tuple[ExampleInputs, ExampleInputs | None]:
    """The inputs compile and bench run the model on: every --input as given; without
    --input, the first tensor of `inputs_from_args`' example and sample, positional (a
    transformers model: its input_ids)."""
    example, sample = inputs_from_args(args, loaded)
    if getattr(args, "input", None):
        return example, sample

    def first(inputs: ExampleInputs) -> ExampleInputs:
        return ExampleInputs(tuple(inputs.tensors()[:1]))

    return first(example), first(sample) if sample is not None else None


@torch.no_grad()
def check_runs(model: torch.nn.Module, example: ExampleInputs, given: str) -> None:
    """One forward pass on the input the user gave; UserError (one line) when the model
    rejects it, before any tracing or compiling starts."""
    try:
        example(model)
    except Exception as e:  # noqa: BLE001 - the model's own code raises anything
        raise UserError(
            f"the model does not run on the given inputs, {given} ({example.describe()}): "
            f"{first_line(e, 200)}"
        ) from e


def console():  # -> rich.console.Console
    """A console that does not squeeze tables when the output is a pipe or a file."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)
