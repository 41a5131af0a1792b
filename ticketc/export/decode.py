"""Decode stored weights the way a runtime does: the part of a graph that computes them, run in
onnxruntime. The exporter checks every decoded weight with it; `inspect` and tests use it too."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

if TYPE_CHECKING:
    from ticketc.export.portable import Group, StoredGroup
    from ticketc.formats.decode_check import DecodeCheck


def weights_subgraph(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A model with no inputs whose outputs are the tensors `names` of `model`'s main graph,
    computed by the nodes that produce them (the decoders, Split, Reshape, constants).
    bf16 outputs are cast to float32 (exact), as numpy has no bfloat16 for onnxruntime."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {init.name: init for init in model.graph.initializer}
    needed_nodes: dict[int, onnx.NodeProto] = {}
    needed_inits: dict[str, onnx.TensorProto] = {}
    stack = list(names)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in inits:
            needed_inits[name] = inits[name]
            continue
        node = producers.get(name)
        if node is None:
            raise ValueError(f"{name!r} is computed from a graph input, not stored weights")
        needed_nodes[id(node)] = node
        stack.extend(node.input)
    order = [n for n in model.graph.node if id(n) in needed_nodes]
    outputs, extra = [], []
    for name in names:
        dtype = _type_of(name, inits, order, model)
        if dtype == TensorProto.BFLOAT16:
            extra.append(helper.make_node("Cast", [name], [name + "~f"], to=TensorProto.FLOAT))
            outputs.append(helper.make_tensor_value_info(name + "~f", TensorProto.FLOAT, None))
        else:
            outputs.append(helper.make_tensor_value_info(name, dtype, None))
    graph = helper.make_graph(order + extra, "weights", [], outputs, list(needed_inits.values()))
    return helper.make_model(
        graph,
        opset_imports=model.opset_import,
        functions=model.functions,
        ir_version=model.ir_version,
    )


def _type_of(
    name: str,
    inits: dict[str, onnx.TensorProto],
    nodes: list[onnx.NodeProto],
    model: onnx.ModelProto,
) -> int:
    if name in inits:
        return int(inits[name].data_type)
    for info in [*model.graph.value_info, *model.graph.output]:
        if info.name == name:
            return int(info.type.tensor_type.elem_type)
    inferred = onnx.shape_inference.infer_shapes(
        helper.make_model(
            helper.make_graph(nodes, "g", [], [], list(inits.values())),
            opset_imports=model.opset_import,
            functions=model.functions,
            ir_version=model.ir_version,
        )
    )
    for info in inferred.graph.value_info:
        if info.name == name:
            return int(info.type.tensor_type.elem_type)
    return TensorProto.FLOAT


def decode_in_onnxruntime(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The tensors `names` of `model` as onnxruntime computes them (bf16 as float32)."""
    from ticketc.safe_onnx import run_options
    from ticketc.verify import ort_session

    subgraph = weights_subgraph(model, names)
    session = ort_session(subgraph.SerializeToString())
    values = session.run(None, {}, run_options())
    return dict(zip(names, values, strict=True))


def decode_checks(
    model: onnx.ModelProto,
    groups: Sequence[Group | StoredGroup],
    originals: Mapping[str, np.ndarray],
    decoded: Mapping[str, np.ndarray] | None = None,
) -> Iterator[tuple[str, str, DecodeCheck]]:
    """Every tensor of `groups`, decoded in onnxruntime from `model` (one group at a time, or
    taken from `decoded`, what `decode_in_onnxruntime` returned for them) and checked against
    `originals[name]` (in its dtype) within what its value type promises
    (`ticketc.formats.decode_check.check_decoded`): (name, values kind, check)."""
    from ticketc.formats.decode_check import check_decoded

    for group in groups:
        values = decode_in_onnxruntime(model, group.names) if decoded is None else decoded
        wanted = [originals[name] for name in group.names]
        got = [values[n].astype(w.dtype) for n, w in zip(group.names, wanted, strict=True)]
        checks = check_decoded(group.compact, wanted, got)
        for name, check in zip(group.names, checks, strict=True):
            yield name, group.compact.values_kind, check
