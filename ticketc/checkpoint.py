"""ticketc's ticket checkpoint: a plain dict of tensors and strings, loadable with weights_only.

Written by `ticketc find`, read by every other command without any opt-in flag, because
loading it runs no code from the file. Layout (version 1):

    {
      "format": "ticketc.ticket",
      "version": 1,
      "arch": "ticketc.models:lenet300",      # module.path:factory that builds the network
      "arch_kwargs": {"num_classes": 10},      # JSON-able keyword arguments for the factory
      "state_dict": {name: Tensor},            # trained weights, already multiplied by the masks
      "masks": {param name: bool Tensor},      # e.g. "fc1.weight" -> bool[300, 784]
      "rewind_state_dict": {name: Tensor},     # weights the survivors were reset/rewound to
      "rewind_point": "init" | "iteration:K",
      "metrics": "<JSON string>",              # accuracy, densities, ... as written by find
    }
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ticketc.atomic import atomic_path

FORMAT = "ticketc.ticket"
VERSION = 1


@dataclass(frozen=True)
class Ticket:
    arch: str
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    rewind_state_dict: dict[str, torch.Tensor]
    rewind_point: str = "init"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if ":" not in self.arch:
            raise ValueError(f"arch {self.arch!r} is not of the form module.path:factory")
        for name, mask in self.masks.items():
            if mask.dtype != torch.bool:
                raise ValueError(f"mask {name!r} has dtype {mask.dtype}, expected torch.bool")
            weight = self.state_dict.get(name)
            if weight is None:
                raise ValueError(f"mask {name!r} names no tensor in the state dict")
            if weight.shape != mask.shape:
                raise ValueError(
                    f"mask {name!r} has shape {tuple(mask.shape)}, weight has {tuple(weight.shape)}"
                )

    def build(self) -> torch.nn.Module:
        """The architecture with the trained (masked) weights loaded."""
        from ticketc.factory import resolve

        model = resolve(self.arch, "architecture")(**self.arch_kwargs)
        model.load_state_dict(self.state_dict)
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "state_dict": self.state_dict,
            "masks": self.masks,
            "rewind_state_dict": self.rewind_state_dict,
            "rewind_point": self.rewind_point,
            "metrics": json.dumps(self.metrics),
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Ticket:
        if obj.get("format") != FORMAT:
            raise ValueError("not a ticketc ticket checkpoint")
        if obj.get("version") != VERSION:
            raise ValueError(f"ticket checkpoint version {obj.get('version')!r} is not {VERSION}")
        return cls(
            arch=obj["arch"],
            arch_kwargs=dict(obj.get("arch_kwargs", {})),
            state_dict=obj["state_dict"],
            masks=obj["masks"],
            rewind_state_dict=obj["rewind_state_dict"],
            rewind_point=obj.get("rewind_point", "init"),
            metrics=json.loads(obj.get("metrics", "{}")),
        )


def is_ticket(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def save_ticket(ticket: Ticket, path: str | os.PathLike[str]) -> None:
    """Write atomically: a crash never leaves a half-written ticket."""
    with atomic_path(path) as tmp:
        torch.save(ticket.to_dict(), tmp)


def load_ticket(path: str | os.PathLike[str]) -> Ticket:
    return Ticket.from_dict(torch.load(path, map_location="cpu", weights_only=True))
