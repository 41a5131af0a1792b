"""The lottery loop: per level, prune -> rewind -> train -> save; every stage resumes from disk.

Run directory of one seed:

    RUN_DIR/config.json             the FindConfig, every default filled in (--resume checks it)
    RUN_DIR/data.json               the data's md5, sizes and shapes (--resume checks the md5)
    RUN_DIR/arch.json               architecture, its factory arguments, the input shape
    RUN_DIR/init.pt                 the dense network's initial state (weights and buffers)
    RUN_DIR/rewind_point.pt         state at iteration K (only with rewind=iteration:K/epoch:E)
    RUN_DIR/level_LL/mask.pt        {param: bool mask} of the ticket at level LL
    RUN_DIR/level_LL/rewind.pt      the rewind-point state the survivors were reset to
    RUN_DIR/level_LL/final.pt       trained state (weights masked, BatchNorm statistics as
                                    trained): what the level's accuracy was measured on
    RUN_DIR/level_LL/controls.pt    trained control networks and their masks (if any)
    RUN_DIR/level_LL/metrics.json   written last: its presence marks the level done
    RUN_DIR/level_LL/partial.pt     mid-level checkpoint while the level trains
    RUN_DIR/ticket.pt               the ticket (ticketc.checkpoint.Ticket)

A "state" is a whole state dict: rewinding restores normalisation layers' running statistics
and affine parameters with the weights, as open_lth does. Several seeds (runs) can be trained
together: their members are stacked into one `Ensemble`, but each run's files stay its own.
A resumed run may grow (more rounds, a lower target density) and may read its data from
another folder if their md5 matches; a run that fails before training anything is removed.
Under torchrun the ranks train together (`ticketc.find.distributed`); rank 0 alone touches
the run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketc.atomic import atomic_path
from ticketc.checkpoint import Ticket, save_ticket
from ticketc.data import Splits, load_dataset, load_user_dataset
from ticketc.data.splits import validation_count
from ticketc.errors import UserError
from ticketc.factory import resolve
from ticketc.find import pruning
from ticketc.find.config import FindConfig
from ticketc.find.distributed import SINGLE, Ranks, broadcast, from_environment, on_main
from ticketc.find.ensemble import Ensemble
from ticketc.find.progress import LevelProgress
from ticketc.find.train import BatchOrder, Checkpoint, History, summarize, train_level
from ticketc.safe_load import load_tensor_dict, read_json, torch_load_safe

Log = Callable[[str], None]


@dataclass(frozen=True)
class FindResult:
    """The ticket of one run: its level, density and final accuracies (fractions in [0, 1]).

    selected_by: "val_acc" (validation accuracy) or "test_acc" (no validation split), the
    metric the ticket was chosen on; val_acc is NaN without a validation split.
    """

    run_dir: Path
    ticket_path: Path
    level: int
    density: float
    test_acc: float
    val_acc: float = math.nan
    selected_by: str = "val_acc"


@dataclass(frozen=True)
class _Member:
    run: int  # index into the runs trained together
    kind: str  # "ticket" or a control name


# ---------------------------------------------------------------------------------------------
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
            raise UserError(f"--model {config.model} needs square images [C, H, W]; "
                            f"{config.data_flag} has inputs of shape {list(shape)}")
        kwargs = {"num_classes": data.num_classes, "in_channels": shape[0], "image_size": shape[1]}
    elif config.model in ("resnet20", "vgg16"):
        smallest = 16 if config.model == "vgg16" else 4  # VGG-16 halves its input four times
        if len(shape) != 3 or min(shape[1:]) < smallest:
            raise UserError(f"--model {config.model} needs images [C, H, W] of at least "
                            f"{smallest}x{smallest} pixels; {config.data_flag} has inputs of "
                            f"shape {list(shape)}")
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
        raise UserError(f"--model {config.model} cannot take the inputs of {config.data_flag} "
                        f"(shape [N, {shape}]): {type(e).__name__}: {first}") from None
    got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == n):
        raise UserError(f"--model {config.model} gives {got} for {n} inputs of {config.data_flag}; "
                        "find trains classifiers: it needs class scores [N, classes]")
    if out.shape[1] < data.num_classes:
        raise UserError(f"--model {config.model} gives {out.shape[1]} class scores, but "
                        f"{config.data_flag} has {data.num_classes} classes (labels 0.."
                        f"{data.num_classes - 1})")


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
    kinds: dict[str, str]  # prunable parameter -> "fc" / "conv" / "output"
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
        kinds = pruning.prunable_parameters(base, biases=cfg.prune_biases, norms=cfg.prune_norms)
    except ValueError as e:
        raise UserError(f"--model {cfg.model}: {e}") from None
    if not cfg.prune_output:  # Frankle et al. 2020 leave the classifier whole
        kinds = {n: k for n, k in kinds.items() if k != "output"}
    if cfg.augment and len(data.input_shape) != 3:
        raise UserError(f"--augment yes crops and flips images [C, H, W]; {cfg.data_flag} has "
                        f"inputs of shape {list(data.input_shape)}: give --augment no")
    params = dict(base.named_parameters())
    sizes = {n: params[n].numel() for n in kinds}
    rates = _rates(cfg, kinds)
    num_rounds = _num_rounds(cfg, sizes, rates)
    one_shot = cfg.one_shot and num_rounds > 0
    levels = [0, 1] if one_shot else list(range(num_rounds + 1))
    if one_shot:
        rates = {n: pruning.compound_rate(r, num_rounds) for n, r in rates.items()}
    if cfg.batch_size > len(data.train):
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {len(data.train)} training "
                        f"samples of {cfg.data_flag} (after --val-size {cfg.val_size})")
    if cfg.batch_size % ranks.world:
        raise UserError(f"--batch-size {cfg.batch_size} (the global batch) does not split evenly "
                        f"over the {ranks.world} ranks: give a multiple of {ranks.world}")
    rewind_it = cfg.rewind_iteration(len(data.train) // cfg.batch_size)
    if rewind_it >= cfg.iterations:
        raise UserError(f"--rewind {cfg.rewind} (iteration {rewind_it}) is not before the end of "
                        f"a level (--iterations {cfg.iterations})")
    if cfg.eval_every > cfg.iterations:
        raise UserError(f"--eval-every {cfg.eval_every} exceeds --iterations {cfg.iterations}: "
                        "each level would be evaluated only at its end; give at most "
                        f"{cfg.iterations} (default: a tenth of --iterations, at most 1000)")
    return Search(cfg, data, kwargs, base, kinds, rates, num_rounds, levels, rewind_it,
                  data.md5())


def _rates(cfg: FindConfig, kinds: dict[str, str]) -> dict[str, float]:
    if cfg.strategy == "global":
        return {n: cfg.global_rate for n in kinds}
    table = {"fc": cfg.fc_rate, "conv": cfg.conv_rate, "output": cfg.output_rate}
    return {n: float(table[k]) for n, k in kinds.items()}  # type: ignore[arg-type]


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


# ---------------------------------------------------------------------------------------------
# Run directories


def _save(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load(path: Path) -> Any:
    # one safe reader for every file of a run directory: a file replaced by a pickle is one line
    return torch_load_safe(path, trust_pickle=False)


def _state(path: Path) -> dict[str, torch.Tensor]:
    """A run file that holds name -> tensor (weights, masks), read safely."""
    return load_tensor_dict(path, "run file")


def _write_json(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def _masked(state: dict[str, torch.Tensor], masks: pruning.Masks) -> dict[str, torch.Tensor]:
    return {n: (t * masks[n] if n in masks else t.clone()) for n, t in state.items()}


# The files a run writes at its top level (level_LL folders besides): what --force removes.
RUN_FILES = ("config.json", "data.json", "arch.json", "init.pt", "rewind_point.pt", "ticket.pt")
_WHAT_TO_DO = "pass --resume to continue it, --force to delete it and start over, or another --out"


class RunDir:
    """One seed's run directory."""

    def __init__(self, config: FindConfig, path: Path) -> None:
        self.config, self.path = config, path
        self._existed = path.exists()

    def level_dir(self, level: int) -> Path:
        return self.path / f"level_{level:02d}"

    def done(self, level: int) -> bool:
        return (self.level_dir(level) / "metrics.json").exists()

    def finished_levels(self) -> list[int]:
        return sorted(int(p.parent.name[len("level_"):])
                      for p in self.path.glob("level_*/metrics.json"))

    def has_progress(self) -> bool:
        """Whether any level finished or checkpointed: something worth resuming."""
        return any(self.path.glob("level_*/metrics.json")) or any(
            self.path.glob("level_*/partial.pt"))

    def clear(self) -> None:
        """Remove the run's own files (RUN_FILES, level_LL folders), nothing else."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for level in self.path.glob("level_[0-9][0-9]"):
            shutil.rmtree(level)

    def discard(self) -> None:
        """Remove what a failed start wrote, and the folder if this run created it."""
        self.clear()
        if not self._existed and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def open_run(config: FindConfig, path: Path, search: Search, *, resume: bool, force: bool,
             log: Log | None) -> RunDir:
    """The run directory of `config` at `path`: new, restarted (`force`, or nothing trained
    yet), or continued (`resume`: same settings and data, possibly more levels).

    Raises UserError saying what to do when the folder holds something else.
    """
    run = RunDir(config, path)
    if (path / "config.json").is_file():
        if force or not run.has_progress():
            if log is not None:
                why = "--force" if force else "it had not trained any level yet"
                log(f"{path}: starting the run over ({why})")
            run.clear()
        elif not resume:
            raise UserError(f"--out {path} already holds a run: {_WHAT_TO_DO}")
        else:
            _check_resumable(run, search)
    elif path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise UserError(f"--out {path} exists and is not a ticketc find run folder: "
                        "give a new or empty folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create run directory {path}: {e.strerror}") from e
    _write_json(config.to_json(), path / "config.json")
    data = search.data
    _write_json({"name": data.name, "md5": search.data_md5, "train": len(data.train),
                 "val": len(data.val), "test": len(data.test),
                 "input_shape": list(data.input_shape), "num_classes": data.num_classes},
                path / "data.json")
    _write_json({"arch": config.arch, "arch_kwargs": search.arch_kwargs,
                 "input_shape": list(data.input_shape)}, path / "arch.json")
    if not (path / "init.pt").exists():
        _save(build(config, search.arch_kwargs, config.seed).state_dict(), path / "init.pt")
    return run


def _check_resumable(run: RunDir, search: Search) -> None:
    """Refuse, naming the setting, a resume that would change the finished levels' results."""
    new = run.config
    # settings a run from before they existed did not write take their defaults
    saved_config = read_json(run.path / "config.json", "run configuration")
    if not isinstance(saved_config, dict):
        raise UserError(f"run configuration {run.path / 'config.json'} is not a JSON object")
    try:
        old = FindConfig.from_json(saved_config).resolved()
    except (TypeError, ValueError) as e:
        raise UserError(f"run configuration {run.path / 'config.json'}: not as ticketc find "
                        f"writes it ({e})") from None
    data_file = run.path / "data.json"
    diff = new.result_differences(old)
    if not data_file.is_file():  # a run from before data.json: where its data were is all we know
        diff += [n for n in ("data_dir", "data") if getattr(old, n) != getattr(new, n)]
    if old.one_shot and (old.rounds, old.target_density) != (new.rounds, new.target_density):
        diff.append("rounds" if new.rounds is not None else "target_density")
    if diff:
        changes = ", ".join(f"--{n.replace('_', '-')} {old.shown(n)} (now {new.shown(n)})"
                            for n in diff)
        raise UserError(f"--out {run.path} was started with other settings: {changes}; pass the "
                        "same values to continue it, --force to start over, or another --out")
    if data_file.is_file():
        described = read_json(data_file, "run data description")
        if not isinstance(described, dict) or "md5" not in described:
            raise UserError(f"run data description {data_file}: has no 'md5' entry")
        saved = described["md5"]
        if saved != search.data_md5:
            raise UserError(
                f"--out {run.path} was trained on other data than {new.data_flag} "
                f"{'(--data-dir ' + str(new.data_dir) + ') ' if new.data_dir else ''}gives "
                f"(md5 {saved}, now {search.data_md5}); pass the data it started with, "
                "--force to start over, or another --out")
    beyond = [lv for lv in run.finished_levels() if lv not in search.levels]
    if beyond:
        flag = (f"--rounds {search.num_rounds}" if new.rounds is not None
                else f"--target-density {new.target_density}")
        raise UserError(f"--out {run.path} has finished levels up to {max(beyond)}; {flag} stops "
                        f"at level {search.levels[-1]}: give --rounds {max(beyond)} or more (or "
                        "a --target-density that low) to continue it")


