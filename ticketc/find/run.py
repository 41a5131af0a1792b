"""The lottery loop: prune a level, rewind it, train it; every stage resumes from disk.

Run directory of one seed:

    RUN_DIR/config.json             the FindConfig (a resumed run must match it)
    RUN_DIR/arch.json               architecture, its factory arguments, the input shape
    RUN_DIR/init.pt                 the dense network's initial weights
    RUN_DIR/rewind_point.pt         weights at iteration K (only with rewind=iteration:K/epoch:E)
    RUN_DIR/level_LL/mask.pt        {param: bool mask} of the ticket at level LL
    RUN_DIR/level_LL/rewind.pt      the rewind-point weights the survivors were reset to
    RUN_DIR/level_LL/final.pt       trained weights (masked)
    RUN_DIR/level_LL/controls.pt    trained control networks and their masks (if any)
    RUN_DIR/level_LL/metrics.json   written last: its presence marks the level done
    RUN_DIR/level_LL/partial.pt     mid-level checkpoint while the level trains
    RUN_DIR/ticket.pt               the ticket (ticketc.checkpoint.Ticket)

Several seeds (runs) can be trained together: their members are stacked into one `Ensemble`,
but each run's files stay its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
from ticketc.errors import UserError
from ticketc.factory import resolve
from ticketc.find import pruning
from ticketc.find.config import FindConfig
from ticketc.find.ensemble import Ensemble
from ticketc.find.train import BatchOrder, Checkpoint, History, summarize, train_level
from ticketc.safe_load import load_tensor_dict, read_json, torch_load_safe

Log = Callable[[str], None]


@dataclass(frozen=True)
class FindResult:
    run_dir: Path
    ticket_path: Path
    level: int
    density: float
    test_acc: float


@dataclass(frozen=True)
class _Member:
    run: int  # index into the runs trained together
    kind: str  # "ticket" or a control name


def load_data(config: FindConfig) -> Splits:
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
            raise UserError(f"{config.model} needs square images [C, H, W], data has {shape}")
        kwargs = {"num_classes": data.num_classes, "in_channels": shape[0], "image_size": shape[1]}
    kwargs.update(config.arch_kwargs)
    return kwargs


def build(config: FindConfig, kwargs: dict[str, Any], seed: int) -> nn.Module:
    """The architecture with weights drawn from `seed` (the global RNG is left as it was)."""
    factory = resolve(config.arch, "model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model {config.arch!r} returned {type(model).__name__}, not an nn.Module")
    return model


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


class _Run:
    """One seed's run directory."""

    def __init__(self, config: FindConfig, path: Path, resume: bool) -> None:
        self.config, self.path = config, path
        saved = path / "config.json"
        if saved.exists():
            if not resume:
                raise UserError(f"{path} already holds a run: pass --resume or another --out")
            old = read_json(saved, "run configuration")
            if not isinstance(old, dict):
                raise UserError(f"run configuration {saved} is not a JSON object")
            new = config.to_json()
            # A setting the saved config predates counts as its default.
            defaults = {f.name: f.default for f in dataclasses.fields(FindConfig)}
            diff = sorted(
                k for k in set(old) | set(new) if old.get(k, defaults.get(k)) != new.get(k)
            )
            if diff:
                raise UserError(f"{path} was started with other settings ({', '.join(diff)})")
        else:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create run directory {path}: {e.strerror}") from e
            _write_json(config.to_json(), saved)

    def level_dir(self, level: int) -> Path:
        return self.path / f"level_{level:02d}"

    def done(self, level: int) -> bool:
        return (self.level_dir(level) / "metrics.json").exists()


def _check_group(configs: Sequence[FindConfig]) -> None:
    first = dataclasses.replace(configs[0], seed=0)
    for c in configs[1:]:
        if dataclasses.replace(c, seed=0) != first:
            raise ValueError("runs trained together may differ only in their seed")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs trained together need distinct seeds, got {seeds}")


