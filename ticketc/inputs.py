"""A model's inputs: typed specs from the command line, example inputs and verification samples.

`--input input_ids:int64:1x128:0-999 --input attention_mask:int64:1,128` becomes two
`InputSpec`s (`InputSpec.parse`, the one parser of --input for every command);
`inputs_from_specs` turns specs into inputs the model can run on; `infer_example` guesses the
input of a model whose first layer tells it (Linear, Embedding); `ExampleInputs` holds
positional and keyword inputs together, as torch.export takes them. Shared by every stage that
runs a model on an example: compile, export, verify, bench.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.utils._pytree as pytree
from torch import nn

from ticketc.errors import UserError

__all__ = [
    "DTYPES",
    "INPUT_FORM",
    "Example",
    "ExampleInputs",
    "InputSpec",
    "float_dtype",
    "check_fits_memory",
    "check_input_names",
    "end_rows_with_",
    "infer_example",
    "inputs_from_specs",
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


#: The --input syntax, as every error about it quotes it.
INPUT_FORM = (
    "NAME:DTYPE:SHAPE[:LOW-HIGH], e.g. input_ids:int64:1x128:0-999 (NAME and DTYPE may be "
    "left out: positional, float32)"
)


def parse_shape(text: str, what: str = "input shape") -> tuple[int, ...]:
    """ "1,3,32,32" or "1x3x32x32" -> (1, 3, 32, 32). UserError naming `what` unless every
    size is a positive integer (and the whole below 2**31 elements)."""
    try:
        shape = tuple(int(s) for s in text.lower().replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UserError(f"{what} {text!r} is not like 1x128 or 1,128 (positive sizes)")
    if math.prod(shape) > 2**31:
        raise UserError(f"{what} {text!r} has {math.prod(shape):,} elements, over 2^31")
    return shape


def check_fits_memory(shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
    """UserError naming `what` when one input of `shape` and `dtype` would take more than a
    quarter of this machine's physical memory: the model's activations and the checks'
    other batches take several times the input, so such a run could only end killed."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return  # not a POSIX system: no bound known
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if memory > 0 and size > memory / 4:
        raise UserError(
            f"{what}: one input of {size / 2**30:.1f} GiB is more than a quarter of this "
            f"machine's memory ({memory / 2**30:.1f} GiB)"
        )


@dataclass(frozen=True)
class InputSpec:
    """One model input from the command line (`INPUT_FORM`): its name (None: positional),
    dtype, example shape and, for integer inputs, the value range [low, high) (None: token ids
    below the model's smallest Embedding, all ones for a name containing "mask"). A spec that
    leaves the dtype out (`dtype_given` False) takes the model's float type where `make` has
    the model (a bf16 model gets bf16), float32 without one."""

    name: str | None
    dtype: torch.dtype
    shape: tuple[int, ...]
    low: int | None = None
    high: int | None = None  # exclusive
    dtype_given: bool = True

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """Parse `NAME:DTYPE:SHAPE[:LOW-HIGH]`; NAME and DTYPE may be left out (`DTYPE:SHAPE`,
        `NAME:SHAPE`, `SHAPE`: float32). SHAPE is "1,128" or "1x128", DTYPE one of DTYPES
        (any case), LOW-HIGH inclusive bounds of an integer input. E.g. "input_ids:int64:1,128",
        "input_ids:int64:1x128:0-30521", "x:1,3,32,32", "1,784". Raises UserError (a
        ValueError) naming the part that does not parse."""
        parts = text.split(":")
        if not 1 <= len(parts) <= 4 or not all(parts):
            raise UserError(f"--input {text!r}: expected {INPUT_FORM}")
        bounds = parts.pop() if len(parts) == 4 else None
        if parts[-1].lower() in DTYPES:
            raise UserError(f"--input {text!r}: no shape; expected {INPUT_FORM}")
        shape = parse_shape(parts[-1], f"--input {text!r}: shape")
        name: str | None = None
        dtype, given = torch.float32, True
        if len(parts) == 3:
            name, dtype = parts[0], _dtype(parts[1], text)
        elif len(parts) == 2 and parts[0].lower() in DTYPES:
            dtype = DTYPES[parts[0].lower()]
        else:
            name, given = (parts[0] if len(parts) == 2 else None), False
        if name is not None and not name.isidentifier():
            raise UserError(
                f"--input {text!r}: input name {name!r} is not an identifier; expected {INPUT_FORM}"
            )
        low, high = _range(bounds, dtype, text) if bounds is not None else (None, None)
        check_fits_memory(shape, dtype, f"--input {text!r}")
        return cls(name, dtype, shape, low, high, given)

    def make(self, model: nn.Module | None = None, seed: int = 0) -> torch.Tensor:
        """A tensor for this input: floats from N(0, 1) (in the model's float type where the
        spec gave no dtype); integers uniform in [low, high), by default all ones for a name
        containing "mask", else token ids below the smallest nn.Embedding's num_embeddings in
        `model` (below 2 without one); bools all True."""
        generator = torch.Generator().manual_seed(seed)
        ones = self.low is None and _is_mask(self.name)
        low, high = self.low or 0, self.high or _index_limit(model)
        dtype = self.dtype if self.dtype_given or model is None else float_dtype(model)
        return _draw(self.shape, dtype, generator, low, high, ones=ones)


