"""The search every run trained together shares: data, architecture, levels, rates, rewind point.

`plan_search` checks a resolved `FindConfig` against the data before any file is written and
derives what the lottery loop needs from them (a `Search`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ticketc.data import Splits, load_dataset, load_user_dataset
from ticketc.errors import UserError
from ticketc.factory import resolve
from ticketc.find import pruning
from ticketc.find.config import EVAL_EVERY_MAX, FindConfig
from ticketc.find.distributed import SINGLE, Ranks

# Data and architecture


def load_data(config: FindConfig) -> Splits:
    """The dataset of `config`, with `config.val_size` training samples held out."""
    if config.data is not None:
        return load_user_dataset(config.data, val_size=config.val_size)
    assert config.dataset is not None
    return load_dataset(config.dataset, config.data_dir, val_size=config.val_size)


def arch_kwargs(config: FindConfig, data: Splits) -> dict[str, Any]:
    """Factory arguments that fit the built-in architectures to the dataset's shapes."""
    kwargs: dict[str, Any] = {}
    shape = data.input_shape
    if config.model == "lenet300":
        kwargs = {"num_classes": data.num_classes, "in_features": math.prod(shape)}
    elif config.model in ("conv2", "conv4", "conv6"):
        if len(shape) != 3 or shape[1] != shape[2]:
            raise UserError(
                f"--model {config.model} needs square images [C, H, W]; "
                f"{config.data_flag} has inputs of shape {list(shape)}"
            )
        kwargs = {"num_classes": data.num_classes, "in_channels": shape[0], "image_size": shape[1]}
    elif config.model in ("resnet20", "vgg16"):
        smallest = 16 if config.model == "vgg16" else 4  # VGG-16 halves its input four times
        if len(shape) != 3 or min(shape[1:]) < smallest:
            raise UserError(
                f"--model {config.model} needs images [C, H, W] of at least "
                f"{smallest}x{smallest} pixels; {config.data_flag} has inputs of "
                f"shape {list(shape)}"
            )
        kwargs = {"num_classes": data.num_classes, "in_channels": shape[0]}
    kwargs.update(config.arch_kwargs)
    return kwargs


def build(config: FindConfig, kwargs: dict[str, Any], seed: int) -> nn.Module:
    """The architecture with weights drawn from `seed` (the global RNG is left as it was)."""
    factory = resolve(config.arch, "model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {config.arch} returned {type(model).__name__}, not an nn.Module")
    return model


def _check_model_fits(model: nn.Module, config: FindConfig, data: Splits) -> None:
    """A forward pass of two training inputs (eval mode, on a copy): the model must take the
    data's inputs and give at least one score per class. Raises UserError naming the flags."""
    shape = ", ".join(str(d) for d in data.input_shape)
    n = min(2, len(data.train))
    try:
        with torch.no_grad():
            out = copy.deepcopy(model).eval()(data.train.inputs(slice(0, n)))
    except Exception as e:  # noqa: BLE001 - whatever the user's forward raises, say which flags
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(
            f"--model {config.model} cannot take the inputs of {config.data_flag} "
            f"(shape [N, {shape}]): {type(e).__name__}: {first}"
        ) from None
    got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == n):
        raise UserError(
            f"--model {config.model} gives {got} for {n} inputs of {config.data_flag}; "
            "find trains classifiers: it needs class scores [N, classes]"
        )
    if out.shape[1] < data.num_classes:
        raise UserError(
            f"--model {config.model} gives {out.shape[1]} class scores, but "
            f"{config.data_flag} has {data.num_classes} classes (labels 0.."
            f"{data.num_classes - 1})"
        )


# ---------------------------------------------------------------------------------------------
# The search: what every run trained together shares


@dataclass(frozen=True)
class Search:
    """Everything derived once from the (resolved) config and the data, shared by the runs
    trained together."""

    config: FindConfig  # resolved, val_size the count held out
    data: Splits
    arch_kwargs: dict[str, Any]
    base: nn.Module  # the architecture (seed 0), never trained
    layer_types: dict[str, str]  # prunable parameter -> "fc" / "conv" / "output"
    rates: dict[str, float]  # fraction of each prunable parameter's survivors pruned per level
    num_rounds: int
    levels: list[int]
    rewind_it: int
    data_md5: str


