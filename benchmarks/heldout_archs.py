"""Architectures no test builds, for `export_matrix.py --archs heldout`: torchvision and timm CNNs
and transformers (BatchNorm statistics made non-trivial, some gammas zero), and a GRU tagger
over int64 tokens with a dict output.

torchvision does not import with the CPU torch build the project installs, so this needs its
own venv (e.g. `pip install torch==2.14.1 torchvision==0.29.1 timm` and `pip install -e .`);
it never runs in CI. Each factory is importable as `benchmarks.heldout_archs:NAME`, the
`--arch` the matrix passes to `ticketc export`.

    python -m benchmarks.export_matrix --archs heldout --rates 0.9 --forms state_dict,pt2 \
        --values fp32,int4 --name heldout_matrix
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tests import models_for_tests as zoo

TORCHVISION = ("mobilenet_v2", "shufflenet_v2_x0_5", "mnasnet0_5", "regnet_x_400mf", "swin_t")
# timm's own test-sized configurations of its families (input sizes from their configs)
TIMM = {
    "test_byobnet": 160,
    "test_coatnet": 160,
    "test_convnext": 160,
    "test_efficientnet": 160,
    "test_maxvit": 160,
    "test_nfnet": 160,
    "test_vit": 160,
    "test_vit_relpos": 160,
    "test_mambaout": 160,
}


def _batchnorm_statistics_(model: nn.Module) -> nn.Module:
    """Trained-looking BatchNorms (`tests.models_for_tests.batchnorm_statistics_`) with 10 % of
    the gammas zero, as timm's zero-init last BN leaves some."""
    zoo.batchnorm_statistics_(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[torch.rand(m.num_features, generator=generator) < 0.1] = 0.0
    return model


def prune_(model: nn.Module, amount: float, make_input: Callable[[], torch.Tensor]) -> None:
    """Prune `model` as a trained network prunes, in place: global L1 unstructured pruning
    (torch.nn.utils.prune.global_unstructured, hooks left on) of each weight by |w| over its
    layer's mean |w|, then BatchNorm running statistics recomputed on random inputs (those of the
    pruned network itself, as after fine-tuning).

    The untrained torchvision / timm layers differ in scale (heads at std 0.01): plain global
    magnitude pruning then removes whole layers (the head of 5 of 14 models at 50 %), and with
    statistics that are not the network's own, 11 of 14 outputs did not depend on the input,
    so comparing them proved nothing. Scores relative to each layer prune every layer at about
    the same rate. Channels the pruning emptied have no variance, and BatchNorm's 1/sqrt(eps)
    then amplifies fp32 rounding 300-fold (MobileNetV2 at 90 %: PyTorch's own fp32 and fp64
    outputs 3.5 % apart), so the variances are floored at 0.01."""
    from torch.nn.utils import prune

    params = zoo.prunable(model)
    scores = {}
    for module, name in params:
        weight = getattr(module, name).detach().abs()
        scores[(module, name)] = weight / weight.mean().clamp_min(1e-30)
    prune.global_unstructured(params, prune.L1Unstructured, amount=amount, importance_scores=scores)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
        m.train()
    with torch.no_grad():
        for _ in range(3):
            model(make_input())
    for m in norms:
        m.momentum = 0.1
        m.eval()
        m.running_var.clamp_(min=0.01)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return _batchnorm_statistics_(getattr(torchvision.models, name)(num_classes=10))

    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return _batchnorm_statistics_(timm.create_model(name, num_classes=10))

    return build


class GruTagger(nn.Module):
    """Token embeddings -> bidirectional GRU -> per-token logits, as {"logits", "pooled"}."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(200, 24)
        self.gru = nn.GRU(24, 32, batch_first=True, bidirectional=True)
        self.head = nn.Linear(64, 5)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.gru(self.embed(ids))[0]
        return {"logits": self.head(hidden), "pooled": hidden.mean(1)}


def gru_tagger() -> nn.Module:
    return GruTagger()


FACTORIES: dict[str, Callable[[], nn.Module]] = {
    **{f"tv_{name}": _torchvision(name) for name in TORCHVISION},
    **{f"timm_{name}": _timm(name) for name in TIMM},
    "gru_tagger": gru_tagger,
}


def __getattr__(name: str) -> Callable[[], nn.Module]:  # `--arch benchmarks.heldout_archs:NAME`
    if name in FACTORIES:
        return FACTORIES[name]
    raise AttributeError(name)


def _image(size: int) -> tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]:
    return ("float32", (1, 3, size, size), lambda: torch.randn(3, 3, size, size))


# name -> (factory reference, {input name: (dtype, shape, maker)}), as export_matrix.ARCHS
HELDOUT = {
    **{
        f"tv_{name}": (f"benchmarks.heldout_archs:tv_{name}", {"x": _image(64)})
        for name in TORCHVISION
    },
    **{
        f"timm_{name}": (f"benchmarks.heldout_archs:timm_{name}", {"x": _image(size)})
        for name, size in TIMM.items()
    },
    "gru_tagger": (
        "benchmarks.heldout_archs:gru_tagger",
        {"ids": ("int64", (1, 10), lambda: torch.randint(0, 200, (3, 10)))},
    ),
}
