"""The deeper networks of Frankle et al. 2020 on CIFAR-10-format data written here: ResNet-20 and
VGG-16 train with the paper's recipe (SGD, schedule, augmentation), prune globally with the
classifier left whole, and rewind to iteration k; the augmentation and both CIFAR formats."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ticketc.checkpoint import load_ticket
from ticketc.cli import main
from ticketc.data import cifar10, load_dataset
from ticketc.data.augment import crop_flip, crop_flip_params
from ticketc.find import FindConfig
from ticketc.models import resnet20, vgg16


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n CIFAR-10-format images [n, 3072] uint8 whose class shows in their mean colour."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    pixels = (
        rng.integers(0, 128, (n, 3, 1024))
        + (labels * 12)[:, None, None] * np.array([1, 0, -1])[None, :, None]
        + 64
    )
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, 3072), labels


def write_cifar(folder: Path, binary: bool, per_batch: int = 40) -> Path:
    """The five training batches and the test batch, in the binary or python format."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate((*cifar10.TRAIN_FILES, cifar10.TEST_FILE)):
        pixels, labels = cifar_arrays(per_batch, i)
        if binary:
            records = np.concatenate([labels[:, None].astype(np.uint8), pixels], axis=1)
            (folder / f"{name}.bin").write_bytes(records.tobytes())
        else:
            (folder / name).write_bytes(
                pickle.dumps({b"data": pixels, b"labels": labels.tolist()}, protocol=2)
            )
    return folder


def test_binary_and_python_batches_read_the_same_images(tmp_path: Path) -> None:
    a = load_dataset("cifar10", write_cifar(tmp_path / "bin", True), val_size=20)
    b = load_dataset("cifar10", write_cifar(tmp_path / "py", False), val_size=20)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).y, getattr(b, split).y)
    assert a.input_shape == (3, 32, 32) and len(a.train) == 180


