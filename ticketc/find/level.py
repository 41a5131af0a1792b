"""One level of the lottery loop, as stages over a `Level` value: prune -> rewind -> train -> save.

`prune` and `rewind` run on rank 0 (they read the run directories); `train` runs on every rank;
`save` writes each run's level folder, `metrics.json` last (its presence marks the level done).
Every stage takes the level and returns what it made; none keeps state between levels.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ticketc.errors import UserError
from ticketc.find import pruning
from ticketc.find.distributed import SINGLE, Ranks, on_main
from ticketc.find.ensemble import Ensemble
from ticketc.find.progress import LevelProgress
from ticketc.find.rundir import Log, RunDir, load, load_state, save, write_json
from ticketc.find.search import Search, build
from ticketc.find.train import BatchOrder, Checkpoint, History, summarize, train_level

State = dict[str, torch.Tensor]  # a whole state dict: weights and buffers


def masked_state(state: State, masks: pruning.Masks) -> State:
    """A copy of `state` with each masked tensor multiplied by its mask."""
    return {n: (t * masks[n] if n in masks else t.clone()) for n, t in state.items()}


@dataclass(frozen=True)
class Member:
    """One network trained in a level: a run's ticket or one of its controls."""

    run: int  # index into the runs trained together
    role: str  # "ticket" or a control name ("reinit", "random-mask")
    state: State  # the state it starts training from (masked)
    masks: pruning.Masks


@dataclass(frozen=True)
class Level:
    """One level of the runs that have not finished it, filled in stage by stage."""

    index: int
    previous: int | None  # the level pruned to make this one; None: the dense network
    pending: list[int]  # the runs (indices into the runs trained together) training it
    masks: dict[int, pruning.Masks] = field(default_factory=dict)  # per run: its ticket's
    rewind: dict[int, State] = field(default_factory=dict)  # per run: the state rewound to
    members: list[Member] = field(default_factory=list)  # tickets and controls, training order

    def members_of(self, run: int) -> list[int]:
        """Indices into `members` of `run`'s networks, its ticket first."""
        return [k for k, m in enumerate(self.members) if m.run == run]

    def first_iteration(self, search: Search) -> int:
        """The iteration training starts from: 0 for the dense network, else the rewind point."""
        return 0 if self.previous is None else search.rewind_it


@dataclass(frozen=True)
class Trained:
    """The level's members after training, with their evaluations."""

    ensemble: Ensemble
    history: History


# ---------------------------------------------------------------------------------------------
# prune -> rewind (rank 0)


def prune(search: Search, runs: list[RunDir], level: Level) -> Level:
    """Each pending run's masks: all ones at the dense level, else its previous level's trained
    weights pruned by magnitude (layerwise or global, as the config says)."""
    return dataclasses.replace(
        level, masks={i: _pruned_masks(search, runs[i], level.previous) for i in level.pending}
    )


def _pruned_masks(search: Search, run: RunDir, previous: int | None) -> pruning.Masks:
    if previous is None:
        return pruning.full_masks(search.base, search.layer_types)
    prev_dir = run.level_dir(previous)
    weights, masks = load_state(prev_dir / "final.pt"), load_state(prev_dir / "mask.pt")
    if search.config.strategy == "global":
        return pruning.prune_global(weights, masks, next(iter(search.rates.values())))
    return pruning.prune_layerwise(weights, masks, search.rates)


def rewind(search: Search, runs: list[RunDir], level: Level) -> Level:
    """Reset each pending run's survivors (with every buffer) to the rewind point, and add the
    controls of the level: the members to train, each run's ticket first."""
    rewinds = level.previous is not None and search.rewind_it > 0
    states = {
        i: load_state(runs[i].path / ("rewind_point.pt" if rewinds else "init.pt"))
        for i in level.pending
    }
    members: list[Member] = []
    for i in level.pending:
        masks = level.masks[i]
        members.append(Member(i, "ticket", masked_state(states[i], masks), masks))
        members += _controls(search, runs[i], level, i, states[i])
    return dataclasses.replace(level, rewind=states, members=members)


