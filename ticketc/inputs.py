"""A model's inputs: typed specs from the command line, example tensors and verification samples.

`--input input_ids:int64:1,128 --input attention_mask:int64:1,128` becomes two `InputSpec`s;
`example_inputs` turns specs into tensors the model can run on; `infer_example` guesses the
input of a model whose first layer tells it (Linear, Embedding); `ExampleInputs` holds
positional and keyword inputs together, as torch.export takes them. Shared by `export` and
`compile`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ticketc.errors import UserError

__all__ = [
    "DTYPES",
    "ExampleInputs",
    "InputSpec",
    "example_inputs",
    "float_dtype",
    "infer_example",
    "parse_input_spec",
    "parse_shape",
    "random_like",
]

#: Names accepted for input dtypes (torch's own, and the short fp / int forms).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
#: A batch of this size is traced where the example has 1: torch.export fixes dimensions of
#: size 0 and 1, so a dynamic batch needs at least 2 while tracing.
TRACE_MIN_SIZE = 2


def parse_shape(text: str) -> tuple[int, ...]:
    """ "1,3,32,32" (or "1x3x32x32") -> (1, 3, 32, 32); UserError unless all sizes are > 0."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"input shape {text!r} is not a comma-separated list of integers") from None
    if not shape or any(d <= 0 for d in shape) or math.prod(shape) > 2**31:
        raise UserError(f"input shape {text!r} must be positive sizes")
    return shape


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name (None: positional), dtype and example shape."""

    name: str | None
    dtype: torch.dtype
    shape: tuple[int, ...]


def parse_input_spec(text: str) -> InputSpec:
    """Parse `NAME:DTYPE:SHAPE`, `DTYPE:SHAPE`, `NAME:SHAPE` or `SHAPE` (dtype float32).

    E.g. "input_ids:int64:1,128", "int64:1,128", "x:1,3,32,32", "1,784". DTYPE is one of
    DTYPES. Raises UserError naming the part that does not parse.
    """
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise UserError(f"--input {text!r} is not NAME:DTYPE:SHAPE (e.g. input_ids:int64:1,128)")
    shape = parse_shape(parts[-1])
    name: str | None = None
    dtype = torch.float32
    if len(parts) == 3:
        name, dtype_text = parts[0], parts[1]
        dtype = _dtype(dtype_text, text)
    elif len(parts) == 2:
        if parts[0].lower() in DTYPES:
            dtype = DTYPES[parts[0].lower()]
        else:
            name = parts[0]
    if name is not None and not name.isidentifier():
        raise UserError(f"--input {text!r}: input name {name!r} is not an identifier")
    return InputSpec(name, dtype, shape)


def _dtype(text: str, spec: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        known = ", ".join(sorted({k for k in DTYPES if not k.startswith(("fp", "int", "half"))}))
        raise UserError(f"--input {spec!r}: unknown dtype {text!r} (known: {known}, ...)") from None


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword inputs of one call, as `torch.export.export` takes them."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, inputs: Any) -> ExampleInputs:
        """From a tensor, a tuple / list of tensors, a dict of name -> tensor, or an
        ExampleInputs. Raises TypeError for anything else."""
        if isinstance(inputs, ExampleInputs):
            return inputs
        if isinstance(inputs, torch.Tensor):
            return cls((inputs,))
        if isinstance(inputs, tuple | list) and all(isinstance(t, torch.Tensor) for t in inputs):
            return cls(tuple(inputs))
        if isinstance(inputs, Mapping) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in inputs.items()
        ):
            return cls((), dict(inputs))
        raise TypeError(
            "example inputs must be a tensor, a tuple of tensors or a dict of name -> tensor, "
            f"got {type(inputs).__name__}"
        )

    def tensors(self) -> list[torch.Tensor]:
        return [*self.args, *self.kwargs.values()]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExampleInputs:
        return ExampleInputs(
            tuple(fn(t) for t in self.args), {k: fn(v) for k, v in self.kwargs.items()}
        )

    def __call__(self, model: Callable[..., Any]) -> Any:
        """The model applied to these inputs."""
        return model(*self.args, **self.kwargs)

    def describe(self) -> str:
        """e.g. "input_ids int64[2, 8], attention_mask int64[2, 8]"."""
        parts = [f"{_short(t)}" for t in self.args]
        parts += [f"{k} {_short(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def _short(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def float_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype most of the model's parameters and buffers hold (float32 if none)."""
    counts: dict[torch.dtype, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _index_limit(model: nn.Module | None) -> int:
    """The largest exclusive bound every integer input may take: the smallest Embedding."""
    sizes = (
        [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)] if model else []
    )
    return max(1, min(sizes)) if sizes else 2


