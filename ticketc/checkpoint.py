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
        if not isinstance(self.arch, str) or ":" not in self.arch:
            raise ValueError(f"arch {self.arch!r} is not of the form module.path:factory")
        for what in ("state_dict", "masks", "rewind_state_dict"):
            tensors = getattr(self, what)
            if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
            ):
                raise ValueError(f"{what} is not a dict of name -> tensor")
        if not isinstance(self.rewind_point, str):
            raise ValueError(f"rewind_point {self.rewind_point!r} is not a string")
        if not isinstance(self.metrics, dict):
            raise ValueError("metrics is not a JSON object")
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

    def build(self, arch: str | None = None) -> torch.nn.Module:
        """The architecture with the trained (masked) weights loaded.

        Only a built-in architecture is built from the ticket's own `arch`; any other is built
        from `arch`, the reference the user gives (see `ticketc.factory.resolve_from_file`).
        Raises UserError.
        """
        from ticketc.factory import build_trained

        return build_trained(
            self.arch, self.arch_kwargs, self.state_dict, source="ticket", user_arch=arch
        )

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
        """The ticket in a dict as `to_dict` writes it; ValueError / KeyError / TypeError on
        anything else."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
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
            metrics=_metrics(obj.get("metrics", "{}")),
        )


def _metrics(text: object) -> dict[str, Any]:
    if not isinstance(text, str):
        raise TypeError("metrics is not a JSON string")
    try:
        metrics = json.loads(text)
    except RecursionError:
        raise ValueError("metrics JSON nests too deeply") from None
    if not isinstance(metrics, dict):
        raise TypeError("metrics is not a JSON object")
    return metrics


def is_ticket(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def save_ticket(ticket: Ticket, path: str | os.PathLike[str]) -> None:
    """Write atomically: a crash never leaves a half-written ticket."""
    with atomic_path(path) as tmp:
        torch.save(ticket.to_dict(), tmp)


def load_ticket(path: str | os.PathLike[str]) -> Ticket:
    """Read a ticket checkpoint (weights_only); UserError when it is not a sound one."""
    from ticketc.errors import UserError
    from ticketc.safe_load import torch_load_safe

    obj = torch_load_safe(path, trust_pickle=False)
    try:
        return Ticket.from_dict(obj)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: broken ticket checkpoint ({e})") from e
