"""Read ONNX files users bring: external data stays in the model's folder, declared sizes are
checked before anything is allocated, onnxruntime's own log lines are kept off stderr.

An ONNX file names its external data files by relative path (`location`); a location that is
absolute, climbs out with `..` or leaves through a symbolic link would make ticketc (or
onnxruntime, which reads the same entries) read any file on the machine. Sparse initializers
declare their dense dims, which `inspect` and onnxruntime materialise; ticketc's portable
decode nodes declare theirs in the attribute `t`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ticketc.errors import UserError, first_line
from ticketc.safe_load import check_file, check_memory, quiet

# onnxruntime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
_ORT_FATAL_ONLY = 4
PROTOBUF_LIMIT = 2**31 - 1


def load_onnx(path: str | os.PathLike[str]) -> Any:  # -> onnx.ModelProto
    """Parse an ONNX file, check it (see `check_onnx`) and load its external data.

    Raises UserError naming the file and what is wrong.
    """
    from onnx.external_data_helper import load_external_data_for_tensor

    p = check_file(path)
    model = parse_onnx(p)
    external = check_onnx(model, p)
    try:
        with quiet():
            for tensor in external:
                load_external_data_for_tensor(tensor, str(p.parent))
    except Exception as e:  # noqa: BLE001 - onnx raises ValueError/OSError/its own errors
        raise UserError(f"{p}: cannot read its external data ({first_line(e)})") from e
    return model


def parse_onnx(p: Path) -> Any:
    """The ModelProto in `p` without its external data; UserError when it does not parse."""
    import onnx

    if p.stat().st_size > PROTOBUF_LIMIT:
        raise UserError(f"{p}: larger than 2 GiB, the limit of one ONNX protobuf")
    try:
        with quiet():
            model = onnx.load_model(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf errors on corrupt files
        raise UserError(f"{p}: not a readable ONNX file ({first_line(e)})") from e
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise UserError(f"{p}: not an ONNX model (no IR version or graph)")
    return model


def check_onnx(model: Any, p: Path) -> list[Any]:
    """Check every tensor's external data and the sizes the model declares.

    Returns the tensors stored as external data (their locations checked). Raises UserError.
    """
    external = []
    for tensor in all_tensors(model):
        if tensor.data_location == tensor.EXTERNAL or len(tensor.external_data):
            length = check_external_data(tensor, p)
            explicit = any(e.key == "length" for e in tensor.external_data)
            _check_stored_bytes(tensor, length, p, exact=explicit)
            external.append(tensor)
        elif tensor.HasField("raw_data"):
            _check_stored_bytes(tensor, len(tensor.raw_data), p)
    declared = 0
    for sparse in _sparse_tensors(model):
        declared += _dense_bytes(list(sparse.dims), p, f"sparse initializer {sparse.values.name!r}")
    for node in _all_nodes(model):
        if node.domain == "ticketc":
            for attr in node.attribute:
                if attr.name == "t":
                    declared += _dense_bytes(list(attr.ints), p, f"decode node {node.name!r}")
    check_memory(declared, p, "the dense weights of its sparse and compact tensors")
    return external


def _dense_bytes(dims: list[int], p: Path, what: str) -> int:
    if any(d < 0 for d in dims):
        raise UserError(f"{p}: {what} has a negative dimension {dims}")
    numel = math.prod(dims)
    if numel >= 2**62:
        shown = " x ".join(map(str, dims))
        raise UserError(f"{p}: {what} declares dims {shown}, far beyond any machine's memory")
    return 4 * numel


def _check_stored_bytes(tensor: Any, stored: int, p: Path, exact: bool = True) -> None:
    """UserError unless a fixed-width tensor's stored bytes are what its dims and type take
    (at least that, not `exact`: external data without a length runs to its file's end)."""
    from onnx import TensorProto, helper

    if tensor.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return
    dims = list(tensor.dims)
    numel = math.prod(dims) if all(d >= 0 for d in dims) else -1
    try:
        bits = 8 * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1):
        bits = 4
    needed = (numel * bits + 7) // 8
    if numel < 0 or stored < needed or (exact and stored != needed):
        raise UserError(
            f"{p}: tensor {tensor.name[:80]!r} declares dims {dims} but stores {stored} bytes"
        )


def check_external_data(tensor: Any, p: Path) -> int:
    """UserError unless the tensor's external data lies in a regular file inside p's folder,
    within that file's size; returns its length in bytes."""
    info: dict[str, str] = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"{p}: tensor {tensor.name[:80]!r}"
    if not location:
        raise UserError(f"{where} is stored as external data without a location")
    rel = Path(location)
    folder = p.parent.resolve()
    if rel.is_absolute() or rel.drive or ".." in rel.parts or "\\" in location:
        raise UserError(
            f"{where}: external data location {location[:120]!r} is not a plain path inside the "
            "model's folder; refused"
        )
    target = folder / rel
    try:
        resolved = target.resolve(strict=True)
    except (OSError, RuntimeError):
        raise UserError(f"{where}: external data file {location[:120]!r} is missing") from None
    if not resolved.is_relative_to(folder) or not resolved.is_file():
        raise UserError(
            f"{where}: external data {location[:120]!r} leaves the model's folder (a link?) or is "
            "not a regular file; refused"
        )
    size = resolved.stat().st_size
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else size - offset
    except ValueError:
        raise UserError(f"{where}: external data offset/length are not integers") from None
    if offset < 0 or length < 0 or offset + length > size:
        span = f"offset {offset}" + (f", length {length}" if "length" in info else "")
        raise UserError(
            f"{where}: external data ({span}) lies outside {location[:120]!r} ({size} bytes)"
        )
    return length


def all_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of the model: initializers, sparse initializers' parts, node attributes
    (also in subgraphs and model-local functions)."""
    for graph in _all_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in _all_nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices


def _sparse_tensors(model: Any) -> Iterator[Any]:
    for graph in _all_graphs(model):
        yield from graph.sparse_initializer
    for node in _all_nodes(model):
        for attr in node.attribute:
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor
            yield from attr.sparse_tensors


def _all_graphs(model: Any) -> Iterator[Any]:
    """The main graph and every subgraph (If / Loop / Scan bodies), also inside functions."""
    stack = [model.graph]
    for function in model.functions:
        for node in function.node:
            stack.extend(_subgraphs(node))
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            stack.extend(_subgraphs(node))


def _subgraphs(node: Any) -> list[Any]:
    graphs = []
    for attr in node.attribute:
        if attr.HasField("g"):
            graphs.append(attr.g)
        graphs.extend(attr.graphs)
    return graphs


def _all_nodes(model: Any) -> Iterator[Any]:
    for graph in _all_graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def check_onnx_file(path: str | os.PathLike[str]) -> Path:
    """Check an ONNX file that another reader (onnxruntime) will load from its path."""
    p = check_file(path)
    check_onnx(parse_onnx(p), p)
    return p


def session_options() -> Any:  # -> onnxruntime.SessionOptions
    """Options whose logger prints fatal errors only: a failure reaches the user as the one line
    ticketc prints, not as onnxruntime's coloured log lines. (Per session, so the process-wide
    default logger the user may have set is left alone.)"""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = _ORT_FATAL_ONLY
    return options


def run_options() -> Any:  # -> onnxruntime.RunOptions
    """Per-run options with the same fatal-only logger as `session_options`."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = _ORT_FATAL_ONLY
    return options