def random_like(
    example: ExampleInputs,
    model: nn.Module | None = None,
    seed: int = 0,
    sizes: Callable[[str | int, int, int], int] | None = None,
) -> ExampleInputs:
    """Random inputs of the example's dtypes (and shapes, or `sizes(input, axis, size)`).

    Floats are standard normal; integers are indices below the model's smallest Embedding
    (0 or 1 without one); inputs named like a mask (attention_mask, ...) are all ones, as a
    random mask can hide every position; bools are True.
    """
    generator = torch.Generator().manual_seed(seed)
    limit = _index_limit(model)

    def draw(key: str | int, t: torch.Tensor) -> torch.Tensor:
        shape = tuple(sizes(key, axis, s) if sizes else s for axis, s in enumerate(t.shape))
        if t.is_floating_point():
            return torch.randn(shape, generator=generator).to(t.dtype)
        if t.dtype == torch.bool or (isinstance(key, str) and "mask" in key.lower()):
            return torch.ones(shape, dtype=t.dtype)
        return torch.randint(0, limit, shape, generator=generator, dtype=t.dtype)

    return ExampleInputs(
        tuple(draw(i, t) for i, t in enumerate(example.args)),
        {k: draw(k, v) for k, v in example.kwargs.items()},
    )


def example_inputs(specs: Sequence[InputSpec], model: nn.Module | None = None) -> ExampleInputs:
    """Example tensors for typed specs: named specs become keyword inputs, others positional
    (in order). Float inputs take the model's float dtype unless the spec names one."""
    names = [s.name for s in specs if s.name is not None]
    if len(set(names)) != len(names):
        raise UserError(f"--input names repeat: {', '.join(names)}")
    if names and len(names) != len(specs):
        raise UserError("--input: name all inputs or none (NAME:DTYPE:SHAPE)")
    template = ExampleInputs(
        tuple(torch.empty(s.shape, dtype=s.dtype) for s in specs if s.name is None),
        {s.name: torch.empty(s.shape, dtype=s.dtype) for s in specs if s.name is not None},
    )
    if model is not None and names:
        _check_names(model, names)
    return random_like(template, model)


def _check_names(model: nn.Module, names: list[str]) -> None:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [n for n in names if n not in parameters]
    if unknown:
        raise UserError(
            f"--input {unknown[0]!r}: the model's forward takes "
            f"{', '.join(parameters) or 'nothing'}"
        )


def infer_example(model: nn.Module) -> ExampleInputs | None:
    """An example input read off the model's first layer, when that layer tells it.

    Linear(in_features) first: float [1, in_features]; Embedding first: int64 token ids
    [1, 8]. The first layer is the first module that holds parameters, in registration
    order; the guess is checked by running the model once (None if that fails).
    """
    first = next((m for m in model.modules() if list(m.parameters(recurse=False))), None)
    if isinstance(first, nn.Linear):
        example = ExampleInputs((torch.zeros(1, first.in_features, dtype=float_dtype(model)),))
    elif isinstance(first, nn.Embedding):
        example = ExampleInputs((torch.zeros(1, 8, dtype=torch.int64),))
    else:
        return None
    try:
        with torch.no_grad():
            example(model)
    except Exception:  # noqa: BLE001 - any failure means the guess is wrong
        return None
    return example


def from_graph_module(module: nn.Module) -> ExampleInputs | None:
    """Example inputs of a torch.export program's module, from its placeholders' recorded
    values (symbolic sizes take their traced hint, or 2). None when it records none."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    tensors = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        shape = tuple(_hint(s) for s in value.shape)
        tensors.append(torch.zeros(shape, dtype=value.dtype))
    return random_like(ExampleInputs(tuple(tensors))) if tensors else None


def fixed_batch(module: nn.Module) -> int | None:
    """The batch size a torch.export program's module is specialised to (its guards reject any
    other), or None when its first input's batch axis is symbolic or it is no program."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    for node in graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dim() and isinstance(value.shape[0], int):
                return int(value.shape[0])
            return None
    return None


def _hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else TRACE_MIN_SIZE