def test_a_truncated_binary_batch_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_cifar(tmp_path / "bin", True)
    (folder / "data_batch_3.bin").write_bytes(b"\0" * 5000)
    assert (
        main(
            [
                "find",
                "--out",
                str(tmp_path / "run"),
                "--dataset",
                "cifar10",
                "--data-dir",
                str(folder),
                "--model",
                "resnet20",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data_batch_3.bin" in err[0] and "3073-byte" in err[0]
    assert not (tmp_path / "run").exists()


def test_crop_flip_is_each_image_padded_cropped_and_mirrored() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, 6)  # [M, B, C, H, W]
    dy, dx, flip = crop_flip_params((2, 5), g)
    out = crop_flip(x, dy, dx, flip)
    assert out.shape == x.shape and bool(flip.any()) and not bool(flip.all())
    for m in range(2):
        for b in range(5):
            padded = torch.nn.functional.pad(x[m, b], (4, 4, 4, 4))
            want = padded[:, dy[m, b] : dy[m, b] + 8, dx[m, b] : dx[m, b] + 6]
            if flip[m, b]:
                want = want.flip(-1)
            assert torch.equal(out[m, b], want)
    same = crop_flip_params((2, 5), torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip((dy, dx, flip), same, strict=True))


def test_the_2020_recipe_is_the_default_for_resnet20_and_vgg16() -> None:
    for model in ("resnet20", "vgg16"):
        c = FindConfig(model=model, dataset="cifar10").resolved()
        assert (c.optimizer, c.batch_size, c.lr, c.weight_decay, c.strategy) == (
            "sgd",
            128,
            0.1,
            1e-4,
            "global",
        )
        assert c.lr_milestones == (31_200, 46_800) and c.iterations == 62_400
        assert c.augment and not c.prune_output and c.rewind == "iteration:2000"
        assert [c.lr_at(t) for t in (0, 31_199, 31_200, 46_800)] == pytest.approx(
            [0.1, 0.1, 0.01, 0.001]
        )
    lenet = FindConfig().resolved()
    assert (lenet.optimizer, lenet.batch_size, lenet.augment, lenet.prune_output) == (
        "adam",
        60,
        False,
        True,
    )
    assert sum(p.numel() for n, p in resnet20().named_parameters() if p.dim() > 1) == 270_896
    assert sum(p.numel() for n, p in vgg16().named_parameters() if p.dim() > 1) == 14_715_584


def _load(p: Path) -> dict[str, torch.Tensor]:
    return torch.load(p, weights_only=True)


@pytest.mark.slow
def test_resnet20_trains_prunes_globally_and_rewinds(tmp_path: Path) -> None:
    data = write_cifar(tmp_path / "cifar", binary=True)
    run = tmp_path / "run"
    assert (
        main(
            [
                "find",
                "--out",
                str(run),
                "--dataset",
                "cifar10",
                "--data-dir",
                str(data),
                "--model",
                "resnet20",
                "--iterations",
                "8",
                "--rounds",
                "2",
                "--batch-size",
                "16",
                "--rewind",
                "iteration:3",
                "--lr-milestones",
                "5",
                "--eval-every",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    config = json.loads((run / "config.json").read_text())
    assert (config["strategy"], config["optimizer"], config["augment"]) == ("global", "sgd", True)
    rewind_point = _load(run / "rewind_point.pt")
    previous = None
    for level in range(3):
        d = run / f"level_{level:02d}"
        mask, final, rewind = _load(d / "mask.pt"), _load(d / "final.pt"), _load(d / "rewind.pt")
        assert "fc.weight" not in mask and "conv.weight" in mask  # the classifier stays whole
        assert all(n.endswith("weight") and final[n].dim() == 4 for n in mask)  # convs only
        for n, m in mask.items():
            assert bool((final[n][~m] == 0).all())
        if level:
            # every weight, BatchNorm statistics included, restarts from iteration 3
            for n, t in rewind.items():
                assert torch.equal(t, rewind_point[n]), n
            # one threshold across all layers: every weight pruned this round was no larger
            # than every survivor, whatever its layer
            assert previous is not None
            before = _load(run / f"level_{level - 1:02d}" / "final.pt")
            removed = torch.cat([before[n][previous[n] & ~m].abs() for n, m in mask.items()])
            kept = torch.cat([before[n][m].abs() for n, m in mask.items()])
            assert len(removed) and float(removed.max()) <= float(kept.min())
            sizes = {n: m.numel() for n, m in mask.items()}
            total = sum(sizes.values())
            assert sum(int(m.sum()) for m in mask.values()) == pytest.approx(
                total * 0.8**level, abs=2
            )
            per_layer = {n: float(m.float().mean()) for n, m in mask.items()}
            assert max(per_layer.values()) - min(per_layer.values()) > 0.02  # not layerwise
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["start_iteration"] == (3 if level else 0)
        previous = mask
    ticket = load_ticket(run / "ticket.pt")
    assert ticket.rewind_point == "iteration:3"
    assert rewind_point["bn.num_batches_tracked"] == 3  # the state at iteration 3


@pytest.mark.slow
def test_vgg16_trains_prunes_and_rewinds(tmp_path: Path) -> None:
    data = write_cifar(tmp_path / "cifar", binary=False, per_batch=8)
    run = tmp_path / "run"
    assert (
        main(
            [
                "find",
                "--out",
                str(run),
                "--dataset",
                "cifar10",
                "--data-dir",
                str(data),
                "--model",
                "vgg16",
                "--iterations",
                "3",
                "--rounds",
                "1",
                "--batch-size",
                "4",
                "--rewind",
                "iteration:1",
                "--no-progress",
                "--val-size",
                "4",
            ]
        )
        == 0
    )
    mask, final = _load(run / "level_01" / "mask.pt"), _load(run / "level_01" / "final.pt")
    classifier = [n for n, t in final.items() if t.dim() == 2]
    assert len(mask) == 13 and classifier == ["45.weight"] and classifier[0] not in mask
    assert sum(int(m.sum()) for m in mask.values()) == pytest.approx(
        0.8 * sum(m.numel() for m in mask.values()), abs=1
    )
    assert load_ticket(run / "ticket.pt").rewind_point == "iteration:1"
