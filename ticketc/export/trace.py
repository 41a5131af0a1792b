"""torch -> ONNX (dynamo), and finding each pruned weight among the graph's initializers.

Works on the exporter's in-memory IR (onnx_ir), whose initializers still point at the torch
tensors: nothing is copied until ticketc decides how each weight is stored.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from ticketc.errors import UserError
from ticketc.masks import Masks

#: Named example inputs (keyword arguments of forward, e.g. a transformers model's input_ids
#: and attention_mask) and, per input, which axes may vary: axis -> name ("batch", "sequence").
NamedInputs = Mapping[str, torch.Tensor]
DynamicAxes = Mapping[str, Mapping[int, str]]


def torch_to_onnx(
    model: nn.Module,
    example_input: torch.Tensor | NamedInputs,
    *,
    dynamic_batch: bool,
    opset: int | None,
    dynamic_axes: DynamicAxes | None = None,
) -> tuple[torch.onnx.ONNXProgram, list[str]]:
    """torch.onnx (dynamo) with a dynamic batch dimension; names the layer that cannot export.

    `example_input`: one tensor (the positional input), or named tensors passed as keyword
    arguments, whose `dynamic_axes` (default: axis 0 of each, "batch") are exported dynamic.
    Returns the program and notes for the user (e.g. why the batch size had to be fixed).
    """
    if isinstance(example_input, Mapping):
        return _named_to_onnx(model, example_input, dynamic_axes, dynamic_batch, opset)
    notes: list[str] = []
    program = None
    if dynamic_batch and example_input.dim() > 0:
        # torch.export specialises dimensions of size 1, so trace the batch at size 2.
        traced = example_input
        if example_input.shape[0] == 1:
            traced = example_input.expand(2, *example_input.shape[1:]).contiguous()
        batch = torch.export.Dim("batch")
        try:
            program = torch.export.export(model, (traced,), dynamic_shapes=({0: batch},))
        except Exception as e:  # noqa: BLE001 - torch.export raises many types
            notes.append(f"batch size fixed at {example_input.shape[0]}: {first_line(e)[:150]}")
    if program is None:
        try:
            program = torch.export.export(model, (example_input,))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot trace the model with torch.export: {first_line(e)}") from e
    return _program_to_onnx(program, opset), notes


def _named_to_onnx(
    model: nn.Module,
    inputs: NamedInputs,
    dynamic_axes: DynamicAxes | None,
    dynamic: bool,
    opset: int | None,
) -> tuple[torch.onnx.ONNXProgram, list[str]]:
    """Keyword inputs; the dynamic axes as Dim.DYNAMIC (torch.export keeps the ranges the model
    implies, e.g. sequence <= max_position_embeddings), then named in the ONNX inputs."""
    axes = dynamic_axes if dynamic_axes is not None else {n: {0: "batch"} for n in inputs}
    notes: list[str] = []
    program = None
    if dynamic and any(axes.values()):
        shapes = {n: {a: torch.export.Dim.DYNAMIC for a in axes.get(n, {})} for n in inputs}
        try:
            program = torch.export.export(model, (), kwargs=dict(inputs), dynamic_shapes=shapes)
        except Exception as e:  # noqa: BLE001 - torch.export raises many types
            notes.append(f"input shapes fixed as traced: {first_line(e)[:150]}")
    if program is None:
        try:
            program = torch.export.export(model, (), kwargs=dict(inputs))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot trace the model with torch.export: {first_line(e)}") from e
    onnx_program = _program_to_onnx(program, opset, output_names=_output_names(model, inputs))
    for value in onnx_program.model.graph.inputs:
        named = axes.get(value.name or "", {})
        if value.shape is not None and named:
            dims = list(value.shape)
            value.shape = ir.Shape(
                [d if isinstance(d, int) else named.get(i, d) for i, d in enumerate(dims)]
            )
    return onnx_program, notes


def _output_names(model: nn.Module, inputs: NamedInputs) -> list[str] | None:
    """The keys of the model's outputs (a transformers ModelOutput: "logits", ...), or None."""
    try:
        with torch.no_grad():
            out = model(**inputs)
    except Exception:  # noqa: BLE001 - torch.export will report the same failure, better
        return None
    if isinstance(out, Mapping) and all(isinstance(v, torch.Tensor) for v in out.values()):
        return [str(k) for k in out]
    return None