def _controls(search: Search, run: RunDir, level: Level, i: int, rewound: State) -> list[Member]:
    """The control networks of run `i` at this level (none at the dense level, whose control
    is the dense network itself): a reinitialised ticket, or a random mask of the same size."""
    cfg = search.config
    if level.previous is None:
        return []
    if cfg.control_levels is not None and level.index not in cfg.control_levels:
        return []
    masks = level.masks[i]
    seed_tag = run.config.seed * 1_000 + level.index
    controls = []
    for control in cfg.controls:
        if control == "reinit":
            fresh = build(cfg, search.arch_kwargs, 7_919 + seed_tag).state_dict()
            controls.append(Member(i, control, masked_state(fresh, masks), masks))
        else:  # random-mask
            g = torch.Generator().manual_seed(104_729 + seed_tag)
            random = pruning.random_masks_like(masks, g)
            controls.append(Member(i, control, masked_state(rewound, random), random))
    return controls


# ---------------------------------------------------------------------------------------------
# train (every rank)


def train(
    search: Search, runs: list[RunDir], level: Level, log: Log | None, progress: bool, ranks: Ranks
) -> Trained:
    """Train every member of the level, from its last checkpoint if there is one."""
    cfg = search.config
    assert cfg.iterations is not None and cfg.eval_every is not None
    ensemble = _ensemble(search, level, ranks)
    order = BatchOrder(
        [runs[m.run].config.seed for m in level.members],
        level.index,
        len(search.data.train),
        int(cfg.batch_size or 0),
    )
    first, history = _resume(search, runs, level, ensemble, ranks)
    for i in level.pending if ranks.main else ():
        runs[i].level_dir(level.index).mkdir(exist_ok=True)
    dense = level.previous is None
    label = f"level {level.index} ({100 * pruning.density(level.members[0].masks):.1f}% of weights)"
    tickets = [level.members_of(i)[0] for i in level.pending]
    with LevelProgress(
        LevelProgress.mode_for(progress), label, first, cfg.iterations, log, tickets
    ) as report:
        train_level(
            ensemble,
            search.data,
            order,
            start=first,
            end=cfg.iterations,
            eval_every=cfg.eval_every,
            checkpoint_every=cfg.checkpoint_every,
            history=history,
            on_checkpoint=functools.partial(_save_partial, runs, level, ensemble, ranks),
            on_iteration=report.iteration,
            on_evaluation=report.evaluation,
            snapshot_at=search.rewind_it if dense and search.rewind_it else None,
            on_snapshot=functools.partial(_save_rewind_point, runs, level, ensemble, ranks),
            ranks=ranks,
            lr_at=cfg.lr_at if cfg.lr_milestones else None,
            augment=bool(cfg.augment),
            workers=cfg.workers,
        )
    return Trained(ensemble, history)


def _ensemble(search: Search, level: Level, ranks: Ranks) -> Ensemble:
    cfg = search.config
    assert cfg.lr is not None and cfg.optimizer is not None and cfg.weight_decay is not None
    return Ensemble(
        search.base,
        [m.state for m in level.members],
        [m.masks for m in level.members],
        lr=cfg.lr,
        optimizer=cfg.optimizer,
        sparse_below=cfg.csr_below,
        weight_decay=cfg.weight_decay,
        ranks=ranks,
    )


def _save_partial(
    runs: list[RunDir], level: Level, ensemble: Ensemble, ranks: Ranks, ck: Checkpoint
) -> None:
    """The mid-level checkpoint of each pending run (rank 0 writes)."""
    if not ranks.main:
        return
    for i in level.pending:
        idx = level.members_of(i)
        save(
            {
                "iteration": ck.iteration,
                "ensemble": ensemble.state(idx),
                "rows": [ck.history.rows[k] for k in idx] if ck.history.rows else [],
                "loss_sum": [ck.history.loss_sum[k] for k in idx],
                "correct_sum": [ck.history.correct_sum[k] for k in idx],
                "seen": ck.history.seen,
            },
            runs[i].level_dir(level.index) / "partial.pt",
        )


def _save_rewind_point(runs: list[RunDir], level: Level, ensemble: Ensemble, ranks: Ranks) -> None:
    """Each pending run's ticket state at the rewind iteration, unless it is saved already."""
    if not ranks.main:
        return
    for i in level.pending:
        path = runs[i].path / "rewind_point.pt"
        if not path.exists():
            save(ensemble.member_state(level.members_of(i)[0]), path)


