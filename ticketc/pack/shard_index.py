"""The index inside a packed shard: which tensors its blobs hold, and where each stream lies.

The streams of every tensor (ticketc.pack.codec.Encoded) in a shard (ticketc.pack.store) are
concatenated per dtype into a few *blob* tensors named `__ticketc__.<DTYPE>` (U8, I8, U16, F16,
BF16, F32, ...): a handful of header entries per shard instead of several per tensor, which
matters for small models. The shard's `__metadata__` holds

    "ticketc.pack": the index, one line per tensor in blob order:
                    "SHARED DTYPE LAYOUT SHAPE ENTRIES [K UNARY] SUFFIX"
    "values":       the value type of the sparse tensors ("lossless", "fp16", "int8", "int4")
    "zero_signs":   "1" when every sparse tensor stores its zero_signs stream

Names are front-coded: the tensor's name is the first SHARED characters of the previous line's
name followed by SUFFIX (the rest of the line: a name may hold spaces, not newlines). SHAPE is
"64x128" ("" -> "-" for a 0-d tensor); K and UNARY (the Rice parameter and the unary stream's
bytes) appear for layout "rice" only. For small models the header is a real share of the file
(BERT at 90 % fp16 with 64-wide layers: a third smaller than the same index as JSON objects).
Every other stream's length follows from these fields (`stream_shapes`), so a reader finds each
stream by summing lengths in index order and checks that the sums end exactly at each blob's
end. Streams of one tensor come in the order of STREAMS.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ticketc.errors import UserError
from ticketc.pack.codec import VALUES, Encoded
from ticketc.pack.nm import NMPositions, parse_layout

__all__ = [
    "BLOB_PREFIX",
    "DTYPES",
    "META_KEY",
    "STREAMS",
    "Located",
    "dtype_name",
    "format_index",
    "index_entry",
    "locate_streams",
    "parse_index",
    "stream_shapes",
]

BLOB_PREFIX = "__ticketc__."
META_KEY = "ticketc.pack"
STREAMS = ("positions", "remainders", "codes", "values", "scale", "codebook", "zero_signs")

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_VALUE_DTYPE = {"fp16": "F16", "int8": "I8", "int4": "U8"}


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype ("F16", "BF16", ...)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise UserError(f"cannot pack tensors of dtype {dtype}") from None


def stream_shapes(
    dtype: str,
    layout: str,
    shape: tuple[int, ...],
    entries: int,
    rice: tuple[int, int] | None,
    values: str,
    zero_signs: bool,
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(stream, blob dtype, shape) of every stream of one tensor, in STREAMS order."""
    numel = math.prod(shape)
    if layout == "dense":
        return [("values", dtype, (numel,))]
    out: list[tuple[str, str, tuple[int, ...]]] = []
    if layout == "bitmask":
        out.append(("positions", "U8", ((numel + 7) // 8,)))
    elif layout == "rice":
        if rice is None:
            raise ValueError("a rice tensor needs [k, unary bytes]")
        k, unary = rice
        out += [("positions", "U8", (unary,)), ("remainders", "U8", (k, (entries + 7) // 8))]
    elif (nm := parse_layout(layout)) is not None:
        n, m, _ = nm
        groups = numel // m
        out.append(("codes", "U8", (NMPositions.code_bytes(groups, n, m),)))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if values == "lossless":
        out.append(("values", dtype, (entries,)))
    else:
        count = (entries + 1) // 2 if values == "int4" else entries
        out.append(("values", _VALUE_DTYPE[values], (count,)))
    if values == "int8":
        out.append(("scale", "F16", (shape[0],)))
    if values == "int4":
        out.append(("codebook", "F16", (16,)))
    if zero_signs:
        out.append(("zero_signs", "U8", ((numel - entries + 7) // 8,)))
    return out


def index_entry(encoded: Encoded) -> list[Any]:
    """The index fields of one tensor: [dtype, layout, shape, entries, *rice]."""
    entry: list[Any] = [dtype_name(encoded.dtype), encoded.layout, list(encoded.shape)]
    entry.append(encoded.entries)
    if encoded.layout == "rice":
        remainders, unary = encoded.streams["remainders"], encoded.streams["positions"]
        entry += [int(remainders.shape[0]), int(unary.shape[0])]
    return entry


def format_index(index: dict[str, list[Any]]) -> str:
    """The shard index as front-coded lines (see the module docstring)."""
    lines, previous = [], ""
    for name, (dtype, layout, shape, entries, *rice) in index.items():
        shared = len(os.path.commonprefix([previous, name]))
        dims = "x".join(str(d) for d in shape) or "-"
        fields = [shared, dtype, layout, dims, entries, *rice, name[shared:]]
        lines.append(" ".join(str(f) for f in fields))
        previous = name
    return "\n".join(lines)


def parse_index(text: str) -> dict[str, list[Any]]:
    """Inverse of format_index (ValueError on a malformed line)."""
    index: dict[str, list[Any]] = {}
    previous = ""
    for line in text.split("\n") if text else []:
        head = line.split(" ", 5)
        if len(head) < 6:
            raise ValueError(f"index line {line!r} has too few fields")
        shared, dtype, layout, dims, entries, rest = head
        rice: list[int] = []
        if layout == "rice":
            k, unary, rest = (rest.split(" ", 2) + ["", ""])[:3]
            rice = [int(k), int(unary)]
        if int(shared) > len(previous):
            raise ValueError(f"index line {line!r} shares more than the previous name")
        name = previous[: int(shared)] + rest
        shape = [] if dims == "-" else [int(d) for d in dims.split("x")]
        index[name] = [dtype, layout, shape, int(entries), *rice]
        previous = name
    return index


@dataclass(frozen=True)
class Located:
    """Where one tensor's streams lie in its shard's blobs."""

    dtype: str
    layout: str
    shape: tuple[int, ...]
    entries: int
    values: str
    streams: list[tuple[str, str, int, tuple[int, ...]]]  # stream, blob, offset, shape


def locate_streams(
    index: dict[str, Any], values: str, zero_signs: bool, blob_sizes: dict[str, int]
) -> dict[str, Located]:
    """Offsets of every stream, from the lengths the index implies (ValueError when they do
    not add up to the blobs exactly)."""
    if values not in VALUES:
        raise ValueError(f"values {values!r} is not one of {VALUES}")
    offsets: dict[str, int] = {}
    out = {}
    for name, entry in index.items():
        dtype, layout, shape, entries = str(entry[0]), str(entry[1]), tuple(entry[2]), int(entry[3])
        if dtype not in DTYPES or any(int(s) < 0 for s in shape) or entries < 0:
            raise ValueError(f"bad index entry for {name!r}: {entry}")
        rice = (int(entry[4]), int(entry[5])) if layout == "rice" else None
        kind = "lossless" if layout == "dense" else values
        streams = []
        for stream, blob, sshape in stream_shapes(
            dtype, layout, shape, entries, rice, kind, zero_signs and layout != "dense"
        ):
            start = offsets.get(blob, 0)
            streams.append((stream, blob, start, sshape))
            offsets[blob] = start + math.prod(sshape)
        out[name] = Located(dtype, layout, shape, entries, kind, streams)
    for blob in set(offsets) | set(blob_sizes):
        if offsets.get(blob, 0) != blob_sizes.get(blob, 0):
            raise ValueError(
                f"blob {blob} holds {blob_sizes.get(blob, 0)} elements, the index "
                f"describes {offsets.get(blob, 0)}"
            )
    return out
