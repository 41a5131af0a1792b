"""Choose each run's ticket from its finished levels and write it as ticket.pt."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ticketc.checkpoint import Ticket, save_ticket
from ticketc.find.distributed import SINGLE, Ranks
from ticketc.find.level import masked_state
from ticketc.find.rundir import Log, RunDir, load_state
from ticketc.find.search import Search
from ticketc.safe_load import read_json


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


def write_ticket(run: RunDir, search: Search, log: Log | None, ranks: Ranks = SINGLE) -> FindResult:
    """Pick the sparsest level whose final validation accuracy (test accuracy without a
    validation split) meets the target; write it as ticket.pt."""
    cfg = run.config
    metrics = [
        read_json(run.level_dir(lv) / "metrics.json", "level metrics") for lv in search.levels
    ]
    has_val = len(search.data.val) > 0
    key = "final_val_acc" if has_val else "final_test_acc"

    def accuracy(m: dict[str, Any]) -> float:
        return float(m["members"]["ticket"][key])

    dense = accuracy(metrics[0])
    target = (
        cfg.accuracy_target if cfg.accuracy_target is not None else (dense - cfg.max_accuracy_drop)
    )
    meeting = [m for m in metrics if accuracy(m) >= target]
    chosen = min(meeting, key=lambda m: m["density"]) if meeting else metrics[-1]
    level = int(chosen["level"])
    out = run.level_dir(level)
    masks = load_state(out / "mask.pt")
    rewind = masked_state(load_state(out / "rewind.pt"), masks)
    t = chosen["members"]["ticket"]
    ticket = Ticket(
        arch=cfg.arch,
        arch_kwargs=search.arch_kwargs,
        state_dict=load_state(out / "final.pt"),
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
        rule = (
            "--accuracy-target"
            if cfg.accuracy_target is not None
            else f"dense {100 * dense:.2f}% - {drop}"
        )
        how = (
            f"the sparsest level with {name} {100 * accuracy(chosen):.2f}% >= "
            f"{100 * target:.2f}% ({rule})"
            if meeting
            else f"no level reached {name} {100 * target:.2f}% ({rule}): the last level, at "
            f"{100 * accuracy(chosen):.2f}%"
        )
        log(
            f"{path}: level {level}, {100 * chosen['density']:.1f}% of weights: {how}; its test "
            f"accuracy {100 * t['final_test_acc']:.2f}% "
            f"(dense {100 * metrics[0]['members']['ticket']['final_test_acc']:.2f}%)"
            + (f"; trained on {ranks.world} ranks (torchrun)" if ranks.distributed else "")
        )
    return FindResult(
        run.path,
        path,
        level,
        float(chosen["density"]),
        float(t["final_test_acc"]),
        float(t["final_val_acc"]),
        key.removeprefix("final_"),
    )