def _check_group(configs: Sequence[FindConfig]) -> None:
    first = dataclasses.replace(configs[0], seed=0)
    for c in configs[1:]:
        if dataclasses.replace(c, seed=0) != first:
            raise ValueError("runs trained together may differ only in their seed")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs trained together need distinct seeds, got {seeds}")


# ---------------------------------------------------------------------------------------------
# The loop


def find_tickets(
    configs: Sequence[FindConfig],
    run_dirs: Sequence[str | Path],
    *,
    resume: bool = False,
    force: bool = False,
    data: Splits | None = None,
    log: Log | None = print,
    progress: bool = True,
    stop_after_level: int | None = None,
    ranks: Ranks | None = None,
) -> list[FindResult]:
    """Find the lottery ticket of each config (seed), training all of them side by side.

    Iterative magnitude pruning (Frankle & Carbin, ICLR 2019) with rewinding (Frankle et al.
    2020): per level, prune the previous level's smallest-magnitude survivors, rewind the rest
    (with every buffer) to the rewind point, train, save. Everything is checked before any file
    is written; `resume` continues (or extends) the runs in `run_dirs`, `force` starts them
    over. `data`: the splits to use instead of loading `config.dataset` / `config.data`.
    `progress`: a bar on a terminal, else a line per evaluation through `log`.
    Returns one result per run; each run directory ends with `ticket.pt`.
    `stop_after_level` ends early (for benchmarks that budget their time); no ticket then.
    `ranks`: the torchrun ranks training together (default: those of the environment, a
    single one without torchrun); every rank calls this with the same arguments, rank 0
    alone writes and logs, and every rank returns the same results.
    Raises UserError (bad settings, data that do not fit the model, a folder that holds
    another run) naming the flag; ValueError for configs that cannot be trained together.
    """
    if len(configs) != len(run_dirs) or not configs:
        raise ValueError("need one run directory per config")
    ranks = from_environment() if ranks is None else ranks
    if not ranks.main:
        log, progress = None, False
    configs = [c.resolved() for c in configs]
    _check_group(configs)
    resolve(configs[0].arch, "model")  # a bad --model fails before any data is read
    if data is None:
        data = load_data(configs[0])
    elif configs[0].val_size is not None and validation_count(
            configs[0].val_size, len(data.train) + len(data.val)) != len(data.val):
        raise ValueError(f"val_size {configs[0].val_size} does not match the {len(data.val)} "
                         "validation samples of the data given")
    # The run's config states how many samples were held out, whatever rule chose them.
    configs = [dataclasses.replace(c, val_size=len(data.val)) for c in configs]
    search = plan_search(configs[0], data, ranks)
    runs: list[RunDir] = []
    try:
        for c, p in zip(configs, run_dirs, strict=True):
            runs.append(on_main(functools.partial(open_run, c, Path(p), search, resume=resume,
                                                  force=force, log=log), ranks))
        for position, level in enumerate(search.levels):
            pending = broadcast([i for i, r in enumerate(runs) if not r.done(level)]
                                if ranks.main else None, ranks)
            if pending:
                previous = search.levels[position - 1] if position else None
                _run_level(search, runs, pending, level, previous, log, progress, ranks)
            if stop_after_level is not None and level >= stop_after_level:
                return []
    except BaseException:
        if ranks.main:
            for run in runs:
                if not run.has_progress():  # a failed start leaves no folder behind
                    run.discard()
        raise
    return [on_main(functools.partial(_write_ticket, run, search, log, ranks), ranks)
            for run in runs]


