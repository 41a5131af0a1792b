"""Data augmentation on batches held in memory: random crops and horizontal flips of a whole
batch of images with a few tensor operations, no per-sample Python (the CIFAR-10 recipe of He et
al. 2016, used by Frankle et al. 2020: pad 4 pixels, crop back to size, flip half the images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 4


def crop_flip_params(
    shape: tuple[int, ...], generator: torch.Generator, pad: int = PAD
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random offsets (rows, columns, int64 in [0, 2 pad]) and flips (bool) for a batch of
    `shape` (e.g. [M, B]: one per image), drawn from `generator`."""
    dy = torch.randint(0, 2 * pad + 1, shape, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, shape, generator=generator)
    flip = torch.rand(shape, generator=generator) < 0.5
    return dy, dx, flip


def crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = PAD
) -> torch.Tensor:
    """Images x [..., C, H, W] zero-padded by `pad` pixels, cropped back to H x W at offsets
    (dy, dx) [...] and mirrored left-right where `flip` [...]; returns a new tensor of x's
    shape. (Zero is the mean pixel once the data are normalised.)"""
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    n = dy.numel()
    if tuple(dy.shape) != tuple(lead) or x.dim() < 3:
        raise ValueError(f"offsets of shape {tuple(dy.shape)} do not match images {tuple(x.shape)}")
    xp = F.pad(x.reshape(n, c, h, w), (pad, pad, pad, pad))
    rows = dy.reshape(n, 1) + torch.arange(h)  # [n, h]
    cols = dx.reshape(n, 1) + torch.arange(w)  # [n, w]
    cols = torch.where(flip.reshape(n, 1), cols.flip(1), cols)
    out = xp[
        torch.arange(n).view(n, 1, 1, 1),
        torch.arange(c).view(1, c, 1, 1),
        rows.view(n, 1, h, 1),
        cols.view(n, 1, 1, w),
    ]
    return out.reshape(x.shape)
