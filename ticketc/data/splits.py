"""In-memory dataset splits: train / validation / test, and how the validation split is held out.

The loaders (`ticketc.data.sources`) build these; this module imports none of them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ticketc.data.imagefolder import ImageFiles
from ticketc.errors import UserError

DATASETS = ("mnist", "cifar10", "imagefolder")
# Validation split: the paper's 5,000 of MNIST's 60,000 training images, or 10% of a smaller
# training set (the two agree at 50,000 samples).
VAL_SIZE_MAX, VAL_FRACTION = 5000, 0.1


@dataclass(frozen=True)
class TensorSplit:
    """Inputs `x` (float32, [N, ...]) and integer class labels `y` ([N]). `x` is a tensor in
    memory, or `ImageFiles` (an image folder streamed from disk: `streamed`)."""

    x: torch.Tensor | ImageFiles
    y: torch.Tensor

    @property
    def streamed(self) -> bool:
        return isinstance(self.x, ImageFiles)

    def inputs(self, index: torch.Tensor | slice) -> torch.Tensor:
        """x[index] as a tensor, read from disk for a streamed split."""
        if isinstance(self.x, ImageFiles):
            if isinstance(index, slice):
                index = torch.arange(len(self.x))[index]
            return self.x.load(index)
        return self.x[index]

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} samples but y has {self.y.shape[0]}")
        if self.y.dim() != 1 or self.y.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise ValueError(
                f"y must be a 1-d integer tensor, got {self.y.dtype} {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Splits:
    """Train / validation / test splits; `val` may be empty (then selection uses test)."""

    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.train) == 0:
            raise ValueError(f"dataset {self.name!r} has an empty training split")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        for split in (self.train, self.val, self.test):
            if len(split) and int(split.y.min()) < 0:
                raise ValueError(f"dataset {self.name!r} has a negative label {int(split.y.min())}")
            if len(split) and int(split.y.max()) >= self.num_classes:
                raise ValueError(
                    f"dataset {self.name!r} has label {int(split.y.max())} >= {self.num_classes}"
                )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def md5(self) -> str:
        """md5 of every split's shapes, dtypes and contents: the same data wherever they were
        read from (a run resumed from a moved data folder is checked with it)."""
        h = hashlib.md5()
        for split in (self.train, self.val, self.test):
            if isinstance(split.x, ImageFiles):
                split.x.fingerprint(h)
            for t in (split.x, split.y):
                if not isinstance(t, torch.Tensor):
                    continue
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()


def validation_count(val_size: float | None, num_train: int) -> int:
    """How many of `num_train` training samples to hold out for validation.

    val_size: None (10% of them, at most 5,000: the paper's MNIST split), a fraction in (0, 1),
    or a count. Raises UserError naming --val-size when no training sample would be left.
    """
    if val_size is None:
        count = min(VAL_SIZE_MAX, round(VAL_FRACTION * num_train))
    elif 0 < val_size < 1:
        count = round(val_size * num_train)
    else:
        count = int(val_size)
    if not 0 <= count < num_train:
        raise UserError(
            f"--val-size {val_size:g} holds out {count} of the {num_train} training samples, "
            "leaving none to train on: give a smaller count or a fraction such as 0.1"
        )
    return count


def hold_out(train: TensorSplit, val_size: int, seed: int = 0) -> tuple[TensorSplit, TensorSplit]:
    """Split off `val_size` random training samples as a validation set (fixed seed, so every
    run of a dataset sees the same split)."""
    if not 0 <= val_size < len(train):
        raise ValueError(f"val_size {val_size} must be in [0, {len(train)})")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    if isinstance(train.x, ImageFiles):
        return (
            TensorSplit(train.x.subset(train_idx), train.y[train_idx]),
            TensorSplit(train.x.subset(val_idx), train.y[val_idx]),
        )
    return (
        TensorSplit(train.x[train_idx], train.y[train_idx]),
        TensorSplit(train.x[val_idx], train.y[val_idx]),
    )
