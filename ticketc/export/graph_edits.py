"""Edits to a traced graph on its way to the file (ticketc.export.write): `slim_` drops what
torch.onnx adds for debugging from the ONNX proto, `drop_data_` lets go of an encoded
initializer's dense data in the in-memory IR (onnx_ir) so it is never serialised,
`deduplicate_` keeps one initializer of each set holding the same values."""

from __future__ import annotations

import hashlib

import onnx
import onnx_ir as ir

__all__ = ["deduplicate_", "drop_data_", "slim_"]


def slim_(proto: onnx.ModelProto) -> None:
    """Drop what torch.onnx adds for debugging (stack traces, module paths, inferred shapes).

    About 5 KB on Lenet-300-100: a third of a 3.6 %-dense int4 file. ONNX needs none of it.
    """
    graph = proto.graph
    del graph.value_info[:]
    graph.doc_string = ""
    del graph.metadata_props[:]
    del proto.metadata_props[:]
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
    for init in graph.initializer:
        del init.metadata_props[:]
        init.doc_string = ""


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


def deduplicate_(model: ir.Model, sources: dict[str, list[str]]) -> list[str]:
    """Keep one initializer of each set in the main graph holding the same values (dtype,
    shape and bytes), every use of the others pointing at it; their PyTorch names in
    `sources` move to it. torch.onnx folds a weight's transpose once per use, so a layer
    shared across depth (ALBERT's one encoder layer) arrives as one copy per layer.
    Graph inputs and outputs stay. Returns the names that went.

    As onnx_ir's DeduplicateHashedInitializersPass, which hashes a tensor's buffer as it
    lies and fails on torch's transposed views ("ndarray is not C-contiguous", onnx_ir 1.1).
    """
    graph = model.graph
    kept: dict[tuple[object, tuple[int, ...], bytes], ir.Value] = {}
    gone = []
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or value.is_graph_output():
            continue
        array = tensor.numpy()  # tobytes: C order whatever the strides
        key = (tensor.dtype, tuple(array.shape), hashlib.sha256(array.tobytes()).digest())
        first = kept.setdefault(key, value)
        if first is value:
            continue
        value.replace_all_uses_with(first)
        graph.initializers.pop(name)
        gone.append(name)
        if name in sources and first.name is not None:
            merged = sources.setdefault(first.name, [])
            merged.extend(n for n in sources.pop(name) if n not in merged)
    return gone
