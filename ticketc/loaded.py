"""What reading a model file gives every stage: the module, its masks, where it came from.

Its own module so that the readers (`ticketc.load`, `ticketc.hf`) share it without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ticketc.masks import Masks


@dataclass
class LoadedModel:
    """A model file as `ticketc.load_model` returns it (`ticketc.hf` for Hugging Face folders)."""

    model: nn.Module  # eval mode, hooks and parametrizations removed, weights multiplied by masks
    masks: Masks  # parameter name -> bool mask, one per weight (parameters of rank >= 2)
    source: str  # "ticket" | "state_dict" | "pickle" | "export" | "hf"
    example_input: torch.Tensor | None = None  # when the file or the architecture tells the shape
    arch: str | None = None
    notes: list[str] = field(default_factory=list)  # things the user should know, one line each