def _dtype(text: str, spec: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        known = ", ".join(sorted({k for k in DTYPES if not k.startswith(("fp", "int", "half"))}))
        raise UserError(f"--input {spec!r}: unknown dtype {text!r} (known: {known}, ...)") from None


def _range(text: str, dtype: torch.dtype, spec: str) -> tuple[int, int]:
    """ "0-999" -> (0, 1000): inclusive bounds, returned as [low, high)."""
    low, _, high = text.partition("-")
    try:
        bounds = int(low), int(high) + 1
    except ValueError:
        bounds = (0, 0)
    if not bounds[0] < bounds[1]:
        raise UserError(f"--input {spec!r}: range {text!r} is not like 0-999")
    if dtype.is_floating_point or dtype == torch.bool:
        raise UserError(f"--input {spec!r}: a range applies to integer inputs only")
    info = torch.iinfo(dtype)
    if bounds[0] < info.min or bounds[1] - 1 > info.max:
        raise UserError(
            f"--input {spec!r}: range {text!r} does not fit {str(dtype).split('.')[-1]} "
            f"({info.min} to {info.max})"
        )
    return bounds


def inputs_from_specs(specs: Sequence[InputSpec], model: nn.Module | None = None) -> ExampleInputs:
    """Example inputs for typed specs: named specs become keyword inputs, unnamed ones
    positional (in order); values as `InputSpec.make` draws them (seed: the spec's position).
    `model` only bounds token ids (its smallest Embedding). Raises UserError when names
    repeat, only some inputs are named or dim 0 (the batch) differs between inputs."""
    names = [s.name for s in specs if s.name is not None]
    if len(set(names)) != len(names):
        raise UserError(f"--input names repeat: {', '.join(names)}")
    if names and len(names) != len(specs):
        raise UserError("--input: name all inputs or none (NAME:DTYPE:SHAPE)")
    if len({s.shape[0] for s in specs}) > 1:
        raise UserError("--input shapes must share dim 0 (the batch size)")
    values = [s.make(model, seed=i) for i, s in enumerate(specs)]
    ranges = {
        s.name if s.name is not None else i: (s.low, s.high)
        for i, s in enumerate(specs)
        if s.low is not None and s.high is not None
    }
    return ExampleInputs(
        tuple(v for s, v in zip(specs, values, strict=True) if s.name is None),
        {s.name: v for s, v in zip(specs, values, strict=True) if s.name is not None},
        ranges,
    )


def check_input_names(model: nn.Module, specs: Sequence[InputSpec]) -> None:
    """UserError when the model's forward takes no argument of a spec's name (a forward that
    takes **kwargs, or whose signature cannot be read, takes any)."""
    names = [s.name for s in specs if s.name is not None]
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [n for n in names if n not in parameters]
    if unknown:
        raise UserError(
            f"the model does not run on the given inputs: --input {unknown[0]!r} names no "
            f"argument of its forward ({', '.join(parameters) or 'none'})"
        )


#: What `ExampleInputs.of` takes.
Example = Union[torch.Tensor, tuple, list, Mapping, "ExampleInputs"]  # noqa: UP007 - defined below


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword arguments of one call of a model, as `torch.export.export` takes
    them. Everything that runs a model on example inputs (tracing, tuning, the compile check,
    export, verification, bench) goes through it, so no stage assumes one float tensor. Values
    are tensors (token ids, masks, pixels, ...) or any other argument the model takes, kept
    as they are."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: [low, high) of integer inputs whose values the user bounded (`--input ...:0-999`),
    #: by position or name: random inputs drawn like these (`random_like`) stay within them
    ranges: Mapping[str | int, tuple[int, int]] = field(default_factory=dict, compare=False)
    #: a token every row of an integer input ends with (an end-of-sequence token the model
    #: requires), by position or name: random inputs drawn like these end with it too
    finals: Mapping[str | int, int] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, inputs: Example) -> ExampleInputs:
        """A tensor is the one positional argument, a tuple / list the positional arguments,
        a dict (or other mapping) the keyword arguments; an ExampleInputs is returned as it
        is. Raises TypeError for anything else."""
        if isinstance(inputs, ExampleInputs):
            return inputs
        if isinstance(inputs, torch.Tensor):
            return cls((inputs,))
        if isinstance(inputs, tuple | list):
            return cls(tuple(inputs))
        if isinstance(inputs, Mapping):
            return cls((), {str(k): v for k, v in inputs.items()})
        raise TypeError(
            "example inputs must be a tensor, a tuple of positional arguments or a dict of "
            f"keyword arguments, got {type(inputs).__name__}"
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the inputs, positional first (nested containers flattened)."""
        leaves = pytree.tree_leaves((self.args, self.kwargs))
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExampleInputs:
        """`fn` applied to every tensor; other values are kept."""
        args, kwargs = pytree.tree_map(
            lambda v: fn(v) if isinstance(v, torch.Tensor) else v, (self.args, self.kwargs)
        )
        return dataclasses.replace(self, args=tuple(args), kwargs=dict(kwargs))

    def __call__(self, model: Callable[..., Any]) -> Any:
        """The model applied to these inputs."""
        return model(*self.args, **self.kwargs)

    @property
    def batch(self) -> int | None:
        """The batch size: dim 0 of the first tensor with a dimension (None if none has)."""
        return next((int(t.shape[0]) for t in self.tensors() if t.dim() >= 1), None)

    def at_batch(self, n: int) -> ExampleInputs:
        """The inputs with batch size n: every tensor whose dim 0 is the batch is repeated
        (or cut) along it; other values are unchanged."""
        batch = self.batch
        if batch is None or batch == n:
            return self

        def resize(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 0 or t.shape[0] != batch:
                return t
            reps = -(-n // batch)
            return t.repeat(reps, *([1] * (t.dim() - 1)))[:n].contiguous()

        return self.map(resize)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ExampleInputs:
        """Tensors moved to `device`; floating-point ones cast to `dtype` (token ids, masks and
        other integer or bool tensors keep theirs)."""
        return self.map(
            lambda t: t.to(
                device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None
            )
        )

    def describe(self) -> str:
        """e.g. "input_ids int64[2, 8], attention_mask int64[2, 8]"."""
        parts = [f"{_short(t)}" for t in self.args]
        parts += [f"{k} {_short(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def _short(value: Any) -> str:
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}"


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


def end_rows_with_(ids: torch.Tensor, token: int, high: int) -> torch.Tensor:
    """`ids` [..., length] with `token` last in every row and nowhere else (moved to the next
    id below `high` there), in place: a model that reads each row's end-of-sequence token
    (BART's classification head) refuses rows without one."""
    ids[ids == token] = (token + 1) % max(high, 2)
    ids[..., -1] = token
    return ids


def pad_masks_(mask: torch.Tensor) -> torch.Tensor:
    """An all-ones [batch, length] mask (length >= 3) padded in place as a batch of texts of
    different lengths is: row 0's last two positions on the right, row 1's first two on the
    left (both conventions exist; an export may get one of them wrong)."""
    if mask.dim() == 2 and mask.shape[1] >= 3 and not mask.is_floating_point():
        mask[0, -2:] = 0
        if mask.shape[0] > 1:
            mask[1, :2] = 0
    return mask


def _is_mask(name: str | int | None) -> bool:
    """Inputs named like a mask (attention_mask, ...) are all ones: a random mask can hide
    every position."""
    return isinstance(name, str) and "mask" in name.lower()


def _draw(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    generator: torch.Generator,
    low: int,
    high: int,
    *,
    ones: bool,
) -> torch.Tensor:
    """Floats from N(0, 1); bools, and integers when `ones`, all ones; other integers uniform
    in [low, high)."""
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool or ones:
        return torch.ones(shape, dtype=dtype)
    return torch.randint(low, high, shape, generator=generator, dtype=dtype)


def random_like(
    example: ExampleInputs,
    model: nn.Module | None = None,
    seed: int = 0,
    sizes: Callable[[str | int, int, int], int] | None = None,
    padded: bool = False,
) -> ExampleInputs:
    """Random inputs of the example's dtypes (and shapes, or `sizes(input, axis, size)`).

    Floats are standard normal; integers are uniform in the example's range for that input
    (`ExampleInputs.ranges`, from `--input ...:LOW-HIGH`), else indices below the model's
    smallest Embedding (0 or 1 without one), each row ending with the example's final token
    where it has one (`ExampleInputs.finals`), else, for inputs named like a mask
    (attention_mask, ...), all ones, as a random mask can hide every position, or, `padded`,
    with padding (see `pad_masks_`); bools are True.
    """
    generator = torch.Generator().manual_seed(seed)
    limit = _index_limit(model)

    def draw(key: str | int, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = tuple(sizes(key, axis, s) if sizes else s for axis, s in enumerate(t.shape))
        bounded = key in example.ranges
        low, high = example.ranges[key] if bounded else (0, limit)
        mask = not bounded and _is_mask(key)
        drawn = _draw(shape, t.dtype, generator, low, high, ones=mask)
        if key in example.finals and drawn.dim() >= 1 and not mask:
            return end_rows_with_(drawn, example.finals[key], high)
        return pad_masks_(drawn) if padded and mask else drawn

    return dataclasses.replace(
        example,
        args=tuple(draw(i, t) for i, t in enumerate(example.args)),
        kwargs={k: draw(k, v) for k, v in example.kwargs.items()},
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
