"""Reading a portable file back: the groups its decoder holds, with their stored arrays, the
codec of each and the graph outputs (weights) each one feeds."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from ticketc.export.decoder import array_names, decodes_by_gather, gathers_stored_values
from ticketc.export.portable import StoredGroup, parse_codec
from ticketc.formats.compact import Compact

__all__ = ["read_portable"]


def read_portable(model: onnx.ModelProto, codecs: dict[str, str]) -> list[StoredGroup]:
    """The groups of a portable model, read from its stored arrays (numpy, no runtime).

    `codecs`: group prefix -> codec name, as `write_portable_` returned them (the file's
    metadata keeps them). Each group's streams and tables become a `Compact`; its tensors'
    names and shapes come from the Split / Reshape nodes after it. Decode a group with
    `compact.to_dense()`. Raises ValueError on a missing array or a malformed group (its
    streams and tables checked against each other, `Compact.check`).
    """
    arrays = {init.name: init for init in model.graph.initializer}
    consumers: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, node)
    found = []
    for prefix, codec in codecs.items():
        positions_kind, values_kind, out_kind, dense_tail = parse_codec(codec)
        if prefix + "n" in arrays:
            numel = numpy_helper.to_array(arrays[prefix + "n"]).astype(np.int64)
            if decodes_by_gather(positions_kind, values_kind) and not dense_tail:
                numel = numel[:-1]  # the last piece is the bitmask's padding
            names, shapes = _outputs(prefix + "y", prefix, numel, consumers, arrays)
        elif prefix + "y0" in consumers:
            names, shapes = _block_outputs(prefix, consumers, arrays)
            numel = np.array([math.prod(s) for s in shapes], dtype=np.int64)
        else:
            names, shapes = _unsplit_outputs(prefix + "y", consumers, arrays)
            numel = np.array([math.prod(s) for s in shapes], dtype=np.int64)
        wanted = array_names(positions_kind, values_kind, numel.size, prefix + "n" in arrays)
        missing = [prefix + k for k in wanted if prefix + k not in arrays]
        if missing:
            raise ValueError(f"group {prefix!r} ({codec}) lacks arrays {missing}")
        data = {k: numpy_helper.to_array(arrays[prefix + k]) for k in wanted}
        positions = data.get("p", np.zeros(0, dtype=np.uint8))
        if not 0 <= dense_tail < max(numel.size, 1):
            raise ValueError(f"group {prefix!r} ({codec}) has {numel.size} tensors")
        tail_numel = int(numel[numel.size - dense_tail :].sum()) if dense_tail else 0
        if positions_kind == "dense":
            count = int(numel.sum())
        else:
            count = int(np.unpackbits(positions, bitorder="little").sum()) + tail_numel
        values = data["v"]
        if gathers_stored_values(positions_kind, values_kind) and values.size == count + 1:
            if values[0] != 0:  # the entry every zero element gathers (older files: none)
                raise ValueError(f"group {prefix!r} ({codec}) gathers zeros from {values[0]}")
            values = values[1:]
        entries = _counts(data.get("e"), count)
        if "e" not in data and numel.size > 1:  # no entry table: count each tensor's positions
            index = Compact(
                shapes,
                positions_kind,
                positions,
                "fp32",
                np.zeros(0),
                entries,
                data.get("r"),
                dense_tail=dense_tail,
            ).linear_indices()
            tensor = np.searchsorted(np.cumsum(numel), index, side="right")
            entries = np.bincount(tensor, minlength=numel.size).astype(np.int64)
        compact = Compact(
            shapes=shapes,
            positions_kind=positions_kind,
            positions=positions,
            values_kind=values_kind,
            values=values,
            entries=entries,
            remainders=data.get("r"),
            scale=data.get("s"),
            scale_rows=None if "s" not in data else _counts(data.get("q"), data["s"].size),
            codebook=data.get("c"),
            codebook_sizes=None if "c" not in data else _counts(data.get("b"), data["c"].size),
            dense_tail=dense_tail,
        )
        try:  # a corrupted stream (one changed byte) decodes weights to other places
            compact.check()
        except ValueError as e:
            raise ValueError(f"group {prefix!r} ({codec}): {e}") from e
        found.append(StoredGroup(names, compact, out_kind, tuple(prefix + k for k in wanted)))
    return found


def _unsplit_outputs(
    flat: str, consumers: dict[str, onnx.NodeProto], arrays: dict[str, onnx.TensorProto]
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """Name and shape of the one tensor decoded flat into `flat`, then reshaped to a stored
    shape."""
    user = consumers.get(flat)
    if user is None or user.op_type != "Reshape" or user.input[1] not in arrays:
        raise ValueError(f"decoded tensor {flat!r} is not reshaped to a stored shape")
    shape = tuple(int(d) for d in numpy_helper.to_array(arrays[user.input[1]]))
    return (user.output[0],), (shape,)


def _block_outputs(
    prefix: str, consumers: dict[str, onnx.NodeProto], arrays: dict[str, onnx.TensorProto]
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """Names and shapes of a group decoded in blocks `prefix` y0, y1, ...: each split by its
    stored sizes, or reshaped when it holds one tensor."""
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    j = 0
    while (flat := f"{prefix}y{j}") in consumers:
        user = consumers[flat]
        if user.op_type == "Split" and len(user.input) == 2 and user.input[1] in arrays:
            numel = numpy_helper.to_array(arrays[user.input[1]]).astype(np.int64)
            found = _outputs(flat, prefix, numel, consumers, arrays)
        else:
            found = _unsplit_outputs(flat, consumers, arrays)
        names += found[0]
        shapes += found[1]
        j += 1
    return tuple(names), tuple(shapes)


def _counts(starts: np.ndarray | None, total: int) -> np.ndarray:
    """Per-tensor counts from where each tensor's part begins (one tensor: the total)."""
    if starts is None:
        return np.array([total], dtype=np.int64)
    return np.diff(np.append(starts.astype(np.int64), total))


def _outputs(
    flat: str,
    prefix: str,
    numel: np.ndarray,
    consumers: dict[str, onnx.NodeProto],
    arrays: dict[str, onnx.TensorProto],
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """Names and shapes of the tensors decoded flat into `flat`, from the Split and Reshape
    nodes after it: a piece named under the group's prefix is reshaped, any other is a
    vector's own name."""
    user = consumers.get(flat)
    pieces = list(user.output) if user is not None and user.op_type == "Split" else [flat]
    pieces = [p for p in pieces if p != prefix + "x"]  # a bitmask's padding
    if len(pieces) != numel.size:
        raise ValueError(f"group {flat!r} holds {numel.size} tensors, {len(pieces)} are used")
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    for piece, n in zip(pieces, numel, strict=True):
        if not piece.startswith(prefix):
            names.append(piece)
            shapes.append((int(n),))
            continue
        reshape = consumers.get(piece)
        if reshape is None or reshape.op_type != "Reshape" or reshape.input[1] not in arrays:
            raise ValueError(f"decoded tensor {piece!r} is not reshaped to a stored shape")
        names.append(reshape.output[0])
        shapes.append(tuple(int(s) for s in numpy_helper.to_array(arrays[reshape.input[1]])))
    return tuple(names), tuple(shapes)
