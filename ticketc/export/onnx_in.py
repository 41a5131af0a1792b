"""`ticketc export model.onnx`: the same storage pass over an existing ONNX file.

A file from torch.onnx, optimum, tf2onnx or anything else (external data included) is read
whole, every float initializer of its main graph is stored as the export would store it, and
the rewritten file is checked against the original in onnxruntime: decoded weights within
their value type's promise, outputs equal (lossless) or reported (lossy).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from ticketc.errors import UserError
from ticketc.export.config import ExportConfig, ExportResult
from ticketc.export.portable import MIN_OPSET, default_opset
from ticketc.export.write import write_onnx
from ticketc.inputs import DTYPES, ExampleInputs, random_like
from ticketc.verify import (
    VERIFY_BATCH,
    Verification,
    check_loads_in_a_child,
    ort_session,
    verify_against_onnx,
)

__all__ = ["export_onnx_file", "load_onnx", "onnx_sample"]

#: Size given to a symbolic dimension other than the batch in a verification sample.
SYMBOLIC_SIZE = 8


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """An ONNX file with its external data read in, checked first (ticketc.safe_onnx: external
    data stays in the file's folder, declared sizes fit); UserError when it does not load."""
    from ticketc.safe_onnx import load_onnx as load_checked

    return load_checked(path)  # type: ignore[no-any-return]


def export_onnx_file(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: ExportConfig | None = None,
    sample: ExampleInputs | None = None,
) -> ExportResult:
    """Rewrite the ONNX file `path` to `out` with its initializers stored as `config` says.

    The outputs of the rewritten file are compared with the original's in onnxruntime on
    `sample` (default: random inputs from the file's input types, batch 3). Raises UserError
    (nothing written) when the file cannot be read, its opset is below the decoder's, or a
    check fails.
    """
    config = config or ExportConfig()
    start = time.perf_counter()
    proto = load_onnx(path)
    opset = default_opset(proto) if proto.opset_import else 0
    if config.format == "portable" and opset < MIN_OPSET:
        raise UserError(
            f"{path}: opset {opset} is below {MIN_OPSET}, which the portable decoder needs "
            "(convert it first with onnx.version_converter.convert_version)"
        )
    notes = []
    streams = _decoder_streams(proto)
    if streams:
        notes.append("the file already holds ticketc decoders: their streams are left as they are")
    model = ir.serde.deserialize_model(proto)
    reference = Path(path)

    def check_outputs(staged: Path) -> Verification:
        check_loads_in_a_child(staged)
        chosen = sample if sample is not None else onnx_sample(ort_session(reference))
        tolerance = config.output_tolerance(_graph_float(model))
        return verify_against_onnx(staged, reference, chosen, tolerance)

    sources: dict[str, list[str]] = {}
    return write_onnx(
        model, out, config, sources, notes, check_outputs, start, skip=streams, source=str(path)
    )


def _decoder_streams(proto: onnx.ModelProto) -> set[str]:
    """Arrays of the ticketc decode groups a file already holds (already compact): written
    back unchanged."""
    from ticketc.export.portable_read import read_portable
    from ticketc.export.write import read_metadata

    try:
        groups = dict((read_metadata(proto) or {}).get("groups") or {})
        stored = read_portable(proto, groups)
    except (TypeError, ValueError) as e:
        raise UserError(f"its ticketc streams are malformed ({e})") from e
    return {name for group in stored for name in group.arrays}


def _graph_float(model: ir.Model) -> str:
    counts: dict[str, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            name = str(tensor.dtype.numpy())
            counts[name] = counts.get(name, 0) + int(np.prod(tensor.shape.numpy()))
    return max(counts, key=counts.__getitem__) if counts else "float32"


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def onnx_sample(session: object, seed: int = 1) -> ExampleInputs:
    """Random inputs for an onnxruntime session from its inputs' types and shapes: symbolic
    batch dimensions (the first) take VERIFY_BATCH, other symbolic ones SYMBOLIC_SIZE."""
    template = {}
    for port in session.get_inputs():  # type: ignore[attr-defined]
        dtype = _ORT_TYPES.get(port.type)
        if dtype is None:
            raise UserError(f"input {port.name!r} has type {port.type}, which ticketc cannot feed")
        shape = [
            d if isinstance(d, int) else (VERIFY_BATCH if axis == 0 else SYMBOLIC_SIZE)
            for axis, d in enumerate(port.shape or [])
        ]
        template[port.name] = torch.empty(shape, dtype=DTYPES[dtype])
    return random_like(ExampleInputs((), template), None, seed=seed)
