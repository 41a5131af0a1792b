"""The two stacked forms of a network that `Ensemble` trains: the ReLU MLP it runs by hand
(`mlp_layers`), and every member as one module for DistributedDataParallel (`StackedMembers`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp_layers(model: nn.Module) -> list[str] | None:
    """Prefixes of the Linear layers when `model` is a plain ReLU MLP, else None."""
    if not isinstance(model, nn.Sequential):
        return None
    children = list(model.named_children())
    if children and isinstance(children[0][1], nn.Flatten):
        children = children[1:]
    if not children or len(children) % 2 == 0:
        return None
    prefixes = []
    for i, (name, module) in enumerate(children):
        expected = nn.Linear if i % 2 == 0 else nn.ReLU
        if type(module) is not expected:
            return None
        if i % 2 == 0:
            if module.bias is None:
                return None
            prefixes.append(name)
    return prefixes


class StackedMembers(nn.Module):
    """Every member's parameters [M, *shape] and buffers as one module whose forward runs all
    members (`torch.func.vmap` over `functional_call` of the architecture, training mode), so
    that DistributedDataParallel can reduce their gradients and broadcast their buffers.

    The architecture itself is kept outside the module tree: its own parameters are not
    trained.
    """

    def __init__(self, base: nn.Module, params: dict[str, nn.Parameter],
                 buffers: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._base = [base]
        self.param_names, self.buffer_names = list(params), list(buffers)
        self.stacked = nn.ParameterList(params.values())
        for i, b in enumerate(buffers.values()):
            self.register_buffer(f"buffer_{i}", b)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, B, ...], y [M, B] -> each member's mean loss [M] and correct count [M]."""
        from torch.func import functional_call, vmap

        base = self._base[0].train()
        params = dict(zip(self.param_names, self.stacked, strict=True))
        buffers = {n: getattr(self, f"buffer_{i}") for i, n in enumerate(self.buffer_names)}

        def member(p, b, xb, yb):  # type: ignore[no-untyped-def]
            logits = functional_call(base, (p, b), (xb,))
            return F.cross_entropy(logits, yb), (logits.argmax(-1) == yb).sum()

        loss, correct = vmap(member, randomness="different")(params, buffers, x, y)
        return loss, correct
