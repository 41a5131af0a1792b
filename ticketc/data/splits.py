"""In-memory dataset splits and the dispatcher from a dataset name to its loader."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ticketc.errors import UserError

DATASETS = ("mnist", "cifar10")


@dataclass(frozen=True)
class TensorSplit:
    """Inputs `x` (float32, [N, ...]) and integer class labels `y` ([N])."""

    x: torch.Tensor
    y: torch.Tensor

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
            if len(split) and int(split.y.max()) >= self.num_classes:
                raise ValueError(
                    f"dataset {self.name!r} has label {int(split.y.max())} >= {self.num_classes}"
                )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def hold_out(train: TensorSplit, val_size: int, seed: int = 0) -> tuple[TensorSplit, TensorSplit]:
    """Split off `val_size` random training samples as a validation set (fixed seed, so every
    run of a dataset sees the same split)."""
    if not 0 <= val_size < len(train):
        raise ValueError(f"val_size {val_size} must be in [0, {len(train)})")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return (
        TensorSplit(train.x[train_idx], train.y[train_idx]),
        TensorSplit(train.x[val_idx], train.y[val_idx]),
    )


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, val_size: int = 5000,
    download: bool = True,
) -> Splits:
    """Load a built-in dataset by name; `val_size` training samples are held out for validation."""
    if name == "mnist":
        from ticketc.data.mnist import load_mnist

        train, test = load_mnist(data_dir, download=download)
        num_classes = 10
    elif name == "cifar10":
        from ticketc.data.cifar10 import load_cifar10

        if data_dir is None:
            raise UserError("cifar10 needs --data-dir: the folder of its python-format batches")
        train, test = load_cifar10(Path(data_dir))
        num_classes = 10
    else:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if val_size >= len(train):
        raise UserError(f"--val-size {val_size} leaves no training data ({len(train)} samples)")
    train, val = hold_out(train, val_size)
    return Splits(name, train, val, test, num_classes)


def load_user_dataset(ref: str, *, val_size: int = 0) -> Splits:
    """Call the user's `module.path:factory`.

    The factory returns a `Splits`, or `(train, test)` where each is an `(x, y)` pair of tensors
    or a map-style `torch.utils.data.Dataset` of `(x, y)` items (stacked into memory once).
    """
    from ticketc.factory import resolve

    obj = resolve(ref, "dataset")()
    if isinstance(obj, Splits):
        return obj
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise UserError(
            f"dataset {ref!r} returned {type(obj).__name__}; expected Splits or (train, test)"
        )
    train, test = (_as_split(part, ref) for part in obj)
    if val_size:
        train, val = hold_out(train, val_size)
    else:
        val = TensorSplit(train.x[:0], train.y[:0])
    num_classes = int(max(train.y.max(), test.y.max() if len(test) else 0)) + 1
    return Splits(ref, train, val, test, num_classes)


def _as_split(part: object, ref: str) -> TensorSplit:
    if isinstance(part, TensorSplit):
        return part
    if isinstance(part, tuple | list) and len(part) == 2 and all(
        isinstance(t, torch.Tensor) for t in part
    ):
        return TensorSplit(part[0].float(), part[1].long())
    if isinstance(part, torch.utils.data.Dataset):
        items = [part[i] for i in range(len(part))]  # type: ignore[arg-type]
        xs = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
        ys = torch.tensor([int(y) for _, y in items], dtype=torch.long)
        return TensorSplit(xs, ys)
    raise UserError(f"dataset {ref!r}: cannot use a {type(part).__name__} as a split")
