"""`ticketc find`: iterative magnitude pruning down to a lottery ticket (RUN_DIR/ticket.pt).

Runs unchanged under torchrun (`torchrun --nproc-per-node N -m ticketc find ...`): the ranks
train together with DistributedDataParallel (gloo), rank 0 writes the run and prints.

Every setting's flag, help text and shown default come from `FindConfig`'s fields, so the help
cannot drift from the defaults the search really uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from typing import Any

from ticketc.commands._common import build_config
from ticketc.errors import UserError
from ticketc.find.config import FindConfig

NAME = "find"
HELP = "find a lottery ticket by iterative magnitude pruning (Frankle & Carbin 2019)"


def _parser_for(hint: Any) -> tuple[Any, str | None]:
    """(argparse type, metavar) for a field's type hint; tuples are comma-separated."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        return (lambda s: tuple(item(v.strip()) for v in s.split(",") if v.strip())), "A,B"
    return base, {int: "N", float: "FRACTION"}.get(base)


def add_config_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    """One `--flag` per field of the config dataclass `cls` that has a help text
    (`metadata["help"]`). Its type comes from `metadata["type"]` or the type hint (bool: a
    switch; tuple: comma-separated), its help ends in the default (`metadata["shown"]`, else
    the field's default). Options left out stay None (switches False), so the dataclass
    supplies every default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = meta["help"].replace("%", "%%")  # argparse formats help with %
        if hints[f.name] is bool:
            p.add_argument(flag, action="store_true", help=text)
            continue
        parse, metavar = _parser_for(hints[f.name])
        parse, metavar = meta.get("type") or parse, meta.get("metavar") or metavar
        shown = str(meta.get("shown") or ("none" if f.default is None else f.default))
        p.add_argument(
            flag,
            type=parse,
            choices=meta.get("choices"),
            metavar=metavar,
            help=f"{text} (default: {shown.replace('%', '%%')})",
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (one folder per level, ticket.pt)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out, or extend "
        "it (more --rounds, a lower --target-density); its data may have moved",
    )
    p.add_argument("--force", action="store_true", help="delete the run in --out and start over")
    add_config_arguments(p, FindConfig)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (terminal) or progress lines (pipe, file)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def config_from_args(args: argparse.Namespace) -> FindConfig:
    names = {f.name for f in dataclasses.fields(FindConfig)}
    # options not given (None) keep the dataclass defaults; switches left off are False, their
    # default too ("--augment no" is a False that is kept)
    kwargs = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.data is not None:
        kwargs["dataset"] = None
    return build_config(FindConfig, **kwargs)


def run(args: argparse.Namespace) -> int:
    import torch

    from ticketc.find import distributed, find_tickets

    config = config_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    quiet = args.json
    ranks = distributed.from_environment()  # under torchrun: this process's rank
    try:
        (result,) = find_tickets(
            [config],
            [args.out],
            resume=args.resume,
            force=args.force,
            progress=not (args.no_progress or quiet),
            log=None if quiet else lambda s: print(s, flush=True),
            ranks=ranks,
        )
    finally:
        distributed.leave(ranks)
    if args.json and ranks.main:
        print(
            json.dumps(
                {
                    "ticket": str(result.ticket_path),
                    "level": result.level,
                    "density": result.density,
                    "test_acc": result.test_acc,
                    "val_acc": None if math.isnan(result.val_acc) else result.val_acc,
                    "selected_by": result.selected_by,
                }
            )
        )
    return 0
