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

Modules: `search` (config + data -> levels, rates, rewind point), `rundir` (the files above),
`level` (one level's stages over a `Level` value), `choose` (the ticket of a finished run).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path

from ticketc.data import Splits
from ticketc.data.splits import validation_count
from ticketc.factory import resolve
from ticketc.find.choose import FindResult, write_ticket
from ticketc.find.config import FindConfig
from ticketc.find.distributed import Ranks, broadcast, from_environment, on_main
from ticketc.find.level import Level, prune, rewind, save_level, train
from ticketc.find.rundir import Log, RunDir, open_run
from ticketc.find.search import Search, arch_kwargs, build, load_data, plan_search

__all__ = ["FindResult", "arch_kwargs", "build", "find_tickets", "load_data", "plan_search"]


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
    data = _data(configs[0], data)
    # The run's config states how many samples were held out, whatever rule chose them.
    configs = [dataclasses.replace(c, val_size=len(data.val)) for c in configs]
    search = plan_search(configs[0], data, ranks)
    runs: list[RunDir] = []
    try:
        for c, p in zip(configs, run_dirs, strict=True):
            runs.append(
                on_main(
                    functools.partial(
                        open_run, c, Path(p), search, resume=resume, force=force, log=log
                    ),
                    ranks,
                )
            )
        for position, index in enumerate(search.levels):
            pending = broadcast(
                [i for i, r in enumerate(runs) if not r.done(index)] if ranks.main else None, ranks
            )
            if pending:
                previous = search.levels[position - 1] if position else None
                _run_level(search, runs, Level(index, previous, pending), log, progress, ranks)
            if stop_after_level is not None and index >= stop_after_level:
                return []
    except BaseException:
        if ranks.main:
            for run in runs:
                if not run.has_progress():  # a failed start leaves no folder behind
                    run.discard()
        raise
    return [
        on_main(functools.partial(write_ticket, run, search, log, ranks), ranks) for run in runs
    ]


def _run_level(
    search: Search, runs: list[RunDir], level: Level, log: Log | None, progress: bool, ranks: Ranks
) -> None:
    """prune -> rewind -> train -> save one level of the pending runs."""
    started = time.perf_counter()
    # rank 0 prunes and rewinds; every rank trains from the masks and weights it sends
    ready = on_main(lambda: rewind(search, runs, prune(search, runs, level)), ranks)
    trained = train(search, runs, ready, log, progress, ranks)
    on_main(
        lambda: save_level(search, runs, ready, trained, time.perf_counter() - started, log, ranks),
        ranks,
    )


def _data(config: FindConfig, data: Splits | None) -> Splits:
    """The splits given (checked against config.val_size), else those config names."""
    if data is None:
        return load_data(config)
    if config.val_size is not None and validation_count(
        config.val_size, len(data.train) + len(data.val)
    ) != len(data.val):
        raise ValueError(
            f"val_size {config.val_size} does not match the {len(data.val)} "
            "validation samples of the data given"
        )
    return data


def _check_group(configs: Sequence[FindConfig]) -> None:
    first = dataclasses.replace(configs[0], seed=0)
    for c in configs[1:]:
        if dataclasses.replace(c, seed=0) != first:
            raise ValueError("runs trained together may differ only in their seed")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs trained together need distinct seeds, got {seeds}")
