"""Example inputs of a model, as the user gives them: one tensor, a tuple of positional
arguments, or a dict of keyword arguments (token ids, attention masks, several inputs).

Everything that runs the model at compile time (shape tracing, tuning, the speed check, the
output check, torch.export) goes through `Inputs`, so no stage assumes one float tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

Example = Union[Tensor, tuple, list, Mapping, "Inputs"]  # noqa: UP007 - "Inputs" is defined below


@dataclass(frozen=True)
class Inputs:
    """Positional and keyword arguments of one call of a model."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, example: Example | Inputs) -> Inputs:
        """A tensor is the one positional argument, a tuple / list the positional arguments,
        a dict (or other mapping) the keyword arguments. Raises TypeError otherwise."""
        if isinstance(example, Inputs):
            return example
        if isinstance(example, Tensor):
            return cls((example,), {})
        if isinstance(example, tuple | list):
            return cls(tuple(example), {})
        if isinstance(example, Mapping):
            return cls((), {str(k): v for k, v in example.items()})
        raise TypeError(
            "example inputs must be a tensor, a tuple of positional arguments or a dict of "
            f"keyword arguments, got {type(example).__name__}"
        )

    def __call__(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[Tensor]:
        return [t for t in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(t, Tensor)]

    @property
    def batch(self) -> int | None:
        """The batch size: dim 0 of the first tensor with a dimension (None if none has)."""
        return next((int(t.shape[0]) for t in self.tensors() if t.dim() >= 1), None)

    def at_batch(self, n: int) -> Inputs:
        """The inputs with batch size n: every tensor whose dim 0 is the batch is repeated
        (or cut) along it; other values are unchanged."""
        batch = self.batch
        if batch is None or batch == n:
            return self

        def resize(t: Any) -> Any:
            if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != batch:
                return t
            reps = -(-n // batch)
            return t.repeat(reps, *([1] * (t.dim() - 1)))[:n].contiguous()

        return self._map(resize)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Inputs:
        """Tensors moved to `device`; floating-point ones cast to `dtype` (token ids, masks and
        other integer or bool tensors keep theirs)."""

        def move(t: Any) -> Any:
            if not isinstance(t, Tensor):
                return t
            cast = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=cast)

        return self._map(move)

    def _map(self, fn: Any) -> Inputs:
        args, kwargs = pytree.tree_map(fn, (self.args, self.kwargs))
        return Inputs(tuple(args), dict(kwargs))


def output_error(reference: Any, got: Any) -> tuple[float, float]:
    """(max absolute, max relative) difference between two model outputs of the same
    structure (tensors, tuples, dicts, transformers ModelOutput). Relative: per tensor, the
    largest |difference| over the largest |reference| value. Raises ValueError when the
    structures or shapes differ or integer outputs are not equal."""
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if len(ref_leaves) != len(got_leaves):
        raise ValueError(f"outputs differ in structure: {ref_spec} vs {got_spec}")
    worst_abs = worst_rel = 0.0
    for r, g in zip(ref_leaves, got_leaves, strict=True):
        if not isinstance(r, Tensor):
            continue
        if not isinstance(g, Tensor) or tuple(r.shape) != tuple(g.shape):
            raise ValueError(f"outputs differ: {tuple(r.shape)} vs {getattr(g, 'shape', g)}")
        if not r.is_floating_point():
            if not torch.equal(r.cpu(), g.cpu()):
                raise ValueError("integer outputs differ")
            continue
        if r.numel() == 0:
            continue
        diff = float((g.detach().double().cpu() - r.detach().double().cpu()).abs().max())
        scale = float(r.detach().double().abs().max())
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else diff)
    return worst_abs, worst_rel


SPEC_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


@dataclass(frozen=True)
class InputSpec:
    """One named model input from the command line: NAME:DTYPE:SHAPE[:LOW-HIGH], e.g.
    `input_ids:int64:1x128:0-30522` or `pixel_values:float32:1x3x224x224`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    low: int | None = None
    high: int | None = None  # exclusive

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """Raises ValueError with a one-line message on a malformed spec."""
        parts = text.split(":")
        if len(parts) not in (3, 4) or not parts[0].isidentifier():
            raise ValueError(
                f"--input {text!r}: expected NAME:DTYPE:SHAPE[:LOW-HIGH], "
                "e.g. input_ids:int64:1x128:0-30522"
            )
        name, dtype_name, shape_text = parts[:3]
        if dtype_name not in SPEC_DTYPES:
            raise ValueError(
                f"--input {text!r}: dtype {dtype_name!r} is not one of {', '.join(SPEC_DTYPES)}"
            )
        try:
            shape = tuple(int(s) for s in shape_text.lower().replace(",", "x").split("x"))
        except ValueError:
            shape = ()
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"--input {text!r}: shape {shape_text!r} is not like 1x128")
        low = high = None
        if len(parts) == 4:
            bounds = parts[3].split("-")
            try:
                low, high = int(bounds[0]), int(bounds[1]) + 1
            except (ValueError, IndexError):
                low = None
            if low is None or high is None or len(bounds) != 2 or high <= low:
                raise ValueError(f"--input {text!r}: range {parts[3]!r} is not like 0-999")
            if SPEC_DTYPES[dtype_name].is_floating_point:
                raise ValueError(f"--input {text!r}: a range applies to integer inputs only")
        return cls(name, SPEC_DTYPES[dtype_name], shape, low, high)

    def make(self, model: nn.Module | None = None, seed: int = 0) -> Tensor:
        """A tensor for this input: floats from N(0, 1); integers uniform in [low, high], by
        default all ones for a name containing "mask", else token ids below the smallest
        nn.Embedding's num_embeddings in `model` (2 without one); bools all True."""
        g = torch.Generator().manual_seed(seed)
        if self.dtype.is_floating_point:
            return torch.randn(self.shape, generator=g).to(self.dtype)
        if self.dtype == torch.bool:
            return torch.ones(self.shape, dtype=torch.bool)
        low, high = self.low, self.high
        if low is None or high is None:
            if "mask" in self.name.lower():
                return torch.ones(self.shape, dtype=self.dtype)
            sizes = [m.num_embeddings for m in (model.modules() if model is not None else [])
                     if isinstance(m, nn.Embedding)]  # fmt: skip
            low, high = 0, min(sizes) if sizes else 2
        return torch.randint(low, high, self.shape, generator=g, dtype=self.dtype)


def inputs_from_specs(specs: list[InputSpec], model: nn.Module | None = None) -> Inputs:
    """Keyword arguments named by the specs (raises ValueError on a repeated name or batch
    sizes that differ)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--input names repeat: {', '.join(names)}")
    if len({s.shape[0] for s in specs}) > 1:
        raise ValueError("--input shapes must share dim 0 (the batch size)")
    return Inputs((), {s.name: s.make(model, seed=i) for i, s in enumerate(specs)})
