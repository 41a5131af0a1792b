"""Small architectures the tests reference as `tests.models_for_tests:NAME` (via --arch), and
pruning helpers. They cover what torch.onnx rewrites on the way: BatchNorm folded into convs
(with a zero gamma), tied weights, LSTM / GRU gates, ConvTranspose, dict outputs."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def tiny_mlp_tanh() -> nn.Sequential:
    """tiny_mlp's parameters (same names and shapes) around another activation."""
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))


class CausalAttention(nn.Module):
    """One attention head with the additive causal mask kept as a buffer: -inf above the
    diagonal on purpose (nn.Transformer.generate_square_subsequent_mask), finite outputs."""

    def __init__(self, length: int = 6, width: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.o = nn.Linear(width, 4)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / 4.0 + self.mask
        return self.o(scores.softmax(-1) @ self.v(x))


class ProjectedLSTM(nn.Module):
    """An LSTM with projections (proj_size), which ONNX's LSTM cannot express."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True, proj_size=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


def causal_attention() -> nn.Module:
    return CausalAttention()


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


class BasicBlock(nn.Module):
    """A ResNet basic block (conv-BN-ReLU-conv-BN + identity), as torchvision writes it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + y)


def same_scale_(model: nn.Module, std: float = 0.3, seed: int = 2) -> nn.Module:
    """Redraw every weight of rank >= 2 of `model` from N(0, std^2), in place, as training
    leaves layers of comparable scale: with PyTorch's default initialisations the layers differ
    (an Embedding at std 1, a Linear(16, 16) within 0.25), and global magnitude pruning then
    deletes the smallest-initialised layer whole, after which the model answers every input
    alike and matching its outputs proves nothing. Returns `model`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(std * torch.randn(p.shape, generator=generator))
    return model


def batchnorm_statistics_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm2d of `model` statistics and affine parameters as training leaves
    them (running_var 0.25-4, nonzero means, gamma around 1), in place: folding a BatchNorm
    into its conv then changes every weight. Returns `model`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(0.25 + 3.75 * torch.rand(m.num_features, generator=generator))
                m.weight.copy_(1 + 0.5 * torch.randn(m.num_features, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=generator))
    return model


class ResNetTiny(nn.Module):
    """Stem conv-BN, two basic blocks (the second's last BN with gamma = 0, as timm's
    zero_init_last), a depthwise conv, pooling and a classifier; BatchNorm statistics are
    non-trivial (running_var up to 4, nonzero means), so folding them changes every weight."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)
        batchnorm_statistics_(self)
        with torch.no_grad():
            self.blocks[1].bn2.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.fc(self.depthwise(x).mean((2, 3)))


class TiedLM(nn.Module):
    """Embedding -> Linear -> a head sharing the embedding's weight (as GPT-2 ties lm_head)."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        same_scale_(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


class Recurrent(nn.Module):
    """LSTM then GRU over a sequence (batch first), and a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 12, batch_first=True)
        self.gru = nn.GRU(12, 8, batch_first=True)
        self.out = nn.Linear(8, 3)
        same_scale_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru(self.lstm(x)[0])
        return self.out(y)


class Upsampler(nn.Module):
    """Conv -> ConvTranspose (stride 2) -> Conv."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.head = nn.Conv2d(4, 2, 1)
        same_scale_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(torch.relu(self.down(x)))))


class DictOutput(nn.Module):
    """Returns a dict with a nested tuple: {"logits": ..., "extra": (hidden, scores)}, and
    uses a plain nn.Parameter matrix besides its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 12)
        self.proj = nn.Parameter(torch.randn(12, 7))
        self.head = nn.Linear(7, 4)
        same_scale_(self)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        hidden = torch.relu(self.fc(x))
        scores = hidden @ self.proj
        return {"logits": self.head(scores), "extra": (hidden, scores)}