def _resume(
    search: Search, runs: list[RunDir], level: Level, ensemble: Ensemble, ranks: Ranks
) -> tuple[int, History]:
    """The iteration and history to continue from: the level's start, or its checkpoint (whose
    weights are loaded into `ensemble`) when every pending run holds one of the same iteration."""
    parts = on_main(lambda: _read_partial(runs, level), ranks)
    if parts is None:
        return level.first_iteration(search), History()
    try:
        ensemble.load_states([p["ensemble"] for p in parts])
        resumed = History()
        resumed.rows = [row for p in parts for row in p["rows"]] if parts[0]["rows"] else []
        resumed.loss_sum = [v for p in parts for v in p["loss_sum"]]
        resumed.correct_sum = [v for p in parts for v in p["correct_sum"]]
        resumed.seen = parts[0]["seen"]
        return int(parts[0]["iteration"]), resumed
    except (KeyError, TypeError, IndexError, ValueError, AttributeError, RuntimeError) as e:
        raise _not_a_checkpoint(runs, level, e) from e


def _read_partial(runs: list[RunDir], level: Level) -> list[Any] | None:
    paths = [runs[i].level_dir(level.index) / "partial.pt" for i in level.pending]
    if not all(p.exists() for p in paths):
        return None
    parts = [load(p) for p in paths]
    try:
        if len({p["iteration"] for p in parts}) != 1:
            return None  # killed between two runs' checkpoints: redo the level
    except (KeyError, TypeError) as e:
        raise _not_a_checkpoint(runs, level, e) from e
    return parts


def _not_a_checkpoint(runs: list[RunDir], level: Level, e: Exception) -> UserError:
    names = ", ".join(str(runs[i].level_dir(level.index) / "partial.pt") for i in level.pending)
    return UserError(f"{names}: not a checkpoint of this run ({type(e).__name__}: {e})")


# ---------------------------------------------------------------------------------------------
# save (rank 0)


def save_level(
    search: Search,
    runs: list[RunDir],
    level: Level,
    trained: Trained,
    wall: float,
    log: Log | None,
    ranks: Ranks = SINGLE,
) -> None:
    """Write each run's mask, rewind state, trained state, controls, then metrics.json."""
    for i in level.pending:
        out = runs[i].level_dir(level.index)
        _save_networks(level, i, trained.ensemble, out)
        metrics = _metrics(search, runs[i], level, i, trained.history, wall, ranks)
        write_json(metrics, out / "metrics.json")
        (out / "partial.pt").unlink(missing_ok=True)
        if log is not None:
            log(_summary(runs[i], level, metrics, wall, ranks))


def _save_networks(level: Level, i: int, ensemble: Ensemble, out: Path) -> None:
    idx = level.members_of(i)
    save({n: m.clone() for n, m in level.masks[i].items()}, out / "mask.pt")
    save(level.rewind[i], out / "rewind.pt")
    save(ensemble.member_state(idx[0]), out / "final.pt")
    if len(idx) > 1:
        save(
            {
                level.members[k].role: {
                    "state_dict": ensemble.member_state(k),
                    "masks": {n: m[k].clone() for n, m in ensemble.masks.items()},
                }
                for k in idx[1:]
            },
            out / "controls.pt",
        )


def _metrics(
    search: Search, run: RunDir, level: Level, i: int, history: History, wall: float, ranks: Ranks
) -> dict[str, Any]:
    masks = level.masks[i]
    return {
        "level": level.index,
        "density": pruning.density(masks),
        "layer_density": pruning.layer_densities(masks),
        "rewind_point": run.config.rewind,
        "start_iteration": level.first_iteration(search),
        "iterations": search.config.iterations,
        "seed": run.config.seed,
        "members_trained_together": len(level.members),
        "ranks": ranks.world,  # processes that trained the level together (torchrun)
        "evaluation_mode": "eval",  # accuracies are those of final.pt as deployed
        "wall_s": wall,
        "members": {
            level.members[k].role: {**summarize(history.rows[k]), "history": history.rows[k]}
            for k in level.members_of(i)
        },
    }


def _summary(run: RunDir, level: Level, metrics: dict[str, Any], wall: float, ranks: Ranks) -> str:
    accuracies = "; ".join(_accuracies(role, m) for role, m in metrics["members"].items())
    return (
        f"seed {run.config.seed} level {level.index}: {100 * metrics['density']:.1f}% of "
        f"weights, {accuracies} ({wall:.0f} s"
        + (f", {ranks.world} ranks)" if ranks.distributed else ")")
    )


def _accuracies(role: str, s: dict[str, float]) -> str:
    val = s["final_val_acc"]
    shown = f"validation {100 * val:.2f}%, " if val == val else ""  # NaN: no validation split
    return f"{role}: {shown}test {100 * s['final_test_acc']:.2f}%"
