"""Data loaders: MNIST md5 checks and messages, IDX parsing, CIFAR-10 batches, user datasets."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ticketc.data import Splits, TensorSplit, cifar10, load_dataset, load_user_dataset, mnist
from ticketc.errors import UserError

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path: Path) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", a)
    assert np.array_equal(mnist.read_idx(tmp_path / "x.gz"), a)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # float IDX: not ours
    with pytest.raises(UserError, match="uint8 IDX"):
        mnist.read_idx(tmp_path / "bad.gz")


def test_missing_files_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        mnist.load_mnist(tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte.gz" in msg
    assert mnist.ENV_VAR in msg and "--data-dir" in msg and "\n" not in msg


def test_download_failure_falls_back_to_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mnist, "MIRRORS", ((tmp_path / "no-such-mirror").as_uri() + "/",))
    (tmp_path / "target").mkdir()
    with pytest.raises(UserError, match="MNIST files missing"):
        mnist.load_mnist(tmp_path / "target", download=True)


def test_a_mistyped_data_dir_is_reported_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mnist, "MIRRORS", ((tmp_path / "no-such-mirror").as_uri() + "/",))
    with pytest.raises(UserError, match="--data-dir .*typo does not exist"):
        mnist.load_mnist(tmp_path / "typo", download=True)
    assert not (tmp_path / "typo").exists()


def test_md5_mismatch_is_reported(tmp_path: Path) -> None:
    for name in mnist.FILES:
        (tmp_path / name).write_bytes(b"not mnist")
    with pytest.raises(UserError, match="md5") as e:
        mnist.load_mnist(tmp_path, download=False)
    assert "expected" in str(e.value)


def test_env_var_names_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path))
    assert mnist.mnist_dir(None) == tmp_path
    assert mnist.mnist_dir("elsewhere") == Path("elsewhere")


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST files not present")
def test_real_mnist_loads_with_validation_split(tmp_path: Path) -> None:
    for name in mnist.FILES:  # through the env var, from a copy
        shutil.copy(SHARED_MNIST / name, tmp_path / name)
    os.environ[mnist.ENV_VAR] = str(tmp_path)
    try:
        data = load_dataset("mnist", None, val_size=5000, download=False)
    finally:
        del os.environ[mnist.ENV_VAR]
    assert (len(data.train), len(data.val), len(data.test)) == (55_000, 5_000, 10_000)
    assert data.input_shape == (1, 28, 28) and data.train.x.dtype == torch.float32
    assert set(data.test.y.unique().tolist()) == set(range(10))
    assert abs(float(data.train.x.mean())) < 0.05  # normalised


def _write_cifar_batch(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
        b"batch_label": b"test",
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_batches(tmp_path: Path) -> None:
    for i, name in enumerate((*cifar10.TRAIN_FILES, cifar10.TEST_FILE)):
        _write_cifar_batch(tmp_path / name, 8, i)
    data = load_dataset("cifar10", tmp_path, val_size=4)
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 8)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data_batch_1"):
        cifar10.load_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(UserError, match="not allowed"):
        cifar10.read_batch(tmp_path / "evil")
    (tmp_path / "short").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(UserError, match="3072"):
        cifar10.read_batch(tmp_path / "short")


def user_tensors() -> tuple:
    x = torch.randn(50, 4)
    return (x, (x[:, 0] > 0).long()), (x[:10], (x[:10, 0] > 0).long())


def user_datasets() -> tuple:
    train = torch.utils.data.TensorDataset(torch.randn(20, 4), torch.arange(20) % 3)
    return train, train


def test_user_dataset_factories() -> None:
    data = load_user_dataset("tests.test_data_loaders:user_tensors", val_size=5)
    assert (len(data.train), len(data.val), len(data.test), data.num_classes) == (45, 5, 10, 2)
    data = load_user_dataset("tests.test_data_loaders:user_datasets")  # default: 10% held out
    assert data.num_classes == 3 and data.train.x.shape == (18, 4) and len(data.val) == 2
    with pytest.raises(UserError, match="module.path:factory"):
        load_user_dataset("no_colon")
    with pytest.raises(UserError, match="expected Splits"):
        load_user_dataset("builtins:dict")


def test_splits_validate() -> None:
    with pytest.raises(ValueError, match="samples"):
        TensorSplit(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    ok = TensorSplit(torch.zeros(3, 2), torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="label 5"):
        Splits("x", ok, ok, ok, num_classes=3)
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("imagenet")
