"""Train one level: every member of an `Ensemble` for the same number of iterations.

Each member draws its batches from a shuffled order fixed by (data seed, level, epoch), and
the random numbers of step t (Dropout masks) from a seed fixed by (the members' seeds, level,
t), so what iteration t does is a pure function of t: a run resumed from a checkpoint at
iteration t trains exactly as an uninterrupted run does.

Under torchrun each rank trains on its shard of every global batch (`Ranks.shard`) and draws
its own random numbers (the step's seed plus its rank); evaluation splits the validation and
test sets among the ranks and sums their counts, so every rank records the same accuracies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ticketc.data import Splits, TensorSplit
from ticketc.data.augment import crop_flip, crop_flip_params
from ticketc.data.imagefolder import ImageFiles
from ticketc.find.distributed import SINGLE, Ranks, all_reduce_sum
from ticketc.find.ensemble import Ensemble

_AUGMENT_SALT = 0x5A17  # the augmentation's random stream differs from the Dropout one


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
    # Running training loss (summed over samples) / correct counts / samples since the last
    # evaluation (kept across resumes; under torchrun the sums of every rank, held by rank 0).
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
    lr_at: Callable[[int], float] | None = None,
    ranks: Ranks = SINGLE,
    augment: bool = False,
    workers: int = 2,
) -> History:
    """Train iterations start+1 .. end (iteration t is the t-th optimizer step).

    Evaluates every member (eval mode) every `eval_every` iterations and at `end`, appending a
    row per member to `history` and handing the rows to `on_evaluation`. `lr_at(t)`: the
    learning rate of step t (a schedule), None to keep the optimizer's. `augment`: random
    crops and flips of the training images, drawn per global batch from a seed fixed by t (the
    same images whatever the number of ranks, and after a resume). Under torchrun
    (`ranks`) every rank calls this with the same arguments. A streamed training split (an
    image folder) is read by `workers` DataLoader processes, a few steps ahead.
    """
    x_train = data.train.x
    y_train = data.train.y.long()
    streamed = (
        _StreamedBatches(data.train, order, ranks, start, end, workers)
        if isinstance(x_train, ImageFiles)
        else None
    )
    seeded = ensemble.draws_random_numbers
    m = ensemble.size
    # [loss summed over samples, correct predictions, samples] per member, since the last
    # evaluation; under torchrun what a checkpoint stored is rank 0's (the sum of all ranks).
    stored = ranks.main and bool(history.loss_sum)
    sums = torch.zeros(3, m, dtype=torch.float64)
    if stored:
        sums[0] = torch.tensor(history.loss_sum, dtype=torch.float64)
        sums[1] = torch.tensor(history.correct_sum, dtype=torch.float64)
        sums[2] = float(history.seen)
    if snapshot_at is not None and snapshot_at == start and on_snapshot is not None:
        on_snapshot()
    for t in range(start, end):
        batch = order.indices(t)  # [M, B]
        idx = ranks.shard(batch)  # [M, B / ranks]
        if lr_at is not None:
            ensemble.set_lr_(lr_at(t))
        seed = (order.step_seed(t) + ranks.rank) % 2**63 if seeded else None
        if streamed is not None or augment:
            if streamed is not None:
                x = streamed.next(idx)
            else:
                assert isinstance(x_train, torch.Tensor)
                x = x_train[idx]
            if augment:
                g = torch.Generator().manual_seed(order.step_seed(t) ^ _AUGMENT_SALT)
                dy, dx, flip = (ranks.shard(p) for p in crop_flip_params(tuple(batch.shape), g))
                x = crop_flip(x, dy, dx, flip)
            loss, correct = ensemble.step(x, y_train[idx], seed=seed)
        else:
            assert isinstance(x_train, torch.Tensor)
            loss, correct = ensemble.step_on(x_train, y_train, idx, seed=seed)
        sums[0] += loss.detach().double() * idx.shape[1]
        sums[1] += correct
        sums[2] += idx.shape[1]
        it = t + 1
        if snapshot_at is not None and it == snapshot_at and on_snapshot is not None:
            ensemble.sync_buffers_()
            on_snapshot()
        if it % eval_every == 0 or it == end:
            ensemble.sync_buffers_()
            rows = _evaluate(ensemble, data, it, all_reduce_sum(sums, ranks), ranks)
            history.add(rows)
            if on_evaluation is not None:
                on_evaluation(it, rows)
            sums.zero_()
        if on_checkpoint is not None and it % checkpoint_every == 0 and it != end:
            ensemble.sync_buffers_()
            if ranks.distributed:  # rank 0 keeps every rank's sums, the others start afresh
                total = all_reduce_sum(sums, ranks)
                sums = total if ranks.main else sums.zero_()
            history.loss_sum, history.correct_sum = sums[0].tolist(), sums[1].tolist()
            history.seen = int(sums[2, 0])
            on_checkpoint(Checkpoint(it, history))
        if on_iteration is not None:
            on_iteration(it)
    ensemble.sync_buffers_()
    return history


class _StreamedBatches:
    """The training batches of steps start..end-1 read from an image folder by DataLoader
    workers (`batch_sampler` yields each step's indices, so the order is BatchOrder's)."""

    def __init__(
        self,
        split: TensorSplit,
        order: BatchOrder,
        ranks: Ranks,
        start: int,
        end: int,
        workers: int,
    ) -> None:
        steps = [ranks.shard(order.indices(t)).reshape(-1).tolist() for t in range(start, end)]
        loader = torch.utils.data.DataLoader(
            split.x,  # type: ignore[arg-type]
            batch_sampler=steps,  # type: ignore
            num_workers=workers,
        )
        self._batches = iter(loader)

    def next(self, idx: torch.Tensor) -> torch.Tensor:
        """The next step's images [*idx.shape, C, H, W] (idx: that step's indices)."""
        x, _ = next(self._batches)
        return x.view(*idx.shape, *x.shape[1:])


def _chunks(split: TensorSplit, index: torch.Tensor, chunk: int = 2500):  # type: ignore
    """(x, y) of split[index] in chunks: tensors sliced, image folders read by workers."""
    y = split.y[index].long()
    if isinstance(split.x, ImageFiles):
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(split.x, index.tolist()), batch_size=chunk, num_workers=2
        )
        start = 0
        for x, _ in loader:
            yield x, y[start : start + len(x)]
            start += len(x)
        return
    for start in range(0, len(index), chunk):
        yield split.x[index[start : start + chunk]], y[start : start + chunk]


def _evaluate_split(
    ensemble: Ensemble, split: TensorSplit, ranks: Ranks
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss [M] and accuracy [M] on `split`, each rank evaluating its share."""
    if not ranks.distributed and not split.streamed:
        assert isinstance(split.x, torch.Tensor)
        return ensemble.evaluate(split.x, split.y.long())
    sums = torch.zeros(2, ensemble.size, dtype=torch.float64)
    for x, y in _chunks(split, torch.arange(len(split))[ranks.rank :: ranks.world]):
        loss, acc = ensemble.evaluate(x, y)
        sums[0] += loss.double() * len(x)
        sums[1] += (acc.double() * len(x)).round()
    sums = all_reduce_sum(sums, ranks)
    n = len(split)
    if n == 0:
        nan = torch.full((ensemble.size,), float("nan"))
        return nan, nan
    return (sums[0] / n).float(), sums[1] / n


def _evaluate(
    ensemble: Ensemble,
    data: Splits,
    it: int,
    sums: torch.Tensor,
    ranks: Ranks,
) -> list[dict[str, float]]:
    val_loss, val_acc = _evaluate_split(ensemble, data.val, ranks)
    test_loss, test_acc = _evaluate_split(ensemble, data.test, ranks)
    rows = []
    for i in range(ensemble.size):
        seen = max(float(sums[2, i]), 1.0)
        rows.append(
            {
                "iteration": it,
                "train_loss": float(sums[0, i]) / seen,
                "train_acc": float(sums[1, i]) / seen,
                "val_loss": float(val_loss[i]),
                "val_acc": float(val_acc[i]),
                "test_loss": float(test_loss[i]),
                "test_acc": float(test_acc[i]),
            }
        )
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
