"""Where a dataset comes from: a built-in name (MNIST, CIFAR-10, an image folder) or the user's
`module.path:factory`, returned as `Splits` with a validation split held out."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ticketc.data.cifar10 import load_cifar10
from ticketc.data.imagefolder import ImageFiles, load_imagefolder
from ticketc.data.mnist import load_mnist
from ticketc.data.splits import DATASETS, Splits, TensorSplit, hold_out, validation_count
from ticketc.errors import UserError
from ticketc.factory import resolve


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: float | None = None,
    download: bool = True,
) -> Splits:
    """Load a built-in dataset by name and hold out a validation split (`validation_count`)."""
    if name == "mnist":
        train, test = load_mnist(data_dir, download=download)
        num_classes = 10
    elif name == "cifar10":
        if data_dir is None:
            raise UserError("cifar10 needs --data-dir: the folder of its python-format batches")
        train, test = load_cifar10(Path(data_dir))
        num_classes = 10
    elif name == "imagefolder":
        if data_dir is None:
            raise UserError(
                "imagefolder needs --data-dir: a folder with train/<class>/ and val/<class>/ images"
            )
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
    obj = resolve(ref, "dataset")()
    if isinstance(obj, Splits):
        if val_size is not None and validation_count(
            val_size, len(obj.train) + len(obj.val)
        ) != len(obj.val):
            raise UserError(
                f"--val-size: --data {ref} returns its own validation split "
                f"({len(obj.val)} samples); leave --val-size out"
            )
        return obj
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise UserError(
            f"--data {ref} returned {type(obj).__name__}; expected Splits or (train, test)"
        )
    train, test = (
        _as_split(part, ref, name) for part, name in zip(obj, ("train", "test"), strict=True)
    )
    if len(train) == 0:
        raise UserError(f"--data {ref}: the training split is empty")
    if len(test) and test.x.shape[1:] != train.x.shape[1:]:
        raise UserError(
            f"--data {ref}: test inputs have shape {tuple(test.x.shape[1:])}, "
            f"training inputs {tuple(train.x.shape[1:])}"
        )
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
    elif (
        isinstance(part, tuple | list)
        and len(part) == 2
        and all(isinstance(t, torch.Tensor) for t in part)
    ):
        x, y = part
    elif isinstance(part, torch.utils.data.Dataset):
        try:
            items = [part[i] for i in range(len(part))]  # type: ignore[arg-type]
            x = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
            y = torch.as_tensor([torch.as_tensor(y).item() for _, y in items])
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(
                f"--data {ref}: cannot stack the {name} split's (x, y) items: "
                f"{str(e).splitlines()[0]}"
            ) from None
    else:
        raise UserError(f"--data {ref}: cannot use a {type(part).__name__} as the {name} split")
    if y.dim() != 1:
        raise UserError(
            f"--data {ref}: {name} labels have shape {tuple(y.shape)}; "
            "expected class indices [N] (not one-hot)"
        )
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise UserError(
            f"--data {ref}: {name} labels are not whole numbers; expected class indices 0, 1, ..."
        )
    if len(y) and int(y.min()) < 0:
        raise UserError(
            f"--data {ref}: {name} labels include {int(y.min())}; expected class indices 0, 1, ..."
        )
    if x.shape[0] != y.shape[0]:
        raise UserError(
            f"--data {ref}: the {name} split has {x.shape[0]} inputs but {y.shape[0]} labels"
        )
    if isinstance(x, ImageFiles):
        return TensorSplit(x, y.long())
    return TensorSplit(x.float(), y.long())