@dataclass
class _LevelStart:
    """The members of one level, pruned and rewound, ready to train."""

    members: list[_Member]
    states: list[dict[str, torch.Tensor]]  # each member's starting state (masked)
    masks: list[pruning.Masks]  # each member's masks
    rewind: dict[int, dict[str, torch.Tensor]]  # per run: the state its ticket rewound to
    ticket_masks: dict[int, pruning.Masks]  # per run: its ticket's masks


def _run_level(search: Search, runs: list[RunDir], pending: list[int], level: int,
               previous: int | None, log: Log | None, progress: bool, ranks: Ranks) -> None:
    started = time.perf_counter()
    # rank 0 prunes and rewinds; every rank starts from its masks and weights
    start = on_main(lambda: _prune_and_rewind(search, runs, pending, level, previous), ranks)
    ensemble, history = _train(search, runs, pending, start, level, previous, log, progress,
                               ranks)
    on_main(lambda: _save_level(search, runs, pending, start, ensemble, history, level, previous,
                                time.perf_counter() - started, log, ranks), ranks)


def _prune_and_rewind(search: Search, runs: list[RunDir], pending: list[int], level: int,
                      previous: int | None) -> _LevelStart:
    """Prune each pending run's previous level and rewind the survivors; add the controls."""
    cfg = search.config
    out = _LevelStart([], [], [], {}, {})
    for i in pending:
        run = runs[i]
        masks = _level_masks(search, run, previous)
        rewinds = previous is not None and search.rewind_it > 0
        rewind = _state(run.path / ("rewind_point.pt" if rewinds else "init.pt"))
        out.rewind[i], out.ticket_masks[i] = rewind, masks
        out.members.append(_Member(i, "ticket"))
        out.states.append(_masked(rewind, masks))
        out.masks.append(masks)
        if previous is None:
            continue  # a control of the dense network is the dense network
        if cfg.control_levels is not None and level not in cfg.control_levels:
            continue
        for control in cfg.controls:
            seed_tag = run.config.seed * 1_000 + level
            if control == "reinit":
                fresh = build(cfg, search.arch_kwargs, 7_919 + seed_tag).state_dict()
                out.states.append(_masked(fresh, masks))
                out.masks.append(masks)
            else:  # random-mask
                g = torch.Generator().manual_seed(104_729 + seed_tag)
                random = pruning.random_masks_like(masks, g)
                out.states.append(_masked(rewind, random))
                out.masks.append(random)
            out.members.append(_Member(i, control))
    return out


