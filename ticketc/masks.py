"""Where masks come from, and how they are applied.

Sources, in the order a user expects them to win:
1. an explicit mask file (`--mask masks.pt`): parameter name -> bool tensor, as open_lth's
   mask.pth, or keyed by layer ({"fc1": {"weight": mask}}, as NNI writes them);
2. `torch.nn.utils.prune` hooks (`X_orig` x `X_mask`) and `torch.ao.pruning` parametrizations;
3. exact zeros in the weights.

Masks are always multiplied into the weights: open_lth applies its mask only in forward, so zeros
in a file cannot be trusted. A mask may name any parameter, under any of its names when it is
shared (tied embeddings), with or without a `module.` prefix (DataParallel, DDP).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from ticketc.errors import UserError
from ticketc.safe_load import torch_load_safe

Masks = dict[str, torch.Tensor]

#: Prefixes that wrappers add to every name of a state dict: DataParallel / DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameter name -> parameter, for every weight a pruner would prune: parameters of rank
    >= 2 (Linear, Conv*, ConvTranspose*, Embedding, LSTM / GRU, attention in_proj, plain
    matrices). Shared parameters are listed once, under their first name."""
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2}


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter -> its first name (tied weights share one tensor)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = first.setdefault(id(p), name)
    return aliases


def strip_pruning_(model: nn.Module) -> Masks:
    """Remove torch.nn.utils.prune hooks and torch.ao.pruning parametrizations, in place.

    Returns the masks they held (parameter name -> bool). The weights left behind are the
    masked products, so the model computes exactly what it did before.
    """
    masks: Masks = {}
    # torch.nn.utils.prune: a forward pre-hook recomputes X = X_orig * X_mask. prune.remove
    # writes the product into X_orig in place, which a tied X_orig shares with the other
    # modules pruned through it (their masks would multiply): take every product first.
    products: dict[int, list[tuple[nn.Module, str, torch.Tensor]]] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for key, hook in list(module._forward_pre_hooks.items()):
            tensor_name = getattr(hook, "_tensor_name", None)
            if tensor_name is None or not hasattr(module, f"{tensor_name}_mask"):
                continue
            mask = getattr(module, f"{tensor_name}_mask").detach()
            orig = getattr(module, f"{tensor_name}_orig")
            masks[prefix + tensor_name] = mask.bool()
            products.setdefault(id(orig), []).append(
                (module, tensor_name, (orig.detach() * mask.to(orig.dtype)).clone())
            )
            del module._forward_pre_hooks[key]
    for users in products.values():
        # one parameter again where every module computed the same product (still tied)
        shared = None
        if all(torch.equal(users[0][2], product) for _, _, product in users[1:]):
            shared = nn.Parameter(users[0][2])
        for module, tensor_name, product in users:
            if tensor_name in module.__dict__:
                delattr(module, tensor_name)  # the last computed X, a plain attribute
            del module._parameters[f"{tensor_name}_orig"]
            del module._buffers[f"{tensor_name}_mask"]
            module.register_parameter(
                tensor_name, shared if shared is not None else nn.Parameter(product)
            )
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        # torch.ao.pruning: FakeSparsity parametrizations hold the mask; the file does not.
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                for p in module.parametrizations[tensor_name]:
                    mask = getattr(p, "mask", None)
                    if isinstance(mask, torch.Tensor):
                        masks[prefix + tensor_name] = mask.detach().bool()
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return masks


