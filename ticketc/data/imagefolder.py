"""Image folders (`--dataset imagefolder --data-dir DIR`), streamed from disk, ImageNet-style:

    DIR/train/<class>/<image>     training images, one folder per class (sorted names: 0, 1, ...)
    DIR/val/<class>/<image>       the test split (as lottery-ticket papers use ImageNet's val),
    DIR/test/<class>/<image>      or this one when it exists

Images are decoded by Pillow in DataLoader worker processes while the network trains, so the
dataset never has to fit in memory: `ImageFiles` is a map-style `torch.utils.data.Dataset`
over the file list. Every image becomes RGB float32 [3, H, W] at the size of the first
training image (others are resized to it), normalised per channel with the mean and standard
deviation of up to 256 training images. A data folder is identified (for --resume) by the md5
of its files' relative paths, sizes and labels, not of their pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ticketc.errors import UserError

SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp"})
STAT_IMAGES = 256


@dataclass(frozen=True)
class ImageFiles(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Images on disk: item i is (x float32 [3, H, W] normalised, label int).

    root: the folder the paths are relative to; size: (H, W); mean, std: per channel.
    """

    root: Path
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, ...]:
        """[N, 3, H, W], as the stacked tensor would have."""
        return (len(self.paths), 3, *self.size)

    def _raw(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.root / self.paths[i]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
                if rgb.size != (self.size[1], self.size[0]):
                    rgb = rgb.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                pixels = np.asarray(rgb, dtype=np.float32) / 255.0
        except (OSError, ValueError) as e:
            raise UserError(f"--data-dir: cannot read image {path}: {e}") from None
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (self._raw(i) - mean) / std, self.labels[i]

    def load(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at `index` (any shape), decoded here: [*index.shape, 3, H, W]."""
        idx = torch.as_tensor(index, dtype=torch.long)
        flat = [self[int(i)][0] for i in idx.reshape(-1)]
        stacked = torch.stack(flat) if flat else torch.empty(0, 3, *self.size)
        return stacked.view(*idx.shape, 3, *self.size)

    def subset(self, index: torch.Tensor) -> ImageFiles:
        keep = [int(i) for i in index]
        return ImageFiles(
            self.root,
            tuple(self.paths[i] for i in keep),
            tuple(self.labels[i] for i in keep),
            self.size,
            self.mean,
            self.std,
        )

    def fingerprint(self, h: hashlib._Hash) -> None:
        """Feed the relative paths, sizes and labels into `h`."""
        for p, y in zip(self.paths, self.labels, strict=True):
            h.update(f"{p}\0{(self.root / p).stat().st_size}\0{y}\n".encode())


def _list(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        sub = folder / name
        if not sub.is_dir():
            continue
        for f in sorted(sub.rglob("*")):
            if f.suffix.lower() in SUFFIXES and f.is_file():
                paths.append(str(f.relative_to(folder.parent)))
                labels.append(label)
    return paths, labels


def load_imagefolder(directory: Path) -> tuple[ImageFiles, ImageFiles, int]:
    """(train, test, number of classes) of an image folder; UserError naming --data-dir when
    the layout is not the one above."""
    layout = "DIR/train/<class>/*.png|jpg and DIR/val/<class>/* (or DIR/test)"
    train_dir = directory / "train"
    test_dir = directory / "test" if (directory / "test").is_dir() else directory / "val"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise UserError(f"--data-dir {directory} is not an image folder: expected {layout}")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise UserError(
            f"--data-dir {directory}: {train_dir} has {len(classes)} class folders; "
            "a classifier needs two or more"
        )
    unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise UserError(
            f"--data-dir {directory}: {test_dir.name}/ has classes that train/ lacks: "
            f"{', '.join(unknown[:5])}"
        )
    train_paths, train_labels = _list(train_dir, classes)
    test_paths, test_labels = _list(test_dir, classes)
    if not train_paths:
        raise UserError(
            f"--data-dir {directory}: no images in {train_dir} ({', '.join(sorted(SUFFIXES))})"
        )
    from PIL import Image

    try:
        with Image.open(directory / train_paths[0]) as img:
            width, height = img.size
    except OSError as e:
        raise UserError(
            f"--data-dir: cannot read image {directory / train_paths[0]}: {e}"
        ) from None
    raw = ImageFiles(directory, tuple(train_paths), tuple(train_labels), (height, width))
    pick = torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))[:STAT_IMAGES]
    sample = torch.stack([raw._raw(int(i)) for i in pick])  # [n, 3, H, W] in [0, 1]
    m, s = sample.mean((0, 2, 3)).tolist(), sample.std((0, 2, 3)).clamp_min(1e-3).tolist()
    mean, std = (m[0], m[1], m[2]), (s[0], s[1], s[2])
    train = ImageFiles(
        directory, tuple(train_paths), tuple(train_labels), (height, width), mean, std
    )
    test = ImageFiles(directory, tuple(test_paths), tuple(test_labels), (height, width), mean, std)
    return train, test, len(classes)