def _level_masks(search: Search, run: RunDir, previous: int | None) -> pruning.Masks:
    if previous is None:
        return pruning.full_masks(search.base, search.kinds)
    prev_dir = run.level_dir(previous)
    weights, masks = _state(prev_dir / "final.pt"), _state(prev_dir / "mask.pt")
    if search.config.strategy == "global":
        return pruning.prune_global(weights, masks, next(iter(search.rates.values())))
    return pruning.prune_layerwise(weights, masks, search.rates)


def _train(search: Search, runs: list[RunDir], pending: list[int], start: _LevelStart,
           level: int, previous: int | None, log: Log | None, progress: bool, ranks: Ranks,
           ) -> tuple[Ensemble, History]:
    """Train every member of the level, from its last checkpoint if there is one."""
    cfg = search.config
    assert cfg.lr is not None and cfg.iterations is not None and cfg.eval_every is not None
    members = start.members
    assert cfg.optimizer is not None and cfg.weight_decay is not None
    ensemble = Ensemble(search.base, start.states, start.masks, lr=cfg.lr,
                        optimizer=cfg.optimizer, sparse_below=cfg.csr_below,
                        weight_decay=cfg.weight_decay, ranks=ranks)
    order = BatchOrder([runs[m.run].config.seed for m in members], level,
                       len(search.data.train), int(cfg.batch_size or 0))
    first = 0 if previous is None else search.rewind_it
    first, history = _resume_partial(runs, pending, ensemble, level, first, History(), ranks)
    by_run = {i: [k for k, m in enumerate(members) if m.run == i] for i in pending}

    def on_checkpoint(ck: Checkpoint) -> None:
        if not ranks.main:
            return
        for i, idx in by_run.items():
            _save({
                "iteration": ck.iteration,
                "ensemble": ensemble.state(idx),
                "rows": [ck.history.rows[k] for k in idx] if ck.history.rows else [],
                "loss_sum": [ck.history.loss_sum[k] for k in idx],
                "correct_sum": [ck.history.correct_sum[k] for k in idx],
                "seen": ck.history.seen,
            }, runs[i].level_dir(level) / "partial.pt")

    def on_snapshot() -> None:
        if not ranks.main:
            return
        for i, idx in by_run.items():
            path = runs[i].path / "rewind_point.pt"
            if not path.exists():
                _save(ensemble.member_state(idx[0]), path)

    for i in pending if ranks.main else ():
        runs[i].level_dir(level).mkdir(exist_ok=True)
    label = f"level {level} ({100 * pruning.density(start.masks[0]):.1f}% of weights)"
    tickets = [idx[0] for idx in by_run.values()]
    with LevelProgress(LevelProgress.mode_for(progress), label, first, cfg.iterations, log,
                       tickets) as report:
        train_level(
            ensemble, search.data, order, start=first, end=cfg.iterations,
            eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, history=history,
            on_checkpoint=on_checkpoint, on_iteration=report.iteration,
            on_evaluation=report.evaluation,
            snapshot_at=search.rewind_it if previous is None and search.rewind_it else None,
            on_snapshot=on_snapshot, ranks=ranks,
            lr_at=cfg.lr_at if cfg.lr_milestones else None, augment=bool(cfg.augment),
            workers=cfg.workers,
        )
    return ensemble, history