def find_tickets(
    configs: Sequence[FindConfig],
    run_dirs: Sequence[str | Path],
    *,
    resume: bool = False,
    data: Splits | None = None,
    log: Log | None = print,
    progress: bool = True,
    stop_after_level: int | None = None,
) -> list[FindResult]:
    """Find the lottery ticket of each config (seed), training all of them side by side.

    Returns one result per run; each run directory ends with `ticket.pt`.
    `stop_after_level` ends early (for benchmarks that budget their time); no ticket then.
    """
    if len(configs) != len(run_dirs) or not configs:
        raise ValueError("need one run directory per config")
    configs = [c.resolved() for c in configs]
    _check_group(configs)
    cfg = configs[0]
    resolve(cfg.arch, "model")  # a bad --model fails before any data is read
    runs = [_Run(c, Path(p), resume) for c, p in zip(configs, run_dirs, strict=True)]
    data = data if data is not None else load_data(cfg)
    kwargs = arch_kwargs(cfg, data)
    base = build(cfg, kwargs, 0)
    kinds = pruning.prunable_parameters(base, biases=cfg.prune_biases, norms=cfg.prune_norms)
    params = dict(base.named_parameters())
    sizes = {n: params[n].numel() for n in kinds}
    rates = _rates(cfg, kinds)
    num_rounds = _num_rounds(cfg, sizes, rates)
    levels = [0, 1] if cfg.one_shot and num_rounds > 0 else list(range(num_rounds + 1))
    steps_per_epoch = len(data.train) // cfg.batch_size
    rewind_it = cfg.rewind_iteration(steps_per_epoch)
    assert cfg.iterations is not None
    if rewind_it >= cfg.iterations:
        raise UserError(
            f"rewind point {cfg.rewind} is not before the last iteration {cfg.iterations}"
        )
    for run in runs:
        arch = {"arch": cfg.arch, "arch_kwargs": kwargs, "input_shape": list(data.input_shape)}
        _write_json(arch, run.path / "arch.json")
        if not (run.path / "init.pt").exists():
            _save(build(cfg, kwargs, run.config.seed).state_dict(), run.path / "init.pt")

    for position, level in enumerate(levels):
        pending = [i for i, r in enumerate(runs) if not r.done(level)]
        if pending:
            round_rates = (
                {n: pruning.compound_rate(r, num_rounds) for n, r in rates.items()}
                if cfg.one_shot else rates
            )
            _train_one_level(
                cfg, runs, pending, level, levels[position - 1] if position else None,
                round_rates, kwargs, base, data, rewind_it, log, progress,
            )
        if stop_after_level is not None and level >= stop_after_level:
            return []
    return [_write_ticket(run, levels, kwargs, rewind_it, log) for run in runs]


def _rates(cfg: FindConfig, kinds: dict[str, str]) -> dict[str, float]:
    if cfg.strategy == "global":
        return {n: cfg.global_rate for n in kinds}
    table = {"fc": cfg.fc_rate, "conv": cfg.conv_rate, "output": cfg.output_rate}
    return {n: float(table[k]) for n, k in kinds.items()}  # type: ignore[arg-type]


def _num_rounds(cfg: FindConfig, sizes: dict[str, int], rates: dict[str, float]) -> int:
    if cfg.rounds is not None:
        return cfg.rounds
    assert cfg.target_density is not None
    try:
        return pruning.rounds_to_density(sizes, rates, cfg.target_density)
    except ValueError as e:
        raise UserError(str(e)) from None


def _level_masks(
    cfg: FindConfig, run: _Run, level: int, previous: int | None, rates: dict[str, float],
    base: nn.Module, kinds: dict[str, str],
) -> pruning.Masks:
    if previous is None:
        return pruning.full_masks(base, kinds)
    prev_dir = run.level_dir(previous)
    weights, masks = _state(prev_dir / "final.pt"), _state(prev_dir / "mask.pt")
    if cfg.strategy == "global":
        return pruning.prune_global(weights, masks, next(iter(rates.values())))
    return pruning.prune_layerwise(weights, masks, rates)


