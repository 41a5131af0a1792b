"""Hugging Face checkpoints as ticketc inputs: directories, safetensors files, legacy sparse.

    model, specs = ticketc.hf.load_hf("bert-dir")          # transformers model + its inputs
    inputs = ticketc.hf.example_inputs(specs)              # {"input_ids": ..., ...}
    model(**inputs)

- A directory with config.json and safetensors (sharded or not) or pytorch_model.bin weights
  (read with weights_only) is built with transformers' Auto classes (ticketc.hf.model).
- A single `.safetensors` file is a state dict (`read_safetensors`): give `--arch` as for any.
- Directories written by compressed-tensors' sparse-bitmask / sparse-24-bitmask compressors are
  decompressed on the way in (ticketc.hf.compressed_tensors).
- Code from a directory runs only with trust_remote_code=True (--trust-remote-code).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ticketc.errors import UserError
from ticketc.hf.checkpoint import HFCheckpoint, is_hf_directory, open_checkpoint
from ticketc.hf.inputs import (
    BATCH,
    SEQUENCE,
    HfInput,
    default_input_specs,
    example_inputs,
    sample_inputs,
)

if TYPE_CHECKING:
    from ticketc.loaded import LoadedModel

__all__ = [
    "BATCH",
    "SEQUENCE",
    "HFCheckpoint",
    "HFModel",
    "HfInput",
    "default_input_specs",
    "example_inputs",
    "is_hf_directory",
    "load_directory",
    "load_hf",
    "open_checkpoint",
    "read_safetensors",
    "sample_inputs",
]


@dataclass
class HFModel:
    model: nn.Module  # eval mode
    input_specs: list[HfInput]  # default inputs (ticketc.hf.inputs); [] when none is known
    checkpoint: HFCheckpoint
    notes: list[str] = field(default_factory=list)


def load_hf(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> HFModel:
    """Build the transformers model of a Hugging Face directory with its own weights.

    Raises UserError for a directory that is not a readable checkpoint, whose model would run
    code from the directory without trust_remote_code, or whose weights do not fit its config.
    """
    from ticketc.hf.model import build_model

    checkpoint = open_checkpoint(path, trust_remote_code=trust_remote_code)
    model, notes = build_model(
        checkpoint.path,
        checkpoint.dense_config,
        checkpoint.state_dict(),
        trust_remote_code=trust_remote_code,
    )
    if checkpoint.legacy is not None and checkpoint.legacy.format != "dense":
        notes.insert(0, f"decompressed compressed-tensors {checkpoint.legacy.format} weights")
    try:
        specs = default_input_specs(model)
    except UserError as e:
        specs = []
        notes.append(str(e))
    return HFModel(model, specs, checkpoint, notes)


def load_directory(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> LoadedModel:
    """`load_hf` as the pipeline's LoadedModel (source "hf"); masks come from exact zeros, and
    `use_cache` is off so that the model is a function of its inputs (as optimum exports it).

    `example_input` is the main input's example tensor (token ids, pixel values); the full set
    of named inputs is `ticketc.hf.default_input_specs(loaded.model)`.
    """
    from ticketc.loaded import LoadedModel

    hf = load_hf(path, trust_remote_code=trust_remote_code)
    config: Any = getattr(hf.model, "config", None)
    if getattr(config, "use_cache", False):
        # The pipeline traces a function of the inputs alone: no key/value cache in or out.
        config.use_cache = False
        hf.notes.append("use_cache turned off: traced without a key/value cache")
    example = None
    if hf.input_specs:
        example = example_inputs(hf.input_specs[:1])[hf.input_specs[0].name]
    return LoadedModel(hf.model, {}, "hf", example, None, hf.notes)


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (a state dict); UserError when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{p}: not a readable safetensors file ({e})") from e