def _save_level(search: Search, runs: list[RunDir], pending: list[int], start: _LevelStart,
                ensemble: Ensemble, history: History, level: int, previous: int | None,
                wall: float, log: Log | None, ranks: Ranks = SINGLE) -> None:
    """Write each run's mask, rewind state, trained state, controls, then metrics.json."""
    members = start.members
    for i in pending:
        idx = [k for k, m in enumerate(members) if m.run == i]
        out, ticket = runs[i].level_dir(level), idx[0]
        _save({n: m.clone() for n, m in start.ticket_masks[i].items()}, out / "mask.pt")
        _save(start.rewind[i], out / "rewind.pt")
        _save(ensemble.member_state(ticket), out / "final.pt")
        if len(idx) > 1:
            _save({members[k].kind: {"state_dict": ensemble.member_state(k),
                                     "masks": {n: m[k].clone() for n, m in ensemble.masks.items()}}
                   for k in idx[1:]}, out / "controls.pt")
        density = pruning.density(start.ticket_masks[i])
        _write_json({
            "level": level,
            "density": density,
            "layer_density": pruning.layer_densities(start.ticket_masks[i]),
            "rewind_point": runs[i].config.rewind,
            "start_iteration": 0 if previous is None else search.rewind_it,
            "iterations": search.config.iterations,
            "seed": runs[i].config.seed,
            "members_trained_together": len(members),
            "ranks": ranks.world,  # processes that trained the level together (torchrun)
            "evaluation_mode": "eval",  # accuracies are those of final.pt as deployed
            "wall_s": wall,
            "members": {
                members[k].kind: {**summarize(history.rows[k]), "history": history.rows[k]}
                for k in idx
            },
        }, out / "metrics.json")
        (out / "partial.pt").unlink(missing_ok=True)
        if log is not None:
            log(f"seed {runs[i].config.seed} level {level}: {100 * density:.1f}% of weights, "
                + "; ".join(_accuracies(members[k].kind, summarize(history.rows[k]))
                            for k in idx) + f" ({wall:.0f} s"
                + (f", {ranks.world} ranks)" if ranks.distributed else ")"))


