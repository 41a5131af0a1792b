"""CIFAR-10 from the folder of its python-format batches (cifar-10-batches-py: data_batch_1..5,
test_batch) or of its binary batches (cifar-10-batches-bin: data_batch_1..5.bin, test_batch.bin).

The python batches are pickles; they are read with an unpickler that only admits the few
classes a batch is made of (dict, list, bytes, numpy arrays), so loading one runs no code from
the file. A binary batch is records of 1 label byte and 3,072 pixel bytes (red, green, blue
planes of 32x32, row-major).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ticketc.data.splits import TensorSplit
from ticketc.errors import UserError

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
RECORD = 1 + 3 * 32 * 32  # one image of a binary batch
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Python 3 writes bytes as _codecs.encode(str, "latin1") in protocol 2 pickles.
    ("_codecs", "encode"),
    ("builtins", "list"),
    ("builtins", "dict"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _normalised(pixels: np.ndarray, labels: torch.Tensor) -> TensorSplit:
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).view(-1, 3, 32, 32)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return TensorSplit((x - mean) / std, labels)


def read_binary_batch(path: Path) -> TensorSplit:
    """One binary batch: x float32 [N, 3, 32, 32] normalised, y int64 [N]."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"cannot read CIFAR-10 batch {path}: {e.strerror}") from e
    if raw.size == 0 or raw.size % RECORD:
        raise UserError(
            f"{path} is not a CIFAR-10 binary batch: {raw.size} bytes is not a "
            f"whole number of {RECORD}-byte records"
        )
    records = raw.reshape(-1, RECORD)
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    if int(labels.max()) > 9:
        raise UserError(f"{path}: label {int(labels.max())} outside 0..9 (not a CIFAR-10 batch)")
    return _normalised(records[:, 1:], labels)


def read_batch(path: Path) -> TensorSplit:
    """One batch: x float32 [N, 3, 32, 32] normalised, y int64 [N]."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read CIFAR-10 batch {path}: {e.strerror}") from e
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path} is not a CIFAR-10 python batch: {e}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR-10 python batch (top level is not a dict)")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise UserError(f"{path} lacks the 'data' or 'labels' entry of a CIFAR-10 batch")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    y = torch.tensor(list(labels), dtype=torch.long)
    if y.numel() != data.shape[0] or (y.numel() and (y.min() < 0 or y.max() > 9)):
        raise UserError(f"{path}: labels do not match the data or lie outside 0..9")
    return _normalised(data, y)


def load_cifar10(directory: Path) -> tuple[TensorSplit, TensorSplit]:
    """(train, test) from `directory`: the extracted cifar-10-batches-py folder, or the
    cifar-10-batches-bin one (`.bin` files)."""
    if not directory.is_dir():
        raise UserError(
            f"--data-dir {directory} does not exist (CIFAR-10: the extracted "
            "cifar-10-batches-py or cifar-10-batches-bin folder)"
        )
    binary = (directory / f"{TRAIN_FILES[0]}.bin").is_file()
    names = [f"{n}.bin" if binary else n for n in (*TRAIN_FILES, TEST_FILE)]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise UserError(
            f"CIFAR-10 batches missing in {directory}: {', '.join(missing)} "
            "(extract cifar-10-python.tar.gz or cifar-10-binary.tar.gz and pass its "
            "cifar-10-batches-py or cifar-10-batches-bin folder)"
        )
    read = read_binary_batch if binary else read_batch
    parts = [read(directory / n) for n in names[:-1]]
    train = TensorSplit(
        torch.cat([p.inputs(slice(None)) for p in parts]), torch.cat([p.y for p in parts])
    )
    return train, read(directory / names[-1])
