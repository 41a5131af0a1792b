"""Arguments and steps shared by the subcommands that read a model file."""

from __future__ import annotations

import argparse

import torch

from ticketc.errors import UserError
from ticketc.load import LoadedModel, load_model, load_sample, parse_shape

ARCH_HELP = (
    "(runs code) import MODULE:FACTORY and call it to build the architecture of a state dict, "
    "or of a ticket whose architecture is not built into ticketc, e.g. mypkg.nets:resnet"
)
TRUST_PICKLE_HELP = (
    "(runs code) allow what runs code from the file itself: a whole pickled module "
    "(torch.save(model)), pickled tensors or Python objects in a .pt2, AOTInductor libraries; "
    "only for files you trust"
)


def add_model_arguments(parser: argparse.ArgumentParser, name: str = "model") -> None:
    parser.add_argument(
        name,
        help="model file: ticket checkpoint, state dict (+ --arch), pickled "
        "module (+ --trust-pickle) or torch.export program (.pt2); reading it runs no code "
        "from it unless --trust-pickle",
    )
    parser.add_argument(
        "--arch",
        metavar="MODULE:FACTORY",
        help=ARCH_HELP,
    )
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    parser.add_argument(
        "--mask",
        metavar="MASKS.pt",
        help="explicit masks: a torch file of parameter name -> bool tensor",
    )
    parser.add_argument(
        "--input-shape", metavar="N,C,H,W", help="input shape, when the model file does not tell it"
    )
    parser.add_argument(
        "--sample",
        metavar="X.pt",
        help="a tensor to verify on (real data) instead of a random input",
    )


def load_from_args(args: argparse.Namespace, path: str | None = None) -> LoadedModel:
    return load_model(
        path or args.model, arch=args.arch, trust_pickle=args.trust_pickle, mask_path=args.mask
    )


def example_and_sample(
    args: argparse.Namespace, loaded: LoadedModel
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tracing example and (optional) verification sample, from the flags or the model file."""
    sample = load_sample(args.sample) if args.sample else None
    if args.input_shape:
        example = torch.zeros(parse_shape(args.input_shape))
    elif sample is not None:
        example = sample
    elif loaded.example_input is not None:
        example = loaded.example_input
    else:
        raise UserError(
            f"cannot tell the input shape of {args.model}: pass --input-shape "
            "(e.g. 1,3,32,32) or --sample x.pt"
        )
    return example, sample


def console():  # -> rich.console.Console
    """A console that does not squeeze tables when the output is a pipe or a file."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)