def has_pruning_state(model: nn.Module) -> bool:
    """Whether prune hooks or parametrizations are still on the model."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            return True
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                return True
    return False


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


def flatten_masks(obj: object, source: str) -> Masks:
    """Name -> bool mask from a mask file's contents: flat ({"fc1.weight": m}) or keyed by layer
    ({"fc1": {"weight": m, "bias": None}}, as NNI writes). 0/1 numbers become bool; None
    entries (a layer's unmasked tensor) are skipped. UserError for anything else."""
    masks: Masks = {}

    def walk(prefix: str, value: object) -> None:
        if value is None:
            return
        if isinstance(value, torch.Tensor):
            if value.dtype != torch.bool:
                if not bool(((value == 0) | (value == 1)).all()):
                    raise UserError(f"mask {prefix!r} in {source} holds values other than 0 and 1")
                value = value != 0
            masks[prefix] = value
            return
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
            return
        raise UserError(
            f"mask file {source} must map parameter (or layer) names to tensors; "
            f"{prefix or 'it'} holds a {type(value).__name__}"
        )

    if not isinstance(obj, Mapping):
        raise UserError(f"mask file {source} must hold a dict of parameter name -> tensor")
    walk("", obj)
    return masks


def load_mask_file(path: str | os.PathLike[str]) -> Masks:
    """Read `name -> mask` from a torch file (weights_only); see `flatten_masks` for layouts."""
    return flatten_masks(torch_load_safe(path, trust_pickle=False), str(path))


def without_wrapper_prefix(names: list[str], known: set[str]) -> dict[str, str]:
    """name -> the model's name for it, dropping a wrapper's prefix (`module.`, `_orig_mod.`)
    that every name carries and the model does not."""
    for prefix in WRAPPER_PREFIXES:
        if (
            names
            and all(n.startswith(prefix) for n in names)
            and not any(k.startswith(prefix) for k in known)
        ):
            return {n: n[len(prefix) :] for n in names}
    return {n: n for n in names}


def masks_from_zeros(model: nn.Module) -> Masks:
    return {name: p.detach() != 0 for name, p in prunable_weights(model).items()}


def resolve_masks(model: nn.Module, found: Masks, explicit: Masks | None = None) -> Masks:
    """One bool mask per masked parameter: explicit file, else pruning state, else exact zeros.

    Masks are keyed by each parameter's first name (`parameter_aliases`); two masks for one
    shared tensor combine (a weight is kept only where both keep it). UserError when a mask
    names no parameter or has the wrong shape.
    """
    aliases = parameter_aliases(model)
    params = dict(model.named_parameters())
    resolved = masks_from_zeros(model)
    for source, masks in (("model", found), ("mask file", explicit or {})):
        renamed = without_wrapper_prefix(list(masks), set(aliases))
        combined: Masks = {}
        for name, mask in masks.items():
            key = aliases.get(renamed[name])
            if key is None:
                known = ", ".join(prunable_weights(model)) or "none"
                raise UserError(
                    f"{source} has a mask for {name!r}, which is not a parameter of the model "
                    f"(prunable weights: {known})"
                )
            if mask.shape != params[key].shape:
                raise UserError(
                    f"{source} mask {name!r} has shape {tuple(mask.shape)}, "
                    f"but the weight has shape {tuple(params[key].shape)}"
                )
            mask = mask.bool()
            combined[key] = combined[key] & mask if key in combined else mask
        resolved.update(combined)
    return resolved


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Masks) -> None:
    """Multiply each masked parameter (by any of its names) by its mask, in place.

    Raises ValueError naming the mask when it names no parameter or its shape differs."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, mask in masks.items():
        param = params.get(name)
        if param is None:
            raise ValueError(f"mask {name!r} names no parameter of the model")
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(
                f"mask {name!r} has shape {tuple(mask.shape)}, weight {tuple(param.shape)}"
            )
        param.mul_(mask.to(device=param.device, dtype=param.dtype))


def masked_model(model: nn.Module, masks: Masks | None = None) -> tuple[nn.Module, Masks]:
    """The model as it computes with its pruning: hooks and parametrizations folded into the
    weights, `masks` multiplied in. Works on a copy when that changes anything, so the caller's
    module is never modified. Returns (model, resolved masks)."""
    needs_copy = has_pruning_state(model) or _changes(model, masks)
    if needs_copy:
        model = copy_pruned(model)
    found = strip_pruning_(model)
    resolved = resolve_masks(model, found, masks)
    if needs_copy:
        apply_masks_(model, resolved)
    return model, resolved


def _changes(model: nn.Module, masks: Masks | None) -> bool:
    """Whether multiplying `masks` in would change a weight (a nonzero where a mask is False)."""
    if not masks:
        return False
    aliases = parameter_aliases(model)
    renamed = without_wrapper_prefix(list(masks), set(aliases))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, mask in masks.items():
        key = renamed[name]
        if key not in params or mask.shape != params[key].shape:
            return True  # resolve_masks names the problem
        if bool(((params[key].detach() != 0) & ~mask.bool()).any()):
            return True
    return False
