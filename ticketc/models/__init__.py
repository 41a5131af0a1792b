"""Built-in architectures of the lottery-ticket paper (Frankle & Carbin, ICLR 2019).

Each factory is referenced as `ticketc.models:NAME` in ticket checkpoints and `--arch`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["REGISTRY", "conv2", "conv4", "conv6", "lenet300"]


def lenet300(num_classes: int = 10, in_features: int = 784) -> nn.Sequential:
    """Lenet-300-100: 784-300-100-10 fully connected, ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def _conv_net(
    channels: list[int], num_classes: int, in_channels: int, image_size: int
) -> nn.Sequential:
    # Conv-2/4/6: pairs of 3x3 convs (padding 1), each pair followed by 2x2 max-pooling,
    # then fully connected 256-256-num_classes.
    layers: list[nn.Module] = []
    c_in, size = in_channels, image_size
    for i, c_out in enumerate(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
        c_in = c_out
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    layers += [
        nn.Flatten(),
        nn.Linear(c_in * size * size, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    ]
    return nn.Sequential(*layers)


def conv2(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Sequential:
    return _conv_net([64, 64], num_classes, in_channels, image_size)


def conv4(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Sequential:
    return _conv_net([64, 64, 128, 128], num_classes, in_channels, image_size)


def conv6(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Sequential:
    return _conv_net([64, 64, 128, 128, 256, 256], num_classes, in_channels, image_size)


REGISTRY = {"lenet300": lenet300, "conv2": conv2, "conv4": conv4, "conv6": conv6}


def example_input(name: str, batch: int = 1) -> torch.Tensor:
    """A random input of the shape the built-in model `name` takes."""
    if name == "lenet300":
        return torch.randn(batch, 1, 28, 28)
    if name in ("conv2", "conv4", "conv6"):
        return torch.randn(batch, 3, 32, 32)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