class RelPosAttention(nn.Module):
    """timm's relative-position attention: scaled_dot_product_attention with a mask that is a
    permuted view of a bias table, then transpose(1, 2) and reshape (torch.onnx failed on it
    unless told to decompose attention with the math kernel)."""

    def __init__(self, dim: int = 16, heads: int = 2, tokens: int = 6) -> None:
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.qkv = nn.Linear(dim, 3 * dim)
        self.table = nn.Parameter(torch.randn(tokens * tokens, heads))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.table.view(self.tokens, self.tokens, -1).permute(2, 0, 1).unsqueeze(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Versioned(nn.Module):
    """Refuses a state dict without its version, as torchvision's MNASNet does: load_state_dict
    hands each module its entry of the state dict's `_metadata`."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):  # type: ignore[no-untyped-def]
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, not {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def versioned() -> nn.Module:
    return Versioned()


def resnet_tiny() -> nn.Module:
    return ResNetTiny()


def tied_lm() -> nn.Module:
    return TiedLM()


def recurrent() -> nn.Module:
    return Recurrent()


def upsampler() -> nn.Module:
    return Upsampler()


def dict_output() -> nn.Module:
    return DictOutput()


def relpos_attention() -> nn.Module:
    return RelPosAttention()


@torch.no_grad()
def prune_random_(model: nn.Module, density: float, seed: int = 0) -> None:
    """Zero all but ~`density` of each Linear/Conv weight (random positions)."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
            keep = torch.rand(m.weight.shape, generator=generator) < density
            m.weight.mul_(keep)


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every weight of rank >= 2 a module owns directly: what a user hands to
    torch.nn.utils.prune.global_unstructured (Linear, Conv*, Embedding, LSTM/GRU weights,
    plain Parameters). A tied weight appears under each module that holds it."""
    return [
        (module, name)
        for module in model.modules()
        for name, p in module.named_parameters(recurse=False)
        if p.dim() >= 2
    ]


def prune_global_(model: nn.Module, amount: float) -> None:
    """Global L1 unstructured pruning, hooks left on (prune.remove them to fold)."""
    from torch.nn.utils import prune

    prune.global_unstructured(prunable(model), prune.L1Unstructured, amount=amount)


# transformers models from tiny configs (random weights; nothing is downloaded)
def _installed_kernels_first() -> None:
    """Import the installed Hugging Face `kernels` (which transformers imports) before the
    repository's own kernels/ folder can shadow it: pytest and `python -m` put the repository
    root first on sys.path, and that folder is installed as ticketc.kernels, not `kernels`."""
    import importlib
    import sys
    from pathlib import Path

    if "kernels" in sys.modules:
        return
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: transformers then does without it
    finally:
        sys.path[:] = saved


def bert(vocab: int, hidden: int, layers: int, heads: int, intermediate: int) -> nn.Module:
    """A randomly initialised transformers BertModel of this shape, 64 positions."""
    _installed_kernels_first()
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=64,
    )
    return BertModel(config)


def gpt2(vocab: int, hidden: int, layers: int, heads: int) -> nn.Module:
    """A randomly initialised transformers GPT2LMHeadModel (head tied to wte), 64 positions."""
    _installed_kernels_first()
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64
    )
    return GPT2LMHeadModel(config)


def bert_tiny() -> nn.Module:
    return bert(vocab=99, hidden=32, layers=2, heads=2, intermediate=64)


def albert_tiny() -> nn.Module:
    """A randomly initialised transformers AlbertModel: one encoder layer shared by all 3."""
    _installed_kernels_first()
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        vocab_size=99,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return AlbertModel(config)


def gpt2_tiny() -> nn.Module:
    return gpt2(vocab=99, hidden=32, layers=2, heads=2)


def llama_tiny() -> nn.Module:
    _installed_kernels_first()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def vit_tiny() -> nn.Module:
    _installed_kernels_first()
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    return ViTForImageClassification(config)


def whisper_tiny() -> nn.Module:
    _installed_kernels_first()
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=99,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=16,
        decoder_start_token_id=1,
        pad_token_id=0,
    )
    return WhisperForConditionalGeneration(config)


def masked_weight(
    m: int, k: int, density: float, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A [m, k] weight with about `density` of it kept, row 0 empty and row m // 2 full (m >= 3,
    0 < density < 1): the edge rows every sparse format must handle."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(m, k, generator=gen) < density
    if m >= 3 and 0.0 < density < 1.0:
        keep[0] = False  # an empty row
        keep[m // 2] = True  # a full row
    return (torch.randn(m, k, generator=gen) * keep).to(dtype)