def _accuracies(kind: str, s: dict[str, float]) -> str:
    val = s["final_val_acc"]
    shown = f"validation {100 * val:.2f}%, " if val == val else ""  # NaN: no validation split
    return f"{kind}: {shown}test {100 * s['final_test_acc']:.2f}%"


def _read_partial(runs: list[RunDir], pending: list[int], level: int) -> list[Any] | None:
    paths = [runs[i].level_dir(level) / "partial.pt" for i in pending]
    if not all(p.exists() for p in paths):
        return None
    parts = [_load(p) for p in paths]
    try:
        if len({p["iteration"] for p in parts}) != 1:
            return None  # killed between two runs' checkpoints: redo the level
    except (KeyError, TypeError) as e:
        names = ", ".join(map(str, paths))
        raise UserError(f"{names}: not a checkpoint of this run ({type(e).__name__}: {e})") from e
    return parts


def _resume_partial(
    runs: list[RunDir], pending: list[int], ensemble: Ensemble, level: int, start: int,
    history: History, ranks: Ranks = SINGLE,
) -> tuple[int, History]:
    parts = on_main(lambda: _read_partial(runs, pending, level), ranks)
    if parts is None:
        return start, history
    try:
        ensemble.load_states([p["ensemble"] for p in parts])
        resumed = History()
        resumed.rows = [row for p in parts for row in p["rows"]] if parts[0]["rows"] else []
        resumed.loss_sum = [v for p in parts for v in p["loss_sum"]]
        resumed.correct_sum = [v for p in parts for v in p["correct_sum"]]
        resumed.seen = parts[0]["seen"]
        return int(parts[0]["iteration"]), resumed
    except (KeyError, TypeError, IndexError, ValueError, AttributeError, RuntimeError) as e:
        names = ", ".join(str(runs[i].level_dir(level) / "partial.pt") for i in pending)
        raise UserError(f"{names}: not a checkpoint of this run ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------
# The ticket


def _write_ticket(run: RunDir, search: Search, log: Log | None,
                  ranks: Ranks = SINGLE) -> FindResult:
    """Pick the sparsest level whose final validation accuracy (test accuracy without a
    validation split) meets the target; write it as ticket.pt."""
    cfg = run.config
    metrics = [read_json(run.level_dir(lv) / "metrics.json", "level metrics")
               for lv in search.levels]
    has_val = len(search.data.val) > 0
    key = "final_val_acc" if has_val else "final_test_acc"

    def accuracy(m: dict[str, Any]) -> float:
        return float(m["members"]["ticket"][key])

    dense = accuracy(metrics[0])
    target = cfg.accuracy_target if cfg.accuracy_target is not None else (
        dense - cfg.max_accuracy_drop)
    meeting = [m for m in metrics if accuracy(m) >= target]
    chosen = min(meeting, key=lambda m: m["density"]) if meeting else metrics[-1]
    level = int(chosen["level"])
    out = run.level_dir(level)
    masks = _state(out / "mask.pt")
    rewind = _masked(_state(out / "rewind.pt"), masks)
    t = chosen["members"]["ticket"]
    ticket = Ticket(
        arch=cfg.arch,
        arch_kwargs=search.arch_kwargs,
        state_dict=_state(out / "final.pt"),
        masks=masks,
        rewind_state_dict=rewind,
        rewind_point="init" if search.rewind_it == 0 else f"iteration:{search.rewind_it}",
        metrics={
            "level": level,
            "density": chosen["density"],
            "layer_density": chosen["layer_density"],
            "selected_by": key.removeprefix("final_"),
            "accuracy_target": target,
            "met_target": bool(meeting),
            "test_acc": t["final_test_acc"],
            "val_acc": t["final_val_acc"],
            "dense_val_acc": metrics[0]["members"]["ticket"]["final_val_acc"],
            "dense_test_acc": metrics[0]["members"]["ticket"]["final_test_acc"],
            "dataset": cfg.dataset or cfg.data,
            "val_size": len(search.data.val),
            "seed": cfg.seed,
            "iterations": cfg.iterations,
            "ranks": sorted({int(m.get("ranks", 1)) for m in metrics}),
        },
    )
    path = run.path / "ticket.pt"
    save_ticket(ticket, path)
    if log is not None:
        name = "validation accuracy" if has_val else "test accuracy (no validation split)"
        drop = f"{100 * cfg.max_accuracy_drop:g} percentage points"
        rule = ("--accuracy-target" if cfg.accuracy_target is not None
                else f"dense {100 * dense:.2f}% - {drop}")
        how = (f"the sparsest level with {name} {100 * accuracy(chosen):.2f}% >= "
               f"{100 * target:.2f}% ({rule})" if meeting else
               f"no level reached {name} {100 * target:.2f}% ({rule}): the last level, at "
               f"{100 * accuracy(chosen):.2f}%")
        log(f"{path}: level {level}, {100 * chosen['density']:.1f}% of weights: {how}; its test "
            f"accuracy {100 * t['final_test_acc']:.2f}% "
            f"(dense {100 * metrics[0]['members']['ticket']['final_test_acc']:.2f}%)"
            + (f"; trained on {ranks.world} ranks (torchrun)" if ranks.distributed else ""))
    return FindResult(run.path, path, level, float(chosen["density"]), float(t["final_test_acc"]),
                      float(t["final_val_acc"]), key.removeprefix("final_"))