def plan_search(config: FindConfig, data: Splits, ranks: Ranks = SINGLE) -> Search:
    """Check the config against the data and derive the levels, rates and rewind point.

    Raises UserError naming the flag when they do not fit together.
    """
    cfg = config
    assert cfg.iterations is not None and cfg.eval_every is not None
    assert cfg.batch_size is not None, "plan_search takes a resolved config"
    kwargs = arch_kwargs(cfg, data)
    base = build(cfg, kwargs, 0)
    _check_model_fits(base, cfg, data)
    try:
        layer_types = pruning.prunable_parameters(
            base, biases=cfg.prune_biases, norms=cfg.prune_norms
        )
    except ValueError as e:
        raise UserError(f"--model {cfg.model}: {e}") from None
    if not cfg.prune_output:  # Frankle et al. 2020 leave the classifier whole
        layer_types = {n: t for n, t in layer_types.items() if t != "output"}
    if cfg.augment and len(data.input_shape) != 3:
        raise UserError(
            f"--augment yes crops and flips images [C, H, W]; {cfg.data_flag} has "
            f"inputs of shape {list(data.input_shape)}: give --augment no"
        )
    params = dict(base.named_parameters())
    sizes = {n: params[n].numel() for n in layer_types}
    rates = _rates(cfg, layer_types)
    num_rounds = _num_rounds(cfg, sizes, rates)
    one_shot = cfg.one_shot and num_rounds > 0
    levels = [0, 1] if one_shot else list(range(num_rounds + 1))
    if one_shot:
        rates = {n: pruning.compound_rate(r, num_rounds) for n, r in rates.items()}
    if cfg.batch_size > len(data.train):
        raise UserError(
            f"--batch-size {cfg.batch_size} exceeds the {len(data.train)} training "
            f"samples of {cfg.data_flag} (after --val-size {cfg.val_size})"
        )
    if cfg.batch_size % ranks.world:
        raise UserError(
            f"--batch-size {cfg.batch_size} (the global batch) does not split evenly "
            f"over the {ranks.world} ranks: give a multiple of {ranks.world}"
        )
    rewind_it = cfg.rewind_iteration(len(data.train) // cfg.batch_size)
    if rewind_it >= cfg.iterations:
        raise UserError(
            f"--rewind {cfg.rewind} (iteration {rewind_it}) is not before the end of "
            f"a level (--iterations {cfg.iterations})"
        )
    if cfg.eval_every > cfg.iterations:
        raise UserError(
            f"--eval-every {cfg.eval_every} exceeds --iterations {cfg.iterations}: "
            "each level would be evaluated only at its end; give at most "
            f"{cfg.iterations} (default: a tenth of --iterations, at most "
            f"{EVAL_EVERY_MAX})"
        )
    return Search(
        cfg, data, kwargs, base, layer_types, rates, num_rounds, levels, rewind_it, data.md5()
    )


def _rates(cfg: FindConfig, layer_types: dict[str, str]) -> dict[str, float]:
    if cfg.strategy == "global":
        return {n: cfg.global_rate for n in layer_types}
    table = {"fc": cfg.fc_rate, "conv": cfg.conv_rate, "output": cfg.output_rate}
    return {n: float(table[t]) for n, t in layer_types.items()}  # type: ignore[arg-type]


def _num_rounds(cfg: FindConfig, sizes: dict[str, int], rates: dict[str, float]) -> int:
    if cfg.rounds is not None:
        return cfg.rounds
    assert cfg.target_density is not None
    if cfg.strategy == "global":  # one count over all layers, rounded once per round
        sizes, rates = {"all": sum(sizes.values())}, {"all": cfg.global_rate}
    try:
        return pruning.rounds_to_density(sizes, rates, cfg.target_density)
    except ValueError as e:
        raise UserError(f"--target-density: {e}") from None
