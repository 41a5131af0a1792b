"""Magnitude pruning: which weights are prunable, per-layer rates, and the pruning step itself.

A mask set is `{param name: bool tensor}` for every prunable parameter; True keeps the weight.
Masks only ever shrink: a weight pruned in one round is never revived by a later one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

Masks = dict[str, torch.Tensor]

_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def prunable_parameters(
    model: nn.Module, *, biases: bool = False, norms: bool = False
) -> dict[str, str]:
    """Map each prunable parameter name to its layer type: "conv", "fc" or "output".

    The weights of Linear and Conv layers are prunable; the last of them (in registration order)
    is the output layer. Biases and the affine weights of normalisation layers (BatchNorm,
    InstanceNorm, LayerNorm, GroupNorm, RMSNorm) only when asked, biases at their layer's rate,
    normalisation layers at the fully connected rate. As in open_lth, a normalisation layer's
    running statistics are never pruned: they are state, rewound with the weights.
    """
    layer_types: dict[str, str] = {}
    last_weight = None
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (nn.Linear, *_CONVS)):
            layer_type = "conv" if not isinstance(module, nn.Linear) else "fc"
            layer_types[prefix + "weight"] = layer_type
            last_weight = prefix + "weight"
            if biases and module.bias is not None:
                layer_types[prefix + "bias"] = layer_type
        elif norms and isinstance(module, _NORMS):
            for p_name, p in module.named_parameters(recurse=False):
                if p is not None:
                    layer_types[prefix + p_name] = "fc"
    if last_weight is None:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to prune")
    layer_types[last_weight] = "output"
    if biases:
        bias = last_weight[: -len("weight")] + "bias"
        if bias in layer_types:
            layer_types[bias] = "output"
    return layer_types


def prune_counts(alive: Mapping[str, int], rates: Mapping[str, float]) -> dict[str, int]:
    """How many of each layer's surviving weights a layer-wise round removes."""
    return {name: int(round(rates[name] * n)) for name, n in alive.items()}


def schedule(sizes: Mapping[str, int], rates: Mapping[str, float], rounds: int) -> list[float]:
    """Overall fraction of weights remaining after 0..rounds layer-wise rounds."""
    alive = dict(sizes)
    total = sum(sizes.values())
    out = [1.0]
    for _ in range(rounds):
        removed = prune_counts(alive, rates)
        alive = {n: alive[n] - removed[n] for n in alive}
        out.append(sum(alive.values()) / total)
    return out


def _remove_smallest(scores: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """New mask without the `count` smallest-|score| survivors (ties broken by position)."""
    flat_mask = mask.reshape(-1)
    # Dead entries sort first, so the first (dead + count) positions are exactly what goes.
    keyed = torch.where(flat_mask, scores.reshape(-1).abs().float(), torch.tensor(-1.0))
    order = torch.argsort(keyed, stable=True)
    dead = int((~flat_mask).sum())
    new = torch.ones_like(flat_mask)
    new[order[: dead + count]] = False
    return new.view_as(mask)


def prune_layerwise(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    rates: Mapping[str, float],
) -> Masks:
    """Remove `rates[name]` of each layer's surviving weights, smallest magnitude first."""
    alive = {name: int(masks[name].sum()) for name in masks}
    counts = prune_counts(alive, rates)
    return {
        name: _remove_smallest(weights[name].detach(), masks[name], counts[name]) for name in masks
    }


def prune_global(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], rate: float
) -> Masks:
    """Remove `rate` of all surviving weights together, smallest magnitude first."""
    names = list(masks)
    scores = torch.cat([weights[n].detach().reshape(-1).float() for n in names])
    mask = torch.cat([masks[n].reshape(-1) for n in names])
    new = _remove_smallest(scores, mask, int(round(rate * int(mask.sum()))))
    out: Masks = {}
    offset = 0
    for n in names:
        size = masks[n].numel()
        out[n] = new[offset : offset + size].view_as(masks[n])
        offset += size
    return out


def compound_rate(rate: float, rounds: int) -> float:
    """The single-round rate that leaves what `rounds` rounds of `rate` leave (one-shot)."""
    return 1.0 - (1.0 - rate) ** rounds


def random_masks_like(masks: Mapping[str, torch.Tensor], generator: torch.Generator) -> Masks:
    """Random masks with exactly the same number of survivors per layer (the paper's control)."""
    out: Masks = {}
    for name, mask in masks.items():
        keep = int(mask.sum())
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[:keep]] = True
        out[name] = flat.view_as(mask)
    return out


def full_masks(model: nn.Module, layer_types: Mapping[str, str]) -> Masks:
    params = dict(model.named_parameters())
    return {name: torch.ones_like(params[name], dtype=torch.bool) for name in layer_types}


def density(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0


def layer_densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(m.float().mean()) for name, m in masks.items()}


def is_nested(inner: Mapping[str, torch.Tensor], outer: Mapping[str, torch.Tensor]) -> bool:
    """True when every weight `inner` keeps is also kept by `outer`."""
    return all(not bool((inner[n] & ~outer[n]).any()) for n in inner)


def rounds_to_density(
    sizes: Mapping[str, int], rates: Mapping[str, float], target: float, limit: int = 200
) -> int:
    """Fewest layer-wise rounds that bring the overall density to `target` or below."""
    remaining = schedule(sizes, rates, limit)
    for r, d in enumerate(remaining):
        if d <= target + 1e-12:
            return r
    raise ValueError(
        f"target density {target} is not reached in {limit} rounds "
        f"(lowest {min(remaining):.3g}); raise the pruning rates"
    )
