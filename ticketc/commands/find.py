"""`ticketc find`: iterative magnitude pruning down to a lottery ticket (RUN_DIR/ticket.pt)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ticketc.errors import UserError
from ticketc.find.config import CONTROLS, OPTIMIZERS, PAPER, STRATEGIES, FindConfig

NAME = "find"
HELP = "find a lottery ticket by iterative magnitude pruning (Frankle & Carbin 2019)"

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FindConfig)}


def _paper(field: str) -> str:
    per_model = ", ".join(f"{name} {getattr(p, field):g}" for name, p in PAPER.items())
    return f"default as in the paper: {per_model}; user models as lenet300"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (one folder per level, ticket.pt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--model", help=f"lenet300, conv2, conv4, conv6 or module.path:factory "
                   "(runs code: imports and calls the factory) "
                   f"(default {_DEFAULTS['model']})")
    p.add_argument("--dataset", choices=("mnist", "cifar10"),
                   help=f"built-in dataset (default {_DEFAULTS['dataset']})")
    p.add_argument("--data-dir", help="dataset folder (MNIST: also $TICKETC_MNIST_DIR)")
    p.add_argument("--data", help="(runs code) user dataset module.path:factory, imported and "
                   "called (instead of --dataset)")
    p.add_argument("--rounds", type=int, help="pruning rounds (default 15 unless --target-density)")
    p.add_argument("--target-density", type=float,
                   help="prune until at most this fraction of the weights remains")
    p.add_argument("--one-shot", action="store_true", help="prune once, straight to the target")
    p.add_argument("--iterations", type=int, help=f"iterations per level ({_paper('iterations')})")
    p.add_argument("--batch-size", type=int, help=f"default {_DEFAULTS['batch_size']}")
    p.add_argument("--lr", type=float, help=f"learning rate ({_paper('lr')})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {_DEFAULTS['optimizer']}")
    p.add_argument("--strategy", choices=STRATEGIES, help=f"default {_DEFAULTS['strategy']}")
    p.add_argument("--fc-rate", type=float, help="fraction of fully connected weights pruned per "
                   "round (default 0.2)")
    p.add_argument("--conv-rate", type=float, help="per round for conv layers (default 0.1; "
                   "0.15 for conv6)")
    p.add_argument("--output-rate", type=float, help="per round for the output layer (default 0.1)")
    p.add_argument("--global-rate", type=float,
                   help=f"per round with --strategy global (default {_DEFAULTS['global_rate']})")
    p.add_argument("--prune-biases", action="store_true", help="prune biases too")
    p.add_argument("--prune-norms", action="store_true", help="prune normalisation layers too")
    p.add_argument("--rewind", help="init, iteration:K or epoch:E "
                   f"(default {_DEFAULTS['rewind']})")
    p.add_argument("--controls", help=f"comma-separated controls: {', '.join(CONTROLS)}")
    p.add_argument("--seed", type=int, help=f"default {_DEFAULTS['seed']}")
    p.add_argument("--val-size", type=int, help="training samples held out for validation "
                   f"(default {_DEFAULTS['val_size']})")
    p.add_argument("--eval-every", type=int, help=f"default {_DEFAULTS['eval_every']}")
    p.add_argument("--checkpoint-every", type=int, help=f"default {_DEFAULTS['checkpoint_every']}")
    p.add_argument("--accuracy-target", type=float, help="the ticket is the sparsest level with "
                   "at least this accuracy (default: dense accuracy - --max-accuracy-drop)")
    p.add_argument("--max-accuracy-drop", type=float,
                   help=f"default {_DEFAULTS['max_accuracy_drop']}")
    p.add_argument("--csr-below", type=float, help="train an MLP's layers in CSR form once "
                   f"their density is below this (default {_DEFAULTS['csr_below']}; 0: never)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def config_from_args(args: argparse.Namespace) -> FindConfig:
    names = {f.name for f in dataclasses.fields(FindConfig)}
    # store_true flags left off and options not given keep the dataclass defaults
    kwargs = {
        k: v for k, v in vars(args).items() if k in names and v is not None and v is not False
    }
    if args.data is not None:
        kwargs["dataset"] = None
    if args.controls is not None:
        kwargs["controls"] = tuple(c.strip() for c in args.controls.split(",") if c.strip())
    try:
        return FindConfig(**kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ticketc.find import find_tickets

    config = config_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    quiet = args.json
    (result,) = find_tickets([config], [args.out], resume=args.resume,
                             progress=not (args.no_progress or quiet),
                             log=None if quiet else print)
    if args.json:
        print(json.dumps({"ticket": str(result.ticket_path), "level": result.level,
                          "density": result.density, "test_acc": result.test_acc}))
    return 0
