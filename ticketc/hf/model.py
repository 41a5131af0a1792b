"""Build the transformers model of a checkpoint: Auto classes, its own weights, no hub access.

The model class comes from config.json's `architectures` through transformers' Auto classes
(the Auto class whose mapping lists that architecture for the config's type); without
`architectures`, the base AutoModel. With trust_remote_code the class comes from the directory's
`auto_map` instead, through transformers' own dynamic-module loader. The weights are always the
ones ticketc read (HFCheckpoint / a packed directory), handed to `from_pretrained(None,
config=..., state_dict=...)`, so transformers ties shared weights and checks every key.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketc.errors import UserError

__all__ = ["build_model", "is_transformers_model", "meta_model", "model_class"]


def is_transformers_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers model (a class of the transformers package, with its
    config), however it was loaded: from a directory, a pickle or --arch."""
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(
            "building a Hugging Face model needs transformers: pip install transformers"
        ) from None
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or info chatter from transformers inside the block (restored after)."""
    logging = _transformers().utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_config(directory: Path, config: dict[str, Any], *, trust_remote_code: bool) -> Any:
    """A transformers config object from the dict ticketc read (compression entries stripped)."""
    transformers = _transformers()
    model_type = config.get("model_type")
    try:
        if trust_remote_code and config.get("auto_map"):
            with quiet_transformers():
                loaded = transformers.AutoConfig.from_pretrained(
                    str(directory), trust_remote_code=True, local_files_only=True
                )
            for key in ("quantization_config", "compression_config", "sparsity_config"):
                if key not in config and hasattr(loaded, key):
                    delattr(loaded, key)
            return loaded
        if model_type not in transformers.CONFIG_MAPPING:
            raise UserError(f"{directory}: config.json model_type {model_type!r} is unknown")
        fields = {
            k: v for k, v in config.items() if k not in ("model_type", "transformers_version")
        }
        with quiet_transformers():
            return transformers.CONFIG_MAPPING[model_type].from_dict(fields)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - config classes validate in many ways
        raise UserError(f"{directory}/config.json: transformers rejects it ({e})") from e


def model_class(
    directory: Path, config: Any, raw: dict[str, Any], *, trust_remote_code: bool
) -> Any:
    """The class config.json's `architectures` names, found through the Auto classes."""
    transformers = _transformers()
    architectures = raw.get("architectures") or []
    arch = str(architectures[0]) if architectures else None
    auto_map = raw.get("auto_map") or {}
    if trust_remote_code and auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        keys = [k for k in auto_map if k.startswith("AutoModel")]
        chosen = [k for k in keys if arch and str(auto_map[k]).endswith(f".{arch}")] or keys
        if not chosen:
            raise UserError(f"{directory}: config.json auto_map names no AutoModel class")
        reference = auto_map[chosen[0]]
        reference = reference[0] if isinstance(reference, list | tuple) else reference
        return get_class_from_dynamic_module(str(reference), str(directory))
    autos = [
        getattr(transformers, name)
        for name in dir(transformers)
        if name.startswith("AutoModel") and hasattr(getattr(transformers, name), "_model_mapping")
    ]
    for auto in sorted(autos, key=lambda a: a.__name__ == "AutoModel"):  # the base model last
        try:
            found = auto._model_mapping[type(config)]
        except (KeyError, ValueError):
            continue
        for cls in found if isinstance(found, tuple) else (found,):
            if arch is None or cls.__name__ == arch:
                return cls
    raise UserError(
        f"{directory}: architecture {arch!r} is not one transformers "
        f"{transformers.__version__} builds for model_type {raw.get('model_type')!r}"
    )


def meta_model(cls: Any, config: Any) -> nn.Module:
    """The model on the meta device (no memory for weights): module types and parameter names."""
    with torch.device("meta"), quiet_transformers():
        return cls(config)


def build_model(
    directory: str | os.PathLike[str],
    raw_config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    *,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, list[str]]:
    """(the model in eval mode with exactly these weights, notes for the user).

    Raises UserError when a weight the model needs is missing or has the wrong shape.
    """
    directory = Path(directory)
    config = load_config(directory, raw_config, trust_remote_code=trust_remote_code)
    cls = model_class(directory, config, raw_config, trust_remote_code=trust_remote_code)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                None, config=config, state_dict=state_dict, output_loading_info=True
            )
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds on bad weights
        raise UserError(f"{directory}: transformers cannot build {cls.__name__} ({e})") from e
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {', '.join(sorted(info['missing_keys'])[:5])}")
    if info.get("mismatched_keys"):
        problems.append(
            f"wrong shape {', '.join(str(k) for k in list(info['mismatched_keys'])[:5])}"
        )
    if problems:
        raise UserError(f"{directory}: weights do not match {cls.__name__} ({'; '.join(problems)})")
    notes = []
    if info.get("unexpected_keys"):
        unused = sorted(info["unexpected_keys"])
        notes.append(
            f"{cls.__name__} does not use {len(unused)} stored tensor(s): {', '.join(unused[:5])}"
        )
    model.eval()
    return model, notes
