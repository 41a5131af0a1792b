"""Small architectures the tests reference as `tests.models_for_tests:NAME` (via --arch)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def tiny_convnet() -> nn.Sequential:
    # groups, stride, padding, dilation, with and without bias; BatchNorm and pooling pass through
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


def tiny_conv1d() -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(3, 6, 5, padding=2), nn.ReLU(), nn.Conv1d(6, 2, 1, bias=False))


@torch.no_grad()
def prune_random_(model: nn.Module, density: float, seed: int = 0) -> None:
    """Zero all but ~`density` of each Linear/Conv weight (random positions)."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
            keep = torch.rand(m.weight.shape, generator=generator) < density
            m.weight.mul_(keep)
