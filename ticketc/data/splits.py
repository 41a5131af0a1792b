"""In-memory dataset splits and the dispatcher from a dataset name to its loader."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

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
        return (TensorSplit(train.x.subset(train_idx), train.y[train_idx]),
                TensorSplit(train.x.subset(val_idx), train.y[val_idx]))
    return (
        TensorSplit(train.x[train_idx], train.y[train_idx]),
        TensorSplit(train.x[val_idx], train.y[val_idx]),
    )


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *,
    val_size: float | None = None, download: bool = True,
) -> Splits:
    """Load a built-in dataset by name and hold out a validation split (`validation_count`)."""
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
    elif name == "imagefolder":
        from ticketc.data.imagefolder import load_imagefolder

        if data_dir is None:
            raise UserError("imagefolder needs --data-dir: a folder with train/<class>/ and "
                            "val/<class>/ images")
        files, test_files, num_classes = load_imagefolder(Path(data_dir))
        train = TensorSplit(files, torch.tensor(files.labels, dtype=torch.long))
        test = TensorSplit(test_files, torch.tensor(test_files.labels, dtype=torch.long))
    else:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    train, val = hold_out(train, validation_count(val_size, len(train)))
    return Splits(name, train, val, test, num_classes)


def load_user_dataset(ref: str, *, val_size: float | None = None) -> Splits:
    """Call the user's `module.path:factory` and hold out a validation split.

    The factory returns a `Splits` (kept as it is: it has its own validation split), or
    `(train, test)` where each is an `(x, y)` pair of tensors or a map-style
    `torch.utils.data.Dataset` of `(x, y)` items (stacked into memory once). x: any float
    shape [N, ...] (converted to float32); y: integer class indices [N] from 0. Anything else
    raises UserError naming --data.
    """
    from ticketc.factory import resolve

    obj = resolve(ref, "dataset")()
    if isinstance(obj, Splits):
        if val_size is not None and validation_count(val_size, len(obj.train) + len(obj.val)
                                                     ) != len(obj.val):
            raise UserError(f"--val-size: --data {ref} returns its own validation split "
                            f"({len(obj.val)} samples); leave --val-size out")
        return obj
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise UserError(
            f"--data {ref} returned {type(obj).__name__}; expected Splits or (train, test)"
        )
    train, test = (_as_split(part, ref, name) for part, name in zip(obj, ("train", "test"),
                                                                    strict=True))
    if len(train) == 0:
        raise UserError(f"--data {ref}: the training split is empty")
    if len(test) and test.x.shape[1:] != train.x.shape[1:]:
        raise UserError(f"--data {ref}: test inputs have shape {tuple(test.x.shape[1:])}, "
                        f"training inputs {tuple(train.x.shape[1:])}")
    train, val = hold_out(train, validation_count(val_size, len(train)))
    num_classes = int(max(train.y.max(), test.y.max() if len(test) else 0)) + 1
    if num_classes < 2:
        raise UserError(f"--data {ref}: every label is 0; a classifier needs two classes or more")
    try:
        return Splits(ref, train, val, test, num_classes)
    except ValueError as e:
        raise UserError(f"--data {ref}: {e}") from None


def _as_split(part: object, ref: str, name: str) -> TensorSplit:
    """One split as tensors: x float32, y int64 class indices (refusing labels that are not)."""
    if isinstance(part, TensorSplit):
        x, y = part.x, part.y
    elif isinstance(part, tuple | list) and len(part) == 2 and all(
        isinstance(t, torch.Tensor) for t in part
    ):
        x, y = part
    elif isinstance(part, torch.utils.data.Dataset):
        try:
            items = [part[i] for i in range(len(part))]  # type: ignore[arg-type]
            x = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
            y = torch.as_tensor([torch.as_tensor(y).item() for _, y in items])
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"--data {ref}: cannot stack the {name} split's (x, y) items: "
                            f"{str(e).splitlines()[0]}") from None
    else:
        raise UserError(f"--data {ref}: cannot use a {type(part).__name__} as the {name} split")
    if y.dim() != 1:
        raise UserError(f"--data {ref}: {name} labels have shape {tuple(y.shape)}; "
                        "expected class indices [N] (not one-hot)")
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise UserError(f"--data {ref}: {name} labels are not whole numbers; expected class "
                        "indices 0, 1, ...")
    if len(y) and int(y.min()) < 0:
        raise UserError(f"--data {ref}: {name} labels include {int(y.min())}; expected class "
                        "indices 0, 1, ...")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"--data {ref}: the {name} split has {x.shape[0]} inputs but "
                        f"{y.shape[0]} labels")
    if isinstance(x, ImageFiles):
        return TensorSplit(x, y.long())
    return TensorSplit(x.float(), y.long())
