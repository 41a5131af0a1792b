"""Stage 1 of the pipeline: a model file -> a dense PyTorch module with its masks applied.

Accepted inputs:
- ticketc's own ticket checkpoint (weights_only, no flag needed when it names a built-in
  architecture; another `arch` is built only from the user's own `--arch`);
- a state dict (weights_only) plus `arch="module.path:factory"`;
- a full pickled module, only with `trust_pickle=True` (unpickling runs code from the file);
- a `torch.export` program (`.pt2`), checked by `ticketc.safe_pt2` before it is loaded.

Reading itself (sizes, pickles, what runs code) lives in `ticketc.safe_load`.
"""

from __future__ import annotations

import contextlib
import os
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketc.checkpoint import Ticket, is_ticket
from ticketc.errors import UserError, first_line
from ticketc.factory import build_model, build_trained, load_weights_
from ticketc.loaded import LoadedModel
from ticketc.masks import (
    Masks,
    apply_masks_,
    load_mask_file,
    resolve_masks,
    strip_pruning_,
)
from ticketc.safe_load import ZIP_ERRORS, check_file, is_pt2_archive, torch_load_safe

__all__ = ["LoadedModel", "check_file", "load_model", "load_sample", "torch_load_safe"]


def load_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    mask_path: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load any supported model file (or Hugging Face directory: ticketc.hf); see the module
    docstring."""
    if Path(path).is_dir():
        from ticketc.hf import load_directory

        loaded = load_directory(path, trust_remote_code=trust_remote_code)
    elif _is_pt2(p := check_file(path)):
        loaded = _load_exported_program(p, trust_pickle=trust_pickle)
    else:
        loaded = _load_torch_file(p, arch=arch, trust_pickle=trust_pickle)
    explicit = load_mask_file(mask_path) if mask_path is not None else None
    loaded.masks = resolve_masks(loaded.model, loaded.masks, explicit)
    apply_masks_(loaded.model, loaded.masks)
    check_finite(loaded.model)
    set_eval_(loaded.model)
    return loaded


def _is_pt2(p: Path) -> bool:
    """A torch.export archive, told by its contents rather than its name."""
    try:
        with zipfile.ZipFile(p) as archive:
            return is_pt2_archive(archive.namelist())
    except ZIP_ERRORS:
        return False


def set_eval_(model: nn.Module) -> None:
    """eval() where the module allows it: a torch.export program keeps the mode it was traced in."""
    with contextlib.suppress(NotImplementedError):
        model.eval()


def _load_torch_file(p: Path, *, arch: str | None, trust_pickle: bool) -> LoadedModel:
    if p.suffix == ".safetensors":  # a state dict, nothing pickled
        from ticketc.hf import read_safetensors

        obj: Any = read_safetensors(p)
    else:
        obj = torch_load_safe(p, trust_pickle=trust_pickle)
    if is_ticket(obj):
        try:
            ticket = Ticket.from_dict(obj)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{p}: broken ticket checkpoint ({e})") from e
        model = build_trained(
            ticket.arch, ticket.arch_kwargs, ticket.state_dict, source=str(p), user_arch=arch
        )
        return LoadedModel(
            model,
            dict(ticket.masks),
            "ticket",
            _example_input(ticket.arch, ticket.arch_kwargs),
            ticket.arch,
        )
    if isinstance(obj, nn.Module):
        found = strip_pruning_(obj)
        return LoadedModel(obj, found, "pickle")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None:
            raise UserError(
                f"{p} is a state dict: pass --arch module.path:factory to build the architecture"
            )
        model = build_model(arch, {}, source=str(p), user_arch=arch)
        state, found, notes = _normalise_state_dict(obj)
        untied = load_weights_(model, state, str(p))
        notes += [
            f"{name}: tied to another weight by the architecture, but the file holds other "
            "values for it (one of them pruned on its own): exported untied, as the file holds them"
            for name in untied
        ]
        return LoadedModel(model, found, "state_dict", _example_input(arch, {}), arch, notes)
    raise UserError(
        f"{p}: holds a {type(obj).__name__}, not a model, state dict or ticket checkpoint"
    )


def _load_exported_program(p: Path, *, trust_pickle: bool) -> LoadedModel:
    from ticketc.program_inputs import INPUT_NAMES
    from ticketc.safe_pt2 import load_exported_program

    program = load_exported_program(p, trust_pickle=trust_pickle)
    example = None
    args = getattr(program, "example_inputs", None)
    with contextlib.suppress(TypeError, IndexError, KeyError):
        if args and args[0] and isinstance(args[0][0], torch.Tensor):
            example = args[0][0]
    try:
        # check_guards=False: torch would exec the file's guard strings to build a guard module
        module = program.module(check_guards=False)
    except Exception as e:  # noqa: BLE001 - a program that deserialised but cannot be unlifted
        raise UserError(f"{p}: not a usable torch.export program ({first_line(e)})") from e
    # the forward's argument names, which the module's placeholders may have lost ("input" ->
    # "input_1"): how a user names the inputs (ticketc.program_inputs.as_program_call)
    with contextlib.suppress(AttributeError, TypeError):
        module.meta[INPUT_NAMES] = tuple(program.graph_signature.user_inputs)
    return LoadedModel(module, {}, "export", example)


def _normalise_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], Masks, list[str]]:
    """Fold prune (`X_orig`, `X_mask`) and ao.pruning (`parametrizations.X.original`) keys;
    the originals of a parametrization with several (weight_norm's `original0`, `original1`)
    stay, for the model built with it. The modules' versions (`_metadata`) stay with the
    result."""
    out: dict[str, torch.Tensor] = OrderedDict()
    if (versions := getattr(state, "_metadata", None)) is not None:
        out._metadata = versions  # type: ignore[attr-defined]
    masks: Masks = {}
    notes: list[str] = []
    for key, value in state.items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            name = key[: -len("_orig")]
            mask = state[name + "_mask"]
            if mask.shape != value.shape:
                raise UserError(
                    f"{name}_mask has shape {list(mask.shape)}, its {name}_orig "
                    f"{list(value.shape)}: not the mask of that weight"
                )
            masks[name] = mask != 0
            # what prune's hook computes, X_orig * X_mask: a mask of other values than 0 / 1
            # (scaled, soft) scales the weight as the user's model does
            out[name] = value * mask.to(value.dtype)
        elif ".parametrizations." in key and key.endswith(".original"):
            module, _, rest = key.partition(".parametrizations.")
            name = f"{module}.{rest[: -len('.original')]}"
            saved = _saved_masks(state, key[: -len("original")], value)
            if saved is None:
                out[name] = value
                notes.append(
                    f"{name}: torch.ao.pruning state dicts do not save the mask; using exact "
                    "zeros (pass --mask to give it)"
                )
            else:
                masks[name] = saved
                out[name] = value * saved
                notes.append(f"{name}: its parametrization's saved mask applied (original * mask)")
        elif ".parametrizations." in key and re.search(r"\.original\d+$", key):
            out[key] = value  # weight_norm's magnitude and direction: the model's own
        elif ".parametrizations." in key:
            continue  # a parametrization's buffers: read with its original (_saved_masks)
        else:
            out[key] = value
    return out, masks, notes


def _saved_masks(
    state: dict[str, torch.Tensor], prefix: str, original: torch.Tensor
) -> torch.Tensor | None:
    """The mask a parametrization saved beside its `original` (keys `prefix` + "0.mask", ...:
    a masking parametrization's buffer, applied as original * mask, as torch.ao.pruning's
    FakeSparsity and torch.nn.utils.prune apply theirs); None when it saved no buffer, as
    torch.ao.pruning's own state dicts do. UserError for any other buffer, or a mask that is
    not 0 / 1 of the weight's shape: what it does to the weight cannot be read from a state
    dict, and leaving it out would export another model."""
    buffers = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    buffers.pop("original")
    if not buffers:
        return None
    how = (
        "remove the parametrization before saving (torch.nn.utils.parametrize."
        "remove_parametrizations), or pass the pickled model with --trust-pickle"
    )
    mask = torch.ones(original.shape, dtype=torch.bool)
    for key, buffer in buffers.items():
        if not re.fullmatch(r"\d+\.mask", key):
            raise UserError(
                f"{prefix}{key}: a parametrization's buffer ticketc cannot apply; {how}"
            )
        if tuple(buffer.shape) != tuple(original.shape) or not bool(
            ((buffer == 0) | (buffer == 1)).all()
        ):
            raise UserError(
                f"{prefix}{key}: a mask of shape {tuple(buffer.shape)} that is not all 0 and 1, "
                f"for a weight of shape {tuple(original.shape)}; {how}"
            )
        mask &= buffer.bool()
    return mask


def _example_input(arch: str, kwargs: dict[str, Any]) -> torch.Tensor | None:
    module_name, _, factory = arch.partition(":")
    if module_name != "ticketc.models":
        return None
    from ticketc.models import example_input

    try:
        return example_input(factory)
    except ValueError:
        return None


def check_finite(model: nn.Module) -> None:
    """UserError naming the first parameter holding NaN or +-Inf, or buffer holding NaN. A
    buffer's infinities are kept: an additive attention mask holds -inf on purpose
    (nn.Transformer.generate_square_subsequent_mask)."""
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"parameter {name!r} holds {bad} NaN or Inf value(s)")
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and bool(torch.isnan(buffer).any()):
            bad = int(torch.isnan(buffer).sum())
            raise UserError(f"buffer {name!r} holds {bad} NaN value(s)")


def load_sample(path: str | os.PathLike[str]) -> torch.Tensor:
    obj = torch_load_safe(path, trust_pickle=False)
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"sample {path} must hold one tensor, not a {type(obj).__name__}")
    return obj
