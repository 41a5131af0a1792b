"""Resolve `module.path:factory` references (architectures, models, datasets).

Two sources, two rules:
- a reference the user typed on the command line (`--arch`, `--model`, `--data`) is imported and
  called: the user chose to run that code (`resolve`);
- a reference written inside a file (a ticket's `arch`, a run directory's `arch.json`) is only
  ever one of ticketc's own architectures (`ticketc.models`), or the very reference the user also
  gave with `--arch`. Anything else is refused with a line naming `--arch`
  (`resolve_from_file`); the file's keyword arguments must be plain JSON values.
"""

from __future__ import annotations

import importlib
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ticketc.errors import UserError, first_line
from ticketc.masks import without_wrapper_prefix
from ticketc.safe_load import current_folder_on_path, quiet

BUILTIN_MODULE = "ticketc.models"


def resolve(ref: str, what: str = "factory") -> Callable[..., Any]:
    """Import `module.path:name` and return the callable it names (runs the module's code).

    Only for references the user gave on the command line. The current folder is put first on
    the import path, as `python -m` does, so `--arch mymodels:mlp` finds ./mymodels.py whether
    ticketc was started as `ticketc` or as `python -m ticketc`. Raises UserError.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{what} {ref!r} is not of the form module.path:factory")
    current_folder_on_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what} {ref!r}: cannot import module {module_name!r} ({e})") from e
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise UserError(f"{what} {ref!r}: importing {module_name!r} failed ({_line(e)})") from e
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise UserError(f"{what} {ref!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise UserError(f"{what} {ref!r} is not callable")
    return obj  # type: ignore[no-any-return]


def builtin(ref: str) -> Callable[..., nn.Module] | None:
    """The factory of a built-in architecture `ticketc.models:NAME`, else None (imports nothing
    outside ticketc)."""
    module_name, sep, name = ref.partition(":")
    if module_name != BUILTIN_MODULE or not sep:
        return None
    from ticketc.models import REGISTRY

    return REGISTRY.get(name)  # type: ignore[return-value]


def resolve_from_file(
    ref: object, source: str, user_arch: str | None, what: str = "architecture"
) -> Callable[..., Any]:
    """The factory a file names: built in, or the one the user gave with --arch.

    `source` names the file in messages. When the user passed `--arch`, that reference is
    used (the user's choice of code to run). Otherwise only ticketc's own architectures are
    accepted; any other reference is refused with a line naming --arch.
    """
    if user_arch is not None:
        return resolve(user_arch, what)
    if not isinstance(ref, str):
        raise UserError(f"{source}: its {what} is a {type(ref).__name__}, not module.path:factory")
    factory = builtin(ref)
    if factory is None:
        raise UserError(
            f"{source} names the {what} {ref[:200]!r}, which is not built into ticketc; "
            f"importing it would run code named in the file, so it is refused. Pass --arch "
            f"{ref[:200]} if you trust it (that runs its code)"
        )
    return factory


def check_json_kwargs(kwargs: object, source: str) -> dict[str, Any]:
    """`kwargs` when it is a dict of str -> plain JSON values (None, bool, int, float, str, and
    lists / dicts of those); UserError otherwise."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise UserError(f"{source}: architecture arguments must be a dict with string keys")
    for key, value in kwargs.items():
        if not _plain_json(value, depth=0):
            raise UserError(
                f"{source}: architecture argument {key!r} is a {type(value).__name__}, "
                "not a plain JSON value"
            )
    return dict(kwargs)


def _plain_json(value: object, depth: int) -> bool:
    if depth > 20:
        return False
    if value is None or type(value) in (bool, int, str):
        return True
    if type(value) is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if type(value) is list:
        return all(_plain_json(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    if type(value) is dict:
        return all(
            isinstance(k, str) and _plain_json(v, depth + 1)
            for k, v in value.items()  # type: ignore[attr-defined]
        )
    return False


def build_model(
    ref: object,
    kwargs: object,
    *,
    source: str,
    user_arch: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Build the architecture a file names (see `resolve_from_file`), with its arguments.

    A built-in architecture is first built on the meta device (no memory) and its parameter
    shapes compared with `state_dict`, so arguments from a file can never make ticketc
    allocate more than the weights the file really holds. Errors the factory raises become a
    UserError naming `source`.
    """
    factory = resolve_from_file(ref, source, user_arch)
    checked = check_json_kwargs(kwargs, source)
    name = user_arch or str(ref)
    if user_arch is None and state_dict is not None:
        with quiet():
            try:
                with torch.device("meta"):
                    skeleton = factory(**checked)
            except Exception as e:  # noqa: BLE001 - bad arguments fail inside the factory
                raise UserError(
                    f"{source}: architecture {name}(**{checked}) fails ({_line(e)})"
                ) from e
        check_shapes(skeleton, state_dict, source)
    try:
        with quiet():
            model = factory(**checked)
    except Exception as e:  # noqa: BLE001 - the factory's own errors, one line
        raise UserError(f"{source}: building architecture {name} failed ({_line(e)})") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"architecture {name!r} returned a {type(model).__name__}, not a module")
    return model


def check_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """UserError unless every entry of `model.state_dict()` has its tensor in `state_dict`, with
    the same shape."""
    expected = model.state_dict()
    missing = [n for n in expected if n not in state_dict]
    wrong = [
        f"{n} {tuple(state_dict[n].shape)} vs {tuple(t.shape)}"
        for n, t in expected.items()
        if n in state_dict
        and isinstance(state_dict[n], torch.Tensor)
        and state_dict[n].shape != t.shape
    ]
    if missing or wrong:
        detail = "; ".join(
            ([f"missing {', '.join(missing[:5])}"] if missing else [])
            + ([f"shapes differ: {', '.join(wrong[:3])}"] if wrong else [])
        )
        raise UserError(f"{source}: weights do not match the architecture ({detail})")


def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e, 200)}" if str(e).strip() else type(e).__name__


def build_trained(
    ref: object,
    kwargs: object,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str,
    user_arch: str | None = None,
) -> nn.Module:
    """`build_model` checked against `state_dict`, with `state_dict` loaded (`load_weights_`):
    the trained network a ticket, a run's level or a state dict plus --arch describes."""
    model = build_model(ref, kwargs, source=source, user_arch=user_arch, state_dict=state_dict)
    load_weights_(model, state_dict, source)
    return model


def load_weights_(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load `state` into `model` in place: names with a wrapper prefix (`module.`, `_orig_mod.`)
    matched to the model's, tied weights that differ in `state` untied first (their names
    returned, `untie_differing_`). UserError naming `source` when the names or shapes do not
    match the architecture."""
    own = set(model.state_dict(keep_vars=True))
    renamed = without_wrapper_prefix(list(state), own)
    versions = getattr(state, "_metadata", None)
    state = OrderedDict((renamed[k], v) for k, v in state.items())
    if versions is not None:
        state._metadata = _renamed_versions(versions, renamed)  # type: ignore[attr-defined]
    untied = untie_differing_(model, state)
    try:
        result = model.load_state_dict(state, strict=False)
    except Exception as e:  # noqa: BLE001 - shapes that do not fit, a module's own refusal
        detail = _load_error(e)
        raise UserError(f"{source}: weights do not match the architecture ({detail})") from e
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:5])}")
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:5])}")
    if problems:
        raise UserError(f"{source}: weights do not match the architecture ({'; '.join(problems)})")
    return untied


def _load_error(e: Exception) -> str:
    """The first specific line of load_state_dict's error ("size mismatch for fc.weight: ..."),
    not its heading ("Error(s) in loading state_dict for Net:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1][:300]
    return first_line(e)


def _renamed_versions(versions: dict[str, Any], renamed: dict[str, str]) -> OrderedDict[str, Any]:
    """A state dict's `_metadata` (module prefix -> {"version": N}, which load_state_dict hands
    to each module's `_load_from_state_dict`; torchvision's MNASNet refuses to load without
    it) under the module names `renamed` (a wrapper prefix dropped) gives."""
    prefix = next((k[: len(k) - len(v)] for k, v in renamed.items() if k != v), "")
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in versions.items():
        if prefix and (key + ".").startswith(prefix):
            key = key[len(prefix) :] if key.startswith(prefix) else ""
        out[key] = value
    return out


def untie_differing_(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Give each name of a shared parameter its own tensor where `state` holds different values
    for them, in place; returns the names untied.

    The architecture may tie two weights (GPT-2's lm_head and wte) that the file no longer
    holds equal: pruning one of them with torch.nn.utils.prune and then `prune.remove` leaves
    two tensors. Loading both into one shared tensor would silently keep only the last.
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    untied = []
    for names in groups.values():
        present = [n for n in names if n in state]
        if len(present) < 2:
            continue
        first = state[present[0]]
        for name in present[1:]:
            if state[name].shape == first.shape and torch.equal(state[name], first):
                continue
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            shared = getattr(module, attr)
            setattr(module, attr, nn.Parameter(shared.detach().clone(), shared.requires_grad))
            untied.append(name)
    return untied