def _train_one_level(
    cfg: FindConfig, runs: list[_Run], pending: list[int], level: int, previous: int | None,
    rates: dict[str, float], kwargs: dict[str, Any], base: nn.Module, data: Splits,
    rewind_it: int, log: Log | None, progress: bool,
) -> None:
    started = time.perf_counter()
    kinds = pruning.prunable_parameters(base, biases=cfg.prune_biases, norms=cfg.prune_norms)
    members: list[_Member] = []
    states: list[dict[str, torch.Tensor]] = []
    member_masks: list[pruning.Masks] = []
    rewind_states: dict[int, dict[str, torch.Tensor]] = {}
    ticket_masks: dict[int, pruning.Masks] = {}
    for i in pending:
        run = runs[i]
        masks = _level_masks(cfg, run, level, previous, rates, base, kinds)
        rewinds = previous is not None and rewind_it > 0
        rewind_path = run.path / ("rewind_point.pt" if rewinds else "init.pt")
        rewind = _state(rewind_path)
        rewind_states[i], ticket_masks[i] = rewind, masks
        members.append(_Member(i, "ticket"))
        states.append(_masked(rewind, masks))
        member_masks.append(masks)
        if previous is None:
            continue  # a control of the dense network is the dense network
        if cfg.control_levels is not None and level not in cfg.control_levels:
            continue
        for control in cfg.controls:
            seed_tag = run.config.seed * 1_000 + level
            if control == "reinit":
                fresh = build(cfg, kwargs, 7_919 + seed_tag).state_dict()
                states.append(_masked(fresh, masks))
                member_masks.append(masks)
            else:  # random-mask
                g = torch.Generator().manual_seed(104_729 + seed_tag)
                random = pruning.random_masks_like(masks, g)
                states.append(_masked(rewind, random))
                member_masks.append(random)
            members.append(_Member(i, control))
    assert cfg.lr is not None and cfg.iterations is not None
    ensemble = Ensemble(base, states, member_masks, lr=cfg.lr, optimizer=cfg.optimizer,
                        sparse_below=cfg.csr_below)
    order = BatchOrder([runs[m.run].config.seed for m in members], level, len(data.train),
                       cfg.batch_size)
    start = 0 if previous is None else rewind_it
    history = History()
    start, history = _resume_partial(runs, pending, members, ensemble, level, start, history)
    by_run = {i: [k for k, m in enumerate(members) if m.run == i] for i in pending}

    def on_checkpoint(ck: Checkpoint) -> None:
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
        for i, idx in by_run.items():
            path = runs[i].path / "rewind_point.pt"
            if not path.exists():
                _save(ensemble.member_state(idx[0]), path)

    for i in pending:
        runs[i].level_dir(level).mkdir(exist_ok=True)
    density = pruning.density(member_masks[0])
    label = f"level {level} ({100 * density:.1f}% of weights)"
    with _ProgressBar(progress, label, cfg.iterations - start) as advance:
        train_level(
            ensemble, data, order, start=start, end=cfg.iterations, eval_every=cfg.eval_every,
            checkpoint_every=cfg.checkpoint_every, history=history,
            on_checkpoint=on_checkpoint, on_iteration=advance,
            snapshot_at=rewind_it if previous is None and rewind_it else None,
            on_snapshot=on_snapshot,
        )
    wall = time.perf_counter() - started
    for i, idx in by_run.items():
        out = runs[i].level_dir(level)
        ticket = idx[0]
        _save({n: m.clone() for n, m in ticket_masks[i].items()}, out / "mask.pt")
        _save(rewind_states[i], out / "rewind.pt")
        _save(ensemble.member_state(ticket), out / "final.pt")
        if len(idx) > 1:
            _save({members[k].kind: {"state_dict": ensemble.member_state(k),
                                     "masks": {n: m[k].clone() for n, m in ensemble.masks.items()}}
                   for k in idx[1:]}, out / "controls.pt")
        _write_json({
            "level": level,
            "density": pruning.density(ticket_masks[i]),
            "layer_density": pruning.layer_densities(ticket_masks[i]),
            "rewind_point": runs[i].config.rewind,
            "start_iteration": 0 if previous is None else rewind_it,
            "iterations": cfg.iterations,
            "seed": runs[i].config.seed,
            "members_trained_together": len(members),
            "wall_s": wall,
            "members": {
                members[k].kind: {**summarize(history.rows[k]), "history": history.rows[k]}
                for k in idx
            },
        }, out / "metrics.json")
        (out / "partial.pt").unlink(missing_ok=True)
        if log is not None:
            s = summarize(history.rows[ticket])
            controls = "".join(
                f", {members[k].kind} {100 * summarize(history.rows[k])['final_test_acc']:.2f}%"
                for k in idx[1:]
            )
            log(f"seed {runs[i].config.seed} level {level}: {100 * density:.1f}% weights, "
                f"test acc {100 * s['final_test_acc']:.2f}%{controls} "
                f"(early stop {s['early_stop_iteration']}), {wall:.0f} s")


