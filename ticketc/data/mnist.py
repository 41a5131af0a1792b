"""MNIST from the original IDX .gz files, checked by md5.

Where the files are looked for, in order: `data_dir`, $TICKETC_MNIST_DIR, ~/.cache/ticketc/mnist.
Missing files are downloaded from the usual mirrors when `download` is set and the network
answers; otherwise the error says which files to put where.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ticketc.atomic import atomic_path
from ticketc.data.splits import TensorSplit
from ticketc.errors import UserError

ENV_VAR = "TICKETC_MNIST_DIR"
DEFAULT_DIR = Path.home() / ".cache" / "ticketc" / "mnist"
FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# Normalisation used by open_lth and torchvision examples.
MEAN, STD = 0.1307, 0.3081


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mnist_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_DIR


def ensure_files(directory: Path, *, download: bool) -> None:
    """Make sure all four files are in `directory` with the right md5, downloading if allowed."""
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing and download:
        _download(directory, missing)
        missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise UserError(
            f"MNIST files missing in {directory}: {', '.join(missing)} "
            f"(download the original IDX .gz files into that folder, pass --data-dir DIR, "
            f"or set {ENV_VAR})"
        )
    for name, expected in FILES.items():
        got = md5(directory / name)
        if got != expected:
            raise UserError(
                f"MNIST file {directory / name} has md5 {got}, expected {expected} "
                "(corrupt or not the original file: delete it and download again)"
            )


def _download(directory: Path, names: list[str]) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # the caller reports the missing files and where they belong
    for name in names:
        for mirror in MIRRORS:
            try:
                with urllib.request.urlopen(mirror + name, timeout=20) as response:
                    data = response.read()
            except OSError:
                continue
            if hashlib.md5(data).hexdigest() != FILES[name]:
                continue
            with atomic_path(directory / name) as tmp:
                tmp.write_bytes(data)
            break


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzip): magic 0x0000 | dtype 0x08 (uint8) | ndim, then big-endian dims."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an uint8 IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: header says {tuple(dims)} but holds {data.size} values")
    return data.reshape(tuple(int(d) for d in dims))


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None, *, download: bool = True
) -> tuple[TensorSplit, TensorSplit]:
    """(train, test): x float32 [N, 1, 28, 28] normalised, y int64 [N].

    An explicit `data_dir` must exist: a mistyped folder is reported, not created and filled.
    """
    directory = mnist_dir(data_dir)
    if data_dir is not None and not directory.is_dir():
        raise UserError(
            f"--data-dir {directory} does not exist (MNIST: the folder of the four "
            "IDX .gz files; leave it out to use $TICKETC_MNIST_DIR or "
            f"{DEFAULT_DIR})"
        )
    ensure_files(directory, download=download)

    def split(prefix: str) -> TensorSplit:
        images = read_idx(directory / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return TensorSplit((x - MEAN) / STD, torch.from_numpy(labels.astype(np.int64)))

    return split("train"), split("t10k")
