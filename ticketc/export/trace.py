"""torch -> ONNX (dynamo): typed inputs with dynamic batch and sequence axes, outputs named
after their keys, and where each initializer came from.

Works on the exporter's in-memory IR (onnx_ir), whose initializers still point at the torch
tensors: nothing is copied until ticketc decides how each weight is stored. Hugging Face
models go through transformers' own ONNX exporter (its patches and cache handling); every
other module through torch.export and torch.onnx.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ticketc.errors import UserError
from ticketc.hf.model import is_transformers_model
from ticketc.inputs import TRACE_MIN_SIZE, ExampleInputs
from ticketc.program_inputs import symbolic_axes

_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


@dataclass
class Traced:
    """An exported graph and what the user should know about it."""

    model: ir.Model
    notes: list[str] = field(default_factory=list)
    # initializer -> the PyTorch parameters and buffers it was made from, as torch.onnx
    # recorded them (its own names, and the values its optimizer folded in)
    sources: dict[str, list[str]] = field(default_factory=dict)


def dynamic_axes(
    example: ExampleInputs, model: nn.Module | None = None, sequence: bool = True
) -> dict[str | int, list[int]]:
    """The axes to export as dynamic: those a torch.export program's `model` keeps symbolic;
    for any other model the batch (axis 0) of every input, and, `sequence`, axis 1 of integer
    inputs of rank >= 2 (token ids, attention masks) and of float inputs of rank 2 or 3 (a
    batch-first sequence [batch, time, features], audio samples [batch, samples]). They are
    Dim.AUTO: torch.export keeps static what the model fixes (a Linear's features, a Conv1d's
    channels), so only a float axis the model leaves free comes out dynamic."""
    program = symbolic_axes(model) if model is not None else None
    if program is not None:
        return dict(program)
    axes: dict[str | int, list[int]] = {}
    keyed: list[tuple[str | int, Any]] = [*enumerate(example.args)]
    keyed += list(example.kwargs.items())
    for key, t in keyed:
        if not isinstance(t, torch.Tensor):  # a constant (use_cache=False): no axes
            axes[key] = []
            continue
        chosen = [0] if t.dim() >= 1 else []
        if sequence and t.dtype != torch.bool and _sequence_axis(example, key, t, model):
            chosen.append(1)
        axes[key] = chosen
    return axes


def _sequence_axis(
    example: ExampleInputs, key: str | int, t: torch.Tensor, model: nn.Module | None
) -> bool:
    """Whether axis 1 of an example input is exported Dim.AUTO: integer inputs of rank >= 2;
    float inputs of rank 2 or 3 ([batch, time, features], audio [batch, samples]) where the
    model runs at another size of it (not a Conv1d's channels or a Linear's features, which
    torch.onnx would still declare symbolic), but of a transformers model only audio (its
    [batch, mel bins, frames] and images are fixed)."""
    if not t.is_floating_point():
        return t.dim() >= 2
    if model is None or not 2 <= t.dim() <= 3:
        return False
    if is_transformers_model(model) and t.dim() != 2:
        return False
    size = t.shape[1]
    other = t.narrow(1, 0, size - 1) if size > 2 else torch.cat([t, t.narrow(1, 0, 1)], dim=1)
    if isinstance(key, int):
        args = tuple(other if i == key else a for i, a in enumerate(example.args))
        changed = dataclasses.replace(example, args=args)
    else:
        changed = dataclasses.replace(example, kwargs={**example.kwargs, key: other})
    try:
        with torch.no_grad(), quiet():
            changed(model)
    except Exception:  # noqa: BLE001 - any failure of the model says the size is fixed
        return False
    return True


def batch_only(axes: dict[str | int, list[int]], model: nn.Module) -> dict[str | int, list[int]]:
    """`axes` without the sequence axes: what `dynamic_axes(..., sequence=False)` returns (a
    torch.export program's own axes are kept whole)."""
    if symbolic_axes(model) is not None:
        return axes
    return {key: [axis for axis in chosen if axis == 0] for key, chosen in axes.items()}


def torch_to_onnx(
    model: nn.Module,
    example: ExampleInputs,
    *,
    dynamic: bool = True,
    sequence: bool = True,
    opset: int | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    axes: dict[str | int, list[int]] | None = None,
) -> Traced:
    """Export `model` on `example` to an ONNX IR model; one clear UserError when it cannot.

    Batch and, `sequence`, sequence axes (see `dynamic_axes`; `axes`: what it returned for
    this model and example, which runs the model to decide) are exported dynamic when
    torch.export can keep them so (a note says where it could not). Outputs are flattened
    (dicts, ModelOutput, nested tuples) and named after their keys; `input_names` /
    `output_names` rename them.
    """
    axes = axes if axes is not None else dynamic_axes(example, model)
    chosen = axes if sequence else batch_only(axes, model)
    if is_transformers_model(model):
        traced = _transformers_to_onnx(model, example, dynamic, chosen, opset=opset)
    else:
        traced = _plain_to_onnx(model, example, dynamic, chosen, opset=opset)
    _name_dynamic_axes(traced.model.graph, example, model, axes)
    _rename(traced.model.graph.inputs, input_names, "input")
    _rename(traced.model.graph.outputs, output_names, "output")
    static = [v.name for v in traced.model.graph.inputs if dynamic and _all_static(v)]
    if static and not any(note.startswith("input shapes fixed") for note in traced.notes):
        traced.notes.append(f"input shapes fixed by the model: {', '.join(map(str, static))}")
    return traced


#: What the dynamic axes of `dynamic_axes` are called in the file's input shapes.
AXIS_NAMES = {0: "batch", 1: "sequence"}


def _name_dynamic_axes(
    graph: ir.Graph, example: ExampleInputs, model: nn.Module, axes: dict[str | int, list[int]]
) -> None:
    """Call the symbolic dims of the graph's inputs "batch" / "sequence" (torch.export names
    them s0, s1, ...), matching inputs by keyword name, else by position, and the outputs'
    dims of the same symbols too; a program's axes past the first keep torch's names (its
    axis 1 may be anything). A sequence torch.export found free of the first one so named (a
    decoder's beside its encoder's) is named after its input ("decoder_input_ids_sequence"):
    one name for both would tell onnxruntime they are equal, and it warns at every run where
    they are not. Every batch is "batch", free or not (an attention mask's batch may
    broadcast; CLIP's images and texts are the rare batches that differ).

    An input axis torch.onnx names after its traced size ("12": an LSTM's sequence, which the
    graph runs at any length) leaves the outputs' dims of that size static ([s23, 12, 7]):
    onnxruntime then warns at every other length. Those dims are called after the axis too;
    a dim declared symbolic that is in fact static costs nothing at run time."""
    names = AXIS_NAMES if symbolic_axes(model) is None else {0: AXIS_NAMES[0]}
    renamed: dict[str, str] = {}
    for index, value in enumerate(graph.inputs):
        key: str | int = value.name if value.name in example.kwargs else index
        if key not in axes or value.shape is None:
            continue
        dims: list[Any] = list(value.shape)
        for axis in axes[key]:
            if axis < len(dims) and not isinstance(dims[axis], int) and axis in names:
                symbol = str(dims[axis])
                if symbol not in renamed:  # a sequence free of the first gets its own name
                    taken = axis != 0 and names[axis] in renamed.values()
                    renamed[symbol] = f"{value.name}_{names[axis]}" if taken else names[axis]
                dims[axis] = renamed[symbol]
        value.shape = ir.Shape(dims)
    for value in graph.outputs:
        if value.shape is not None and renamed:
            value.shape = ir.Shape([renamed.get(str(d), d) for d in value.shape])
    # (str(d) of a static dim is its size: it matches an input symbol named after that size)


def _all_static(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and all(isinstance(d, int) for d in shape)


def _rename(values: Sequence[ir.Value], names: list[str] | None, what: str) -> None:
    if names is None:
        return
    if len(names) != len(values):
        raise UserError(
            f"--{what}-names gives {len(names)} names, the model has {len(values)} {what}s"
        )
    if len(set(names)) != len(names):
        raise UserError(f"--{what}-names repeats a name: {', '.join(names)}")
    for value, name in zip(values, names, strict=True):
        value.name = name


def _dynamic_shapes(
    model: nn.Module, example: ExampleInputs, axes: dict[str | int, list[int]]
) -> Any:
    """`dynamic_shapes` for torch.export: Dim.AUTO on `axes` (from `dynamic_axes`; torch.export
    keeps an axis static where the model needs it so). A tuple for positional inputs only, else
    a dict by forward parameter name."""
    auto = torch.export.Dim.AUTO
    args = tuple({a: auto for a in axes[i]} or None for i in range(len(example.args)))
    if not example.kwargs:
        return args
    import inspect

    parameters = list(inspect.signature(model.forward).parameters)
    spec: dict[str, Any] = dict(zip(parameters, args, strict=False))
    spec.update({k: {a: auto for a in axes[k]} or None for k in example.kwargs})
    return spec


def _widened(example: ExampleInputs, axes: dict[str | int, list[int]]) -> ExampleInputs:
    """The example with every axis of `axes` (from `dynamic_axes`) of size 1 repeated to
    TRACE_MIN_SIZE."""

    def widen(key: str | int, t: torch.Tensor) -> torch.Tensor:
        for axis in axes.get(key, []):
            if axis == 1 and t.is_floating_point():
                continue  # a float axis 1 of size 1 may be features: it stays as given
            if t.shape[axis] < TRACE_MIN_SIZE:
                t = torch.cat([t] * TRACE_MIN_SIZE, dim=axis)
        return t

    return dataclasses.replace(  # the user's value ranges and final tokens kept
        example,
        args=tuple(widen(i, t) for i, t in enumerate(example.args)),
        kwargs={k: widen(k, v) for k, v in example.kwargs.items()},
    )


def _plain_to_onnx(
    model: nn.Module,
    example: ExampleInputs,
    dynamic: bool,
    axes: dict[str | int, list[int]],
    *,
    opset: int | None,
) -> Traced:
    notes: list[str] = []
    program = None
    if dynamic and example.tensors():
        traced = _widened(example, axes)
        try:
            with quiet():
                program = torch.export.export(
                    model,
                    traced.args,
                    traced.kwargs,
                    dynamic_shapes=_dynamic_shapes(model, traced, axes),
                )
        except Exception as e:  # noqa: BLE001 - torch.export raises many types
            notes.append(f"input shapes fixed at {example.describe()}: {first_line(e)[:150]}")
    if program is None:
        try:
            with quiet():
                program = torch.export.export(model, example.args, example.kwargs)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot trace the model with torch.export: {first_line(e)}") from e
    _refuse_mistranslated(program)
    try:
        with quiet(), _sdpa_as_math():
            onnx_program = torch.onnx.export(
                program, dynamo=True, opset_version=opset, verbose=False
            )
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot export to ONNX: {_blame(program, e)}") from e
    assert onnx_program is not None
    onnx_model = onnx_program.model
    names = _output_names(model, example)
    if names is not None and len(names) == len(onnx_model.graph.outputs):
        _name_outputs(onnx_model.graph, names)
    return Traced(onnx_model, notes, _sources(onnx_model, model))


def _output_names(model: nn.Module, example: ExampleInputs) -> list[str] | None:
    """Names of the flattened outputs: their keys joined by "." ("logits", "hidden.0"); a
    single tensor is "output", a top-level tuple's items "output0", "output1", ..."""
    with torch.no_grad():
        try:
            out = example(model)
        except Exception:  # noqa: BLE001 - the export already ran it; names are a nicety
            return None
    leaves, _ = pytree.tree_flatten_with_path(out)
    names = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        keys = [_key(k) for k in path]
        if not keys:
            names.append("output")
        elif isinstance(path[0], pytree.SequenceKey):
            names.append(".".join([f"output{keys[0]}", *keys[1:]]))
        else:
            names.append(".".join(keys))
    return names


def _key(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return re.sub(r"\W", "", str(key))


def _name_outputs(graph: ir.Graph, names: list[str]) -> None:
    """Name the graph's outputs; one that returns an input or an initializer as it is goes
    through an Identity so that tensor keeps its own name."""
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    for index, (value, name) in enumerate(zip(list(graph.outputs), names, strict=True)):
        if value.name == name:
            continue
        if value.is_graph_input() or value.name in taken or value.is_initializer():
            identity = ir.node("Identity", [value])
            output = identity.outputs[0]
            output.shape, output.type = value.shape, value.type
            graph.append(identity)
            graph.outputs[index] = value = output
        value.name = name


def _transformers_to_onnx(
    model: nn.Module,
    example: ExampleInputs,
    dynamic: bool,
    axes: dict[str | int, list[int]],
    *,
    opset: int | None,
) -> Traced:
    """transformers' own exporter: it patches what torch.export cannot trace in its models and
    flattens caches; ModelOutput keys become the output names."""
    try:
        from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter
    except ImportError:  # an older transformers: the plain path
        return _plain_to_onnx(model, example, dynamic, axes, opset=opset)
    import inspect

    inputs = dict(example.kwargs)
    parameters = list(inspect.signature(model.forward).parameters)
    inputs.update(zip(parameters, example.args, strict=False))
    as_kwargs = ExampleInputs((), inputs)
    axes = {parameters[k] if isinstance(k, int) else k: chosen for k, chosen in axes.items()}
    notes: list[str] = []
    onnx_model = None
    if dynamic:
        widened = _widened(as_kwargs, axes)
        shapes = _dynamic_shapes(model, widened, axes)
        try:
            with quiet(), _sdpa_as_math():
                onnx_model, _ = OnnxExporter().export_program(
                    model,  # type: ignore[arg-type]
                    dict(widened.kwargs),
                    OnnxConfig(dynamic_shapes=shapes, opset_version=opset),
                )
        except Exception as e:  # noqa: BLE001
            notes.append(f"input shapes fixed at {example.describe()}: {first_line(e)[:150]}")
    if onnx_model is None:
        try:
            with quiet(), _sdpa_as_math():
                onnx_model, _ = OnnxExporter().export_program(
                    model,  # type: ignore[arg-type]
                    dict(inputs),
                    OnnxConfig(opset_version=opset),
                )
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot export to ONNX: {first_line(e)}") from e
    return Traced(onnx_model, notes, _sources(onnx_model, model))


def _sources(onnx_model: ir.Model, model: nn.Module) -> dict[str, list[str]]:
    """initializer -> PyTorch parameter / buffer names, from what torch.onnx recorded: the
    initializer's own name when it is one, and the values its optimizer folded into it."""
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    known |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    out: dict[str, list[str]] = {}
    for name, value in onnx_model.graph.initializers.items():
        names = [name] if name in known else []
        folded = value.meta.get(_FOLDED_FROM) or ()
        names += sorted(n for n in folded if n in known and n not in names)
        if names:
            out[name] = names
    return out


def _blame(program: torch.export.ExportedProgram, error: Exception) -> str:
    """Name the layer whose operator torch.onnx could not translate."""
    text = "".join(traceback.format_exception(error))
    for node in program.graph.nodes:
        if node.op != "call_function" or str(node.target) not in text:
            continue
        # torch.onnx's report names the failing call's own error after its summary heading
        cause = re.search(r"<class '[\w.]+'>: (.+)", text)
        why = f": {cause.group(1).strip()[:200]}" if cause else ""
        return f"{_layer(node)} uses {node.target}, which torch.onnx cannot translate{why}"
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(error))


def _layer(node: torch.fx.Node) -> str:
    """The layer a traced call comes from, as "layer 'path' (Class)"."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the model's forward"
    path, cls = list(stack.values())[-1]
    return f"layer {path or '(top level)'!r} ({getattr(cls, '__name__', cls)})"


def _refuse_mistranslated(program: torch.export.ExportedProgram) -> None:
    """UserError naming the layer, for what torch.onnx translates without an error into a graph
    that is wrong: an LSTM with `proj_size` (ONNX's LSTM has no projection; the graph torch.onnx
    writes carries a cell state of the projected size, which onnxruntime refuses)."""
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.lstm.input:
            continue
        hidden, cell = (h.meta["val"].shape[-1] for h in node.args[1])
        if hidden != cell:
            raise UserError(
                f"cannot export to ONNX: {_layer(node)} is an LSTM with proj_size={hidden} "
                f"(hidden size {cell}), which ONNX's LSTM operator cannot express"
            )


_NOISY_LOGGERS = ("torch", "transformers", "onnxscript", "onnx_ir")


def _sdpa_as_math() -> contextlib.AbstractContextManager[None]:
    """torch.onnx decomposes scaled_dot_product_attention with the kernel the context picks.
    On CPU that is the flash kernel, whose output is laid out [batch, tokens, heads, dim]: a
    `reshape` after `transpose(1, 2)` then decomposes to a `view`, which the flash kernel's own
    decomposition into matmuls (a [batch, heads, tokens, dim] output) no longer allows, and
    torch.onnx fails ("Cannot view a tensor ..."; timm's relative-position ViTs and MaxViT,
    any attention mask that is a permuted view). The math kernel's layout is the one its
    decomposition produces (the ONNX graph is matmuls and a softmax either way)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export, torch.onnx and transformers log and warn a lot (fake-tensor traces,
    progress lines, missing torchvision): hide it; errors still raise."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