def _program_to_onnx(
    program: torch.export.ExportedProgram, opset: int | None, output_names: list[str] | None = None
) -> torch.onnx.ONNXProgram:
    try:
        with quiet():
            onnx_program = torch.onnx.export(
                program, dynamo=True, opset_version=opset, verbose=False, output_names=output_names
            )
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot export to ONNX: {_blame(program, e)}") from e
    assert onnx_program is not None
    return onnx_program


def _blame(program: torch.export.ExportedProgram, error: Exception) -> str:
    """Name the layer whose operator torch.onnx could not translate."""
    text = "".join(traceback.format_exception(error))
    for node in program.graph.nodes:
        if node.op != "call_function" or str(node.target) not in text:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        layer = "the model's forward"
        if stack:
            path, cls = list(stack.values())[-1]
            layer = f"layer {path or '(top level)'!r} ({getattr(cls, '__name__', cls)})"
        return f"{layer} uses {node.target}, which torch.onnx cannot translate"
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(error))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.onnx logs and warns a lot (missing torchvision, progress lines): hide it."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def slim_(proto: onnx.ModelProto) -> None:
    """Drop what torch.onnx adds for debugging (stack traces, module paths, inferred shapes).

    About 5 KB on Lenet-300-100: a third of a 3.6 %-dense int4 file. ONNX needs none of it.
    """
    graph = proto.graph
    del graph.value_info[:]
    graph.doc_string = ""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        node.name = ""
        if opset is not None and node.domain in ("", "ai.onnx"):
            _drop_default_attributes_(node, opset)
    for value in [*graph.input, *graph.output]:
        del value.metadata_props[:]
        value.doc_string = ""


def _drop_default_attributes_(node: onnx.NodeProto, opset: int) -> None:
    """Remove attributes that only restate the operator's default (Gemm's alpha=1, beta=1, ...)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return
    kept = []
    for attribute in node.attribute:
        spec = schema.attributes.get(attribute.name)
        default = spec.default_value if spec is not None else None
        if default is None or not default.HasField("type"):
            kept.append(attribute)
            continue
        value = onnx.AttributeProto()
        value.CopyFrom(attribute)
        value.name = default.name  # compare values, not names
        if value.SerializeToString(deterministic=True) != default.SerializeToString(
            deterministic=True
        ):
            kept.append(attribute)
    del node.attribute[:]
    node.attribute.extend(kept)


@dataclass(frozen=True)
class Found:
    name: str  # parameter name
    initializer: str  # graph initializer holding it
    weight: torch.Tensor  # as stored in the graph (possibly transposed)
    nnz: int


def find_pruned(graph: ir.Graph, model: nn.Module, masks: Masks) -> tuple[list[Found], list[str]]:
    """The initializer of each masked weight: by name, or transposed by torch.onnx's optimizer."""
    params = dict(model.named_parameters())
    found: list[Found] = []
    notes: list[str] = []
    for name, mask in masks.items():
        weight = params[name].detach().float()
        match = _find(graph, name, weight)
        if match is None:
            notes.append(f"{name}: not found among the ONNX initializers, left as torch wrote it")
            continue
        found.append(Found(name, match[0], match[1], int(mask.count_nonzero())))
    return found, notes


def _find(graph: ir.Graph, name: str, weight: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    value = graph.initializers.get(name)
    tensor = value.const_value if value is not None else None
    if tensor is not None and tuple(tensor.shape) == tuple(weight.shape):
        return name, weight
    if weight.dim() != 2:
        return None
    # For MatMul (inputs of rank > 2) torch.onnx folds Transpose(weight) into a new initializer.
    transposed = weight.t().contiguous()
    for init_name, value in graph.initializers.items():
        tensor = value.const_value
        if (
            tensor is not None
            and tuple(tensor.shape) == tuple(transposed.shape)
            and tensor.dtype == ir.DataType.FLOAT
            and np.array_equal(tensor.numpy(), transposed.numpy())
        ):
            return init_name, transposed
    return None


def drop_data_(graph: ir.Graph, name: str) -> None:
    """Replace an initializer's data by a reference to nothing, keeping its name, type and shape.

    Once a weight is encoded, its dense data must not be serialised: this keeps the export of a
    large model to one dense copy (torch's) instead of three. The reference never reaches a file:
    the rewrite replaces the initializer.
    """
    value = graph.initializers[name]
    tensor = value.const_value
    assert tensor is not None
    value.const_value = ir.ExternalTensor(
        "ticketc-replaced",
        offset=0,
        length=tensor.nbytes,
        dtype=tensor.dtype,
        shape=ir.Shape(tensor.shape.numpy()),
        name=name,
    )


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
