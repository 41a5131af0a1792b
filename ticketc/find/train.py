"""Train one level: every member of an `Ensemble` for the same number of iterations.

Each member draws its batches from a shuffled order fixed by (data seed, level, epoch), and
the random numbers of step t (Dropout masks) from a seed fixed by (the members' seeds, level,
t), so what iteration t does is a pure function of t: a run resumed from a checkpoint at
iteration t trains exactly as an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ticketc.data import Splits
from ticketc.find.ensemble import Ensemble


class BatchOrder:
    """Indices of the training batch of each member at iteration t (drop-last epochs)."""

    def __init__(self, seeds: Sequence[int], level: int, num_samples: int, batch_size: int):
        if batch_size > num_samples:
            raise ValueError(f"batch size {batch_size} exceeds the {num_samples} training samples")
        self.seeds, self.level = list(seeds), level
        self.n, self.b = num_samples, batch_size
        self.steps_per_epoch = num_samples // batch_size
        self._epoch = -1
        self._perms = torch.empty(0)

    def _load_epoch(self, epoch: int) -> None:
        perms: dict[int, torch.Tensor] = {}
        for seed in set(self.seeds):
            g = torch.Generator().manual_seed(seed * 1_000_003 + self.level * 10_007 + epoch)
            perms[seed] = torch.randperm(self.n, generator=g)
        self._perms = torch.stack([perms[s] for s in self.seeds])  # [M, N]
        self._epoch = epoch

    def step_seed(self, t: int) -> int:
        """Seed of the random numbers drawn at iteration t (a 63-bit integer)."""
        key = f"{self.seeds}|{self.level}|{t}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    def indices(self, t: int) -> torch.Tensor:
        epoch, pos = divmod(t, self.steps_per_epoch)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        return self._perms[:, pos * self.b : (pos + 1) * self.b]


@dataclass
class History:
    """Evaluations of every member: one row per evaluation point."""

    rows: list[list[dict[str, float]]] = field(default_factory=list)  # [member][point]
    # Running training loss / correct counts since the last evaluation (kept across resumes).
    loss_sum: list[float] = field(default_factory=list)
    correct_sum: list[int] = field(default_factory=list)
    seen: int = 0

    def add(self, member_rows: list[dict[str, float]]) -> None:
        if not self.rows:
            self.rows = [[] for _ in member_rows]
        for i, row in enumerate(member_rows):
            self.rows[i].append(row)


@dataclass
class Checkpoint:
    """What `train_level` hands to its checkpoint callback: enough to continue exactly."""

    iteration: int
    history: History


def train_level(
    ensemble: Ensemble,
    data: Splits,
    order: BatchOrder,
    *,
    start: int,
    end: int,
    eval_every: int,
    checkpoint_every: int,
    history: History,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    on_iteration: Callable[[int], None] | None = None,
    on_evaluation: Callable[[int, list[dict[str, float]]], None] | None = None,
    snapshot_at: int | None = None,
    on_snapshot: Callable[[], None] | None = None,
) -> History:
    """Train iterations start+1 .. end (iteration t is the t-th optimizer step).

    Evaluates every member (eval mode) every `eval_every` iterations and at `end`, appending a
    row per member to `history` and handing the rows to `on_evaluation`.
    """
    x_train = data.train.x
    y_train = data.train.y.long()
    seeded = ensemble.draws_random_numbers
    m = ensemble.size
    loss_sum = torch.tensor(history.loss_sum or [0.0] * m, dtype=torch.float64)
    correct_sum = torch.tensor(history.correct_sum or [0] * m, dtype=torch.int64)
    seen = history.seen
    if snapshot_at is not None and snapshot_at == start and on_snapshot is not None:
        on_snapshot()
    for t in range(start, end):
        idx = order.indices(t)  # [M, B]
        loss, correct = ensemble.step_on(x_train, y_train, idx,
                                         seed=order.step_seed(t) if seeded else None)
        loss_sum += loss.detach().double()
        correct_sum += correct
        seen += idx.shape[1]
        it = t + 1
        if snapshot_at is not None and it == snapshot_at and on_snapshot is not None:
            on_snapshot()
        if it % eval_every == 0 or it == end:
            rows = _evaluate(ensemble, data, it, loss_sum, correct_sum, seen, order.b)
            history.add(rows)
            if on_evaluation is not None:
                on_evaluation(it, rows)
            loss_sum.zero_()
            correct_sum.zero_()
            seen = 0
        if on_checkpoint is not None and it % checkpoint_every == 0 and it != end:
            history.loss_sum, history.correct_sum = loss_sum.tolist(), correct_sum.tolist()
            history.seen = seen
            on_checkpoint(Checkpoint(it, history))
        if on_iteration is not None:
            on_iteration(it)
    return history


def _evaluate(
    ensemble: Ensemble, data: Splits, it: int, loss_sum: torch.Tensor,
    correct_sum: torch.Tensor, seen: int, batch: int,
) -> list[dict[str, float]]:
    val_loss, val_acc = ensemble.evaluate(data.val.x, data.val.y.long())
    test_loss, test_acc = ensemble.evaluate(data.test.x, data.test.y.long())
    steps = max(seen // batch, 1)
    rows = []
    for i in range(ensemble.size):
        rows.append({
            "iteration": it,
            "train_loss": float(loss_sum[i]) / steps,
            "train_acc": float(correct_sum[i]) / max(seen, 1),
            "val_loss": float(val_loss[i]),
            "val_acc": float(val_acc[i]),
            "test_loss": float(test_loss[i]),
            "test_acc": float(test_acc[i]),
        })
    return rows


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    """Final accuracy and the early-stopping point (minimum validation loss, else test loss)."""
    if not rows:
        return {}
    key = "val_loss" if rows[-1]["val_loss"] == rows[-1]["val_loss"] else "test_loss"  # NaN: no val
    best = min(rows, key=lambda r: r[key])
    return {
        "final_iteration": rows[-1]["iteration"],
        "final_train_acc": rows[-1]["train_acc"],
        "final_val_acc": rows[-1]["val_acc"],
        "final_test_acc": rows[-1]["test_acc"],
        "early_stop_iteration": best["iteration"],
        "early_stop_val_loss": best[key],
        "early_stop_test_acc": best["test_acc"],
    }
