"""Built-in architectures of the lottery-ticket papers: Lenet-300-100 and Conv-2/4/6 (Frankle &
Carbin, ICLR 2019), ResNet-20 and VGG-16 for CIFAR-10 (Frankle et al., ICML 2020, as in open_lth).

Each factory is referenced as `ticketc.models:NAME` in ticket checkpoints and `--arch`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["REGISTRY", "conv2", "conv4", "conv6", "lenet300", "resnet20", "vgg16"]


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


class BasicBlock(nn.Module):
    """Two 3x3 conv-BatchNorm layers and a shortcut (a 1x1 conv-BatchNorm where the block
    changes the shape, as open_lth's cifar_resnet), ReLU after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2): a 3x3 conv, three stages of `blocks`
    BasicBlocks of width, 2 width, 4 width channels (stride 2 between stages), global average
    pooling, a Linear classifier. Input [N, in_channels, H, W] (H, W >= 4), output [N, classes]."""

    def __init__(self, blocks: int, width: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        c_in = width
        for stage in range(3):
            c_out = width * 2**stage
            for b in range(blocks):
                layers.append(BasicBlock(c_in, c_out, 2 if stage and b == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        _kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(torch.relu(self.bn(self.conv(x))))
        return self.fc(out.mean((2, 3)))


def _kaiming_init_(model: nn.Module) -> None:
    # open_lth's initializer for its CIFAR networks: Kaiming-normal conv and linear weights.
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """ResNet-20 for CIFAR-10 (0.27M weights at width 16); `width` 32, 64: the wider ResNets
    of Frankle et al. 2020 (ResNet-20-32, -64)."""
    return ResNet(3, width, num_classes, in_channels)


VGG16_CHANNELS: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
]


def vgg16(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """VGG-16 for CIFAR-10 as in open_lth (cifar_vgg_16): thirteen 3x3 conv-BatchNorm-ReLU
    layers with four 2x2 max-pools, global average pooling, one Linear layer (14.7M weights).
    Input [N, in_channels, H, W] with H, W >= 16."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in VGG16_CHANNELS:
        if c == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        assert isinstance(c, int)
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    model = nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)
    )
    _kaiming_init_(model)
    return model


REGISTRY = {
    "lenet300": lenet300,
    "conv2": conv2,
    "conv4": conv4,
    "conv6": conv6,
    "resnet20": resnet20,
    "vgg16": vgg16,
}


def example_input(name: str, batch: int = 1) -> torch.Tensor:
    """A random input of the shape the built-in model `name` takes."""
    if name == "lenet300":
        return torch.randn(batch, 1, 28, 28)
    if name in ("conv2", "conv4", "conv6", "resnet20", "vgg16"):
        return torch.randn(batch, 3, 32, 32)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
