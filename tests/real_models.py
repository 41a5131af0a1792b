"""Real architectures, small: CNN blocks written here (torchvision does not import with the CPU
torch build), transformers from tiny configs, and global magnitude pruning as users run it.

Used by tests and by benchmarks/e2e_bench.py. Nothing is downloaded: every model is built from
code and random weights; BatchNorm layers get real running statistics from a few batches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@torch.no_grad()
def prune_global_(model: nn.Module, sparsity: float) -> None:
    """Global unstructured magnitude pruning of every Linear / Conv weight (as
    torch.nn.utils.prune.global_unstructured with L1Unstructured): zero the `sparsity`
    fraction of all their weights with the smallest magnitude."""
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    if not weights:
        return
    scores = torch.cat([w.detach().abs().flatten() for w in weights])
    k = int(sparsity * scores.numel())
    if k == 0:
        return
    threshold = scores.kthvalue(k).values
    for w in weights:
        w.mul_(w.abs() > threshold)


@torch.no_grad()
def calibrate_bn_(model: nn.Module, example: Tensor, batches: int = 3) -> nn.Module:
    """Give BatchNorm layers real running statistics (a few forward passes in train mode on
    inputs like `example`), then return the model in eval mode."""
    model.train()
    for _ in range(batches):
        model(torch.randn_like(example))
    return model.eval()


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv-BN when the shape
    changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (torchvision's layout); `width` scales the channels (64 = the real model),
    `cifar` uses the 3x3 stem without max-pooling for 32x32 inputs."""

    def __init__(self, width: int = 64, classes: int = 1000, cifar: bool = False) -> None:
        super().__init__()
        if cifar:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers, cin = [], width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(self.fc1(self.pool(x)))
        return x * torch.sigmoid(self.fc2(s))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 / EfficientNet block: 1x1 expand-BN-act, depthwise kxk-BN-act,
    squeeze-excite, 1x1 project-BN, residual when shapes match."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.expand = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(),
        )
        self.se = SqueezeExcite(hidden, max(8, hidden // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.use_residual else y


class MobileNetLike(nn.Module):
    """A MobileNetV3 / EfficientNet-like stack of inverted residual blocks with SE."""

    def __init__(self, width: int = 16, classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.Hardswish()
        )
        cfg = [(width, 24, 4, 3, 2), (24, 24, 3, 3, 1), (24, 40, 3, 5, 2), (40, 40, 3, 5, 1),
               (40, 80, 6, 3, 2), (80, 80, 4, 3, 1), (80, 112, 6, 3, 1)]  # fmt: skip
        self.blocks = nn.Sequential(*[InvertedResidual(*c) for c in cfg])
        self.head = nn.Sequential(
            nn.Conv2d(112, 480, 1, bias=False), nn.BatchNorm2d(480), nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(480, 640), nn.Hardswish(),
            nn.Linear(640, classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv, LayerNorm (channels last), Linear 4x expand, GELU,
    Linear project, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # NHWC
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """A ConvNeXt-T-like network: patchify stem, stages of ConvNeXt blocks with downsampling."""

    def __init__(self, dims: tuple[int, ...] = (48, 96, 192), depth: int = 2, classes: int = 100):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        stages: list[nn.Module] = []
        for i, d in enumerate(dims):
            if i:
                stages.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6),
                                            nn.Conv2d(dims[i - 1], d, 2, 2)))  # fmt: skip
            stages += [ConvNeXtBlock(d) for _ in range(depth)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean((-2, -1))))


class EncoderLayer(nn.Module):
    """A BERT layer written out: self-attention (q/k/v/out Linear, scaled dot product),
    residual + LayerNorm, GELU MLP, residual + LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = torch.nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=mask
        )
        x = self.norm1(x + self.out(a.transpose(1, 2).reshape(b, t, d)))
        return self.norm2(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


class BertLike(nn.Module):
    """A BERT-like encoder on token ids (and an attention mask of 1/0 per token)."""

    def __init__(self, vocab: int = 1000, dim: int = 256, heads: int = 4, ffn: int = 1024,
                 layers: int = 4, max_len: int = 512) -> None:  # fmt: skip
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([EncoderLayer(dim, heads, ffn) for _ in range(layers)])
        self.pooler = nn.Linear(dim, dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        t = input_ids.shape[1]
        x = self.norm(self.tokens(input_ids) + self.positions.weight[:t])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask[:, None, None, :].to(torch.bool)
        for layer in self.layers:
            x = layer(x, mask)
        return {"last_hidden_state": x, "pooled": torch.tanh(self.pooler(x[:, 0]))}


def token_inputs(batch: int, length: int, vocab: int = 1000, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length - length // 8 :] = 0  # padding at the end of each sequence
    return {"input_ids": ids, "attention_mask": mask}


class AttentionClassifier(nn.Module):
    """nn.MultiheadAttention (which reads out_proj.weight itself) between two Linear layers."""

    def __init__(self, dim: int = 64, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a.mean(1))
