"""`--dataset imagefolder`: an ImageNet-style folder of image files, streamed from disk by
DataLoader workers, trains exactly as the same images held in memory do."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ticketc.cli import main
from ticketc.data import load_dataset
from ticketc.data.imagefolder import load_imagefolder

ENV = "TICKETC_TEST_IMAGEFOLDER"


def write_folder(root: Path, per_class: dict[str, int], size: int = 8) -> Path:
    """Class folders of PNG images whose class shows in their colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c in range(3):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 100, (size, size, 3)) + 60 * np.eye(3)[c] * 2
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def in_memory() -> tuple:
    """The same images, decoded once into tensors (as a user's --data factory)."""
    train, test, _ = load_imagefolder(Path(os.environ[ENV]))
    return (
        (train.load(range(len(train))), torch.tensor(train.labels)),
        (test.load(range(len(test))), torch.tensor(test.labels)),
    )


def test_layout_labels_and_errors(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs", {"train": 10, "val": 4})
    data = load_dataset("imagefolder", root, val_size=6)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 12)
    assert data.input_shape == (3, 8, 8) and data.num_classes == 3
    assert data.train.streamed and data.test.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    x = data.train.inputs(torch.tensor([[0, 1], [2, 3]]))
    assert x.shape == (2, 2, 3, 8, 8) and abs(float(data.train.inputs(slice(None)).mean())) < 0.2
    (root / "val" / "class_9").mkdir()
    with pytest.raises(Exception, match="class_9"):
        load_dataset("imagefolder", root)


def test_bad_folders_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    root = write_folder(tmp_path / "imgs", {"train": 4, "val": 2})
    (root / "train" / "class_1" / "001.png").write_bytes(b"not a png")
    for folder, needle in ((tmp_path / "empty", "not an image folder"), (root, "001.png")):
        assert (
            main(
                [
                    "find",
                    "--out",
                    str(tmp_path / "run"),
                    "--dataset",
                    "imagefolder",
                    "--data-dir",
                    str(folder),
                    "--model",
                    "resnet20",
                    "--iterations",
                    "2",
                    "--batch-size",
                    "4",
                    "--rounds",
                    "1",
                    "--workers",
                    "0",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_streamed_folder_trains_as_the_same_images_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_folder(tmp_path / "imgs", {"train": 12, "val": 4})
    monkeypatch.setenv(ENV, str(root))
    common = [
        "--model",
        "resnet20",
        "--iterations",
        "6",
        "--rounds",
        "1",
        "--batch-size",
        "6",
        "--eval-every",
        "3",
        "--rewind",
        "iteration:2",
        "--val-size",
        "6",
        "--no-progress",
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            main(
                [
                    "find",
                    "--out",
                    str(tmp_path / "disk"),
                    "--dataset",
                    "imagefolder",
                    "--data-dir",
                    str(root),
                    "--workers",
                    "2",
                    *common,
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "find",
                    "--out",
                    str(tmp_path / "mem"),
                    "--data",
                    "tests.test_find_imagefolder:in_memory",
                    *common,
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(before)
    for level in (0, 1):
        a = torch.load(tmp_path / "disk" / f"level_{level:02d}" / "final.pt", weights_only=True)
        b = torch.load(tmp_path / "mem" / f"level_{level:02d}" / "final.pt", weights_only=True)
        for name in a:
            assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5), (level, name)
