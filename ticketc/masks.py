"""Where masks come from, and how they are applied.

Sources, in the order a user expects them to win:
1. an explicit mask file (`--mask masks.pt`: parameter name -> bool tensor, as open_lth's mask.pth);
2. `torch.nn.utils.prune` hooks (`X_orig` x `X_mask`) and `torch.ao.pruning` parametrizations;
3. exact zeros in the weights.

Masks are always multiplied into the weights: open_lth applies its mask only in forward, so zeros
in a file cannot be trusted.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from ticketc.errors import UserError

#: The layer types whose weight ticketc compresses; everything else passes through dense.
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)

Masks = dict[str, torch.Tensor]


def prunable_weights(model: nn.Module) -> dict[str, nn.Linear | nn.Conv1d | nn.Conv2d]:
    """Parameter name ("1.weight") -> owning module, for every prunable layer. A shared weight
    (tied embeddings) goes by its first name only, as named_parameters lists it: under a
    second owner it is no parameter name at all."""
    names = {name for name, _ in model.named_parameters()}
    layers = {
        f"{name}.weight" if name else "weight": m
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE)
    }
    return {name: m for name, m in layers.items() if name in names}


def strip_pruning_(model: nn.Module) -> Masks:
    """Remove torch.nn.utils.prune hooks and torch.ao.pruning parametrizations, in place.

    Returns the masks they held (parameter name -> bool). The weights left behind are the
    masked products, so the model computes exactly what it did before.
    """
    masks: Masks = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        # torch.nn.utils.prune: a forward pre-hook recomputes X = X_orig * X_mask.
        for hook in list(module._forward_pre_hooks.values()):
            tensor_name = getattr(hook, "_tensor_name", None)
            if tensor_name is None or not hasattr(module, f"{tensor_name}_mask"):
                continue
            masks[prefix + tensor_name] = getattr(module, f"{tensor_name}_mask").detach().bool()
            prune.remove(module, tensor_name)
        # torch.ao.pruning: FakeSparsity parametrizations hold the mask; the file does not.
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                for p in module.parametrizations[tensor_name]:
                    mask = getattr(p, "mask", None)
                    if isinstance(mask, torch.Tensor):
                        masks[prefix + tensor_name] = mask.detach().bool()
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return masks


def without_pruning(model: nn.Module) -> tuple[nn.Module, Masks]:
    """`model` itself when nothing prunes it at run time; else a copy with the
    torch.nn.utils.prune hooks and torch.ao.pruning parametrizations removed (strip_pruning_)
    and the masks they held. The caller's model is never modified."""
    pruned = any(
        parametrize.is_parametrized(m)
        or any(hasattr(h, "_tensor_name") for h in m._forward_pre_hooks.values())
        for m in model.modules()
    )
    if not pruned:
        return model, {}
    model = copy_pruned(model)
    return model, strip_pruning_(model)


def copy_pruned(model: nn.Module) -> nn.Module:
    """copy.deepcopy, also of a model pruned with torch.nn.utils.prune: its hooks leave each
    pruned weight as a computed tensor (weight_orig * weight_mask, not a graph leaf), which
    deepcopy refuses; the copy gets it detached (the hook recomputes it on the next forward)."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    copied = copy.deepcopy(model, memo)
    for module in copied.modules():
        if parametrize.is_parametrized(module):
            # The parametrized class (ParametrizedLinear, made by torch) is shared with the
            # original, and removing a parametrization deletes its property from that class:
            # give the copy a class of its own so the caller's model keeps working.
            cls = type(module)
            own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, own)
    return copied


def load_mask_file(path: str | os.PathLike[str]) -> Masks:
    """Read `name -> mask` from a torch file (weights_only); masks may be bool or 0/1 numbers."""
    from ticketc.load import torch_load_safe

    obj = torch_load_safe(path, trust_pickle=False)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"mask file {path} must hold a dict of parameter name -> tensor")
    masks: Masks = {}
    for name, value in obj.items():
        if value.dtype != torch.bool:
            if not bool(((value == 0) | (value == 1)).all()):
                raise UserError(f"mask {name!r} in {path} holds values other than 0 and 1")
            value = value != 0
        masks[str(name)] = value
    return masks


def masks_from_zeros(model: nn.Module) -> Masks:
    return {name: m.weight.detach() != 0 for name, m in prunable_weights(model).items()}


def resolve_masks(model: nn.Module, found: Masks, explicit: Masks | None = None) -> Masks:
    """One bool mask per prunable weight: explicit file, else pruning state, else exact zeros."""
    params = dict(model.named_parameters())
    for source, masks in (("mask file", explicit or {}), ("model", found)):
        for name, mask in masks.items():
            if name not in params:
                known = ", ".join(prunable_weights(model)) or "none"
                raise UserError(
                    f"{source} has a mask for {name!r}, which is not a parameter of the model "
                    f"(prunable weights: {known})"
                )
            if mask.shape != params[name].shape:
                raise UserError(
                    f"{source} mask {name!r} has shape {tuple(mask.shape)}, "
                    f"but the weight has shape {tuple(params[name].shape)}"
                )
    resolved = masks_from_zeros(model)
    resolved.update(found)
    resolved.update(explicit or {})
    return resolved


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Masks) -> None:
    """Multiply each masked parameter by its mask, in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))


def density(masks: Masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.count_nonzero()) for m in masks.values()) / total if total else 1.0
