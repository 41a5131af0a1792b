"""Stage 1 of the pipeline: a model file -> a dense PyTorch module with its masks applied.

Accepted inputs:
- ticketc's own ticket checkpoint (weights_only, no flag needed);
- a state dict (weights_only) plus `arch="module.path:factory"`;
- a full pickled module, only with `trust_pickle=True` (unpickling runs code from the file);
- a `torch.export` program (`.pt2`).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketc.checkpoint import Ticket, is_ticket
from ticketc.errors import UserError
from ticketc.factory import resolve
from ticketc.masks import Masks, apply_masks_, load_mask_file, resolve_masks, strip_pruning_


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, hooks and parametrizations removed, weights multiplied by masks
    masks: Masks  # parameter name -> bool mask, one per prunable (Linear / Conv) weight
    source: str  # "ticket" | "state_dict" | "pickle" | "export"
    example_input: torch.Tensor | None = None  # when the file or the architecture tells the shape
    arch: str | None = None
    notes: list[str] = field(default_factory=list)  # things the user should know, one line each


def check_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a model file")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: file is empty")
    return p


def torch_load_safe(path: str | os.PathLike[str], *, trust_pickle: bool) -> Any:
    """torch.load with weights_only, turning every failure into one clear UserError.

    A file that needs arbitrary unpickling (a whole pickled module) is refused unless the
    user opted in with trust_pickle.
    """
    p = check_file(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise UserError(f"{p}: not a readable torch file ({_first_line(e)})") from e
        if not trust_pickle:
            raise UserError(
                f"{p} holds pickled Python objects (e.g. a whole module saved with "
                "torch.save(model)); loading it runs code from the file, so it is refused. "
                "Pass --trust-pickle if you trust its source, or save a state dict and use --arch"
            ) from e
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        UnicodeDecodeError,
        AttributeError,
        KeyError,
        IndexError,
    ) as e:
        raise UserError(f"{p}: not a torch file, or truncated/corrupted ({_first_line(e)})") from e
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - arbitrary unpickling can raise anything
        raise UserError(f"{p}: could not unpickle ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


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
    elif (p := check_file(path)).suffix == ".pt2":
        loaded = _load_exported_program(p)
    else:
        loaded = _load_torch_file(p, arch=arch, trust_pickle=trust_pickle)
    explicit = load_mask_file(mask_path) if mask_path is not None else None
    loaded.masks = resolve_masks(loaded.model, loaded.masks, explicit)
    apply_masks_(loaded.model, loaded.masks)
    check_finite(loaded.model)
    set_eval_(loaded.model)
    return loaded


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
        model = _build(ticket.arch, ticket.arch_kwargs)
        _load_state_dict(model, ticket.state_dict, p)
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
        model = _build(arch, {})
        state, found, notes = _normalise_state_dict(obj)
        _load_state_dict(model, state, p)
        return LoadedModel(model, found, "state_dict", _example_input(arch, {}), arch, notes)
    raise UserError(
        f"{p}: holds a {type(obj).__name__}, not a model, state dict or ticket checkpoint"
    )


def _load_exported_program(p: Path) -> LoadedModel:
    import ticketc.ops  # noqa: F401 - a program compiled by ticketc calls torch.ops.ticketc.*

    try:
        program = torch.export.load(p)
    except Exception as e:  # noqa: BLE001 - torch.export.load fails in many ways on bad files
        raise UserError(f"{p}: not a readable torch.export program ({_first_line(e)})") from e
    example = None
    args = getattr(program, "example_inputs", None)
    if args and args[0] and isinstance(args[0][0], torch.Tensor):
        example = args[0][0]
    return LoadedModel(program.module(), {}, "export", example)


def _build(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    model = resolve(arch, "architecture")(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"architecture {arch!r} returned a {type(model).__name__}, not a module")
    return model


def _normalise_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], Masks, list[str]]:
    """Fold prune (`X_orig`, `X_mask`) and ao.pruning (`parametrizations.X.original`) keys."""
    out: dict[str, torch.Tensor] = {}
    masks: Masks = {}
    notes: list[str] = []
    for key, value in state.items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            name = key[: -len("_orig")]
            mask = state[name + "_mask"].bool()
            masks[name] = mask
            out[name] = value * mask
        elif ".parametrizations." in key and key.endswith(".original"):
            module, _, rest = key.partition(".parametrizations.")
            name = f"{module}.{rest[: -len('.original')]}"
            out[name] = value
            notes.append(
                f"{name}: torch.ao.pruning state dicts do not save the mask; using exact zeros "
                "(pass --mask to give it)"
            )
        elif ".parametrizations." in key:
            continue  # parametrization buffers other than the original carry no weights
        else:
            out[key] = value
    return out, masks, notes


def _load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], p: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:5])}")
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:5])}")
    if problems:
        raise UserError(f"{p}: weights do not match the architecture ({'; '.join(problems)})")


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
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"parameter {name!r} holds {bad} NaN or Inf value(s)")


def parse_shape(text: str) -> tuple[int, ...]:
    """ "1,3,32,32" -> (1, 3, 32, 32)."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"input shape {text!r} is not a comma-separated list of integers") from None
    if not shape or any(d <= 0 for d in shape) or math.prod(shape) > 2**31:
        raise UserError(f"input shape {text!r} must be positive sizes")
    return shape


def load_sample(path: str | os.PathLike[str]) -> torch.Tensor:
    obj = torch_load_safe(path, trust_pickle=False)
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"sample {path} must hold one tensor, not a {type(obj).__name__}")
    return obj