def _resume_partial(
    runs: list[_Run], pending: list[int], members: list[_Member], ensemble: Ensemble,
    level: int, start: int, history: History,
) -> tuple[int, History]:
    paths = [runs[i].level_dir(level) / "partial.pt" for i in pending]
    if not all(p.exists() for p in paths):
        return start, history
    parts = [_load(p) for p in paths]
    try:
        if len({p["iteration"] for p in parts}) != 1:
            return start, history  # killed between two runs' checkpoints: redo the level
        ensemble.load_states([p["ensemble"] for p in parts])
        resumed = History()
        resumed.rows = [row for p in parts for row in p["rows"]] if parts[0]["rows"] else []
        resumed.loss_sum = [v for p in parts for v in p["loss_sum"]]
        resumed.correct_sum = [v for p in parts for v in p["correct_sum"]]
        resumed.seen = parts[0]["seen"]
        return int(parts[0]["iteration"]), resumed
    except (KeyError, TypeError, IndexError, ValueError, AttributeError, RuntimeError) as e:
        names = ", ".join(map(str, paths))
        raise UserError(f"{names}: not a checkpoint of this run ({type(e).__name__}: {e})") from e


class _ProgressBar:
    """A rich progress bar with ETA; a no-op when disabled."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled, label, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda it: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total)
        count = [0]

        def advance(it: int) -> None:
            count[0] += 1
            if count[0] % 50 == 0 or count[0] == self.total:
                self.bar.update(task, completed=count[0])

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(None, None, None)


def _write_ticket(
    run: _Run, levels: list[int], kwargs: dict[str, Any], rewind_it: int, log: Log | None
) -> FindResult:
    cfg = run.config
    metrics = [read_json(run.level_dir(lv) / "metrics.json", "level metrics") for lv in levels]

    def accuracy(m: dict[str, Any]) -> float:
        t = m["members"]["ticket"]
        val = t["final_val_acc"]
        return float(val if val == val else t["final_test_acc"])  # NaN: no validation split

    target = (cfg.accuracy_target if cfg.accuracy_target is not None
              else accuracy(metrics[0]) - cfg.max_accuracy_drop)
    meeting = [m for m in metrics if accuracy(m) >= target]
    chosen = min(meeting, key=lambda m: m["density"]) if meeting else metrics[-1]
    level = int(chosen["level"])
    out = run.level_dir(level)
    masks = _state(out / "mask.pt")
    rewind = _masked(_state(out / "rewind.pt"), masks)
    ticket = Ticket(
        arch=cfg.arch,
        arch_kwargs=kwargs,
        state_dict=_state(out / "final.pt"),
        masks=masks,
        rewind_state_dict=rewind,
        rewind_point="init" if rewind_it == 0 else f"iteration:{rewind_it}",
        metrics={
            "level": level,
            "density": chosen["density"],
            "layer_density": chosen["layer_density"],
            "accuracy_target": target,
            "met_target": bool(meeting),
            "test_acc": chosen["members"]["ticket"]["final_test_acc"],
            "val_acc": chosen["members"]["ticket"]["final_val_acc"],
            "dense_test_acc": metrics[0]["members"]["ticket"]["final_test_acc"],
            "dataset": cfg.dataset or cfg.data,
            "seed": cfg.seed,
            "iterations": cfg.iterations,
        },
    )
    path = run.path / "ticket.pt"
    save_ticket(ticket, path)
    if log is not None:
        how = "sparsest level meeting" if meeting else "last level; none met"
        log(f"{path}: level {level}, {100 * chosen['density']:.1f}% of weights, test acc "
            f"{100 * ticket.metrics['test_acc']:.2f}% ({how} the target {100 * target:.2f}%)")
    return FindResult(run.path, path, level, float(chosen["density"]),
                      float(ticket.metrics["test_acc"]))
