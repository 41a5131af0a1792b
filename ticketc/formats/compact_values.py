"""Values of the compact codec's entries: the value kinds and their encoders.

What `Compact` stores per entry (the layouts are described in ticketc.formats.compact):
- "fp64", "fp32", "bf16", "fp16": the numbers themselves in that type;
- "int8": symmetric codes with an fp16 scale per row or per tensor (quantize.int8_scales);
- "int4": 4-bit codes into a per-tensor fp16 codebook (quantize.kmeans_1d), two per byte.
Each encoder takes the picked entries of every tensor and returns the stored values plus the
side arrays a decoder reads (scales and rows per tensor, or codebooks and their sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import torch

from ticketc.formats.quantize import FP16_MAX, assign_nearest, int8_scales, kmeans_1d

__all__ = [
    "CODEBOOK_SIZE",
    "FLOAT_KINDS",
    "INT8_ENTRIES_PER_ROW_SCALE",
    "INT8_ROW_SPREAD",
    "VALUES_KINDS",
    "VALUE_BITS",
    "VALUE_DTYPE",
    "check_values",
    "encode_values",
    "int4_codes",
    "int8_scale_count",
    "row_absmax",
    "value_kind_of",
    "values_nbytes",
]

VALUES_KINDS = ("fp64", "fp32", "bf16", "fp16", "int8", "int4")
FLOAT_KINDS = ("fp64", "fp32", "bf16", "fp16")
VALUE_BITS = {"fp64": 64, "fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}
VALUE_DTYPE: dict[str, np.dtype] = {
    "fp64": np.dtype(np.float64),
    "fp32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "fp16": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
    "int4": np.dtype(np.uint8),
}
CODEBOOK_SIZE = 16
# int8 keeps one scale per row where rows hold this many entries on average: below it the
# scales (2 B each) would cost more than an eighth of the values they serve, and are paid only
# where the largest row's values are INT8_ROW_SPREAD times the median row's (one scale would
# round the median row 4x more coarsely than its own).
INT8_ENTRIES_PER_ROW_SCALE = 16
INT8_ROW_SPREAD = 4.0

# (stored values, int8 scales, int8 scale rows per tensor, int4 codebooks, int4 codebook sizes)
EncodedValues = tuple[
    np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None
]


def value_kind_of(dtype: np.dtype | torch.dtype) -> str:
    """The float value kind of a dtype ("fp32" for float32, ...); ValueError for others."""
    name = str(dtype).replace("torch.", "")
    kinds = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    if name not in kinds:
        raise ValueError(f"dtype {name} is not a float type the codec stores")
    return kinds[name]


def values_nbytes(kind: str, entries: int) -> int:
    """Bytes of `entries` values of `kind`, side arrays not counted."""
    return (entries * VALUE_BITS[kind] + 7) // 8


def int8_scale_count(shape: tuple[int, ...], entries: int, row_absmax: np.ndarray) -> int:
    """How many int8 scales a tensor of `shape` with `entries` stored values gets: one per row
    (dim 0 of a matrix or kernel) where its rows hold INT8_ENTRIES_PER_ROW_SCALE entries on
    average, or where one scale for the tensor would be INT8_ROW_SPREAD times coarser than a
    row's own on most rows that hold entries (`row_absmax`: max |value| of each row, float
    [shape[0]]); else one for the whole tensor. A BatchNorm folded into a conv scales its rows
    apart: timm's GhostNet at 90 %, int8 output error 2.88 with one scale per tensor, 0.34
    per row."""
    rows = shape[0] if len(shape) >= 2 else 1
    if rows <= 1:
        return 1
    if entries >= INT8_ENTRIES_PER_ROW_SCALE * rows:
        return rows
    held = row_absmax[row_absmax > 0]
    spread = held.size > 0 and float(held.max()) > INT8_ROW_SPREAD * float(np.median(held))
    return rows if spread else 1


def row_absmax(values: np.ndarray, row: np.ndarray, rows: int) -> np.ndarray:
    """max |values| per row (float64 [rows], 0 for a row without values); `row`: each value's
    row."""
    absmax = np.zeros(rows)
    np.maximum.at(absmax, row, np.abs(values.astype(np.float64)))
    return absmax


def int4_codes(values: np.ndarray, count: int) -> np.ndarray:
    """The `count` 4-bit codes packed in int4 `values` (uint8, low nibbles first), int64."""
    packed = values.astype(np.int64)
    return np.concatenate([packed & 0x0F, packed >> 4])[:count]


def encode_values(
    kind: str,
    picked: list[np.ndarray],
    local: list[np.ndarray],
    shapes: tuple[tuple[int, ...], ...],
    with_zero: Sequence[bool],
) -> EncodedValues:
    """Encode each tensor's picked entries (`picked[t]`, at flat indices `local[t]` of a
    tensor of shape `shapes[t]`) as `kind`. with_zero[t]: tensor t's entries include its zeros
    (dense), which int4 gives an exact 0.0. Raises ValueError when a value does not fit."""
    if kind in FLOAT_KINDS:
        return _float_values(picked, kind), None, None, None, None
    if kind == "int8":
        codes, scale, scale_rows = _int8_values(picked, local, shapes)
        return codes, scale, scale_rows, None, None
    codes, codebook, codebook_sizes = _int4_values(picked, with_zero)
    return codes, None, None, codebook, codebook_sizes


def _float_values(picked: list[np.ndarray], kind: str) -> np.ndarray:
    values = np.concatenate(picked) if picked else np.zeros(0)
    if kind == "fp16":
        wide = values.astype(np.float64)
        if wide.size and float(np.abs(wide).max()) > FP16_MAX:
            raise ValueError(f"fp16 cannot hold {float(np.abs(wide).max()):.4g} (max {FP16_MAX:g})")
    return values.astype(VALUE_DTYPE[kind])


def _int8_values(
    picked: list[np.ndarray], local: list[np.ndarray], shapes: tuple[tuple[int, ...], ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    codes, scales, rows_per_tensor = [], [], []
    for values, index, shape in zip(picked, local, shapes, strict=True):
        wide = values.astype(np.float64)
        first = shape[0] if len(shape) >= 2 else 1
        by_row = row_absmax(wide, index // max(1, math.prod(shape) // first), first)
        rows = int8_scale_count(shape, index.size, by_row)
        row = index // max(1, math.prod(shape) // rows)
        scale = int8_scales(by_row if rows == first else by_row.max(keepdims=True))
        s = scale.astype(np.float64)[row]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s > 0, np.rint(wide / np.where(s > 0, s, 1.0)), 0.0)
        codes.append(np.clip(q, -127, 127).astype(np.int8))
        scales.append(scale)
        rows_per_tensor.append(rows)
    return (
        np.concatenate(codes),
        np.concatenate(scales).astype(np.float16),
        np.array(rows_per_tensor, dtype=np.int64),
    )


def _int4_values(
    picked: list[np.ndarray], with_zero: Sequence[bool]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """with_zero[t]: tensor t's entries include its zeros (dense), which take an exact 0.0."""
    codes, books, sizes = [], [], []
    for values, zeros_stored in zip(picked, with_zero, strict=True):
        wide = values.astype(np.float64)
        nonzero = wide != 0
        has_zero = zeros_stored and not bool(nonzero.all())
        levels = CODEBOOK_SIZE - 1 if has_zero else CODEBOOK_SIZE
        if nonzero.any() and float(np.abs(wide).max()) > FP16_MAX:
            raise ValueError(f"an int4 codebook (fp16) cannot hold {float(np.abs(wide).max()):.4g}")
        centroids = kmeans_1d(wide[nonzero], levels) if nonzero.any() else np.zeros(0)
        book = np.unique(centroids.astype(np.float16))
        code = np.zeros(wide.size, dtype=np.int64)
        # nonzeros take the nearest entry made from nonzeros; only zeros take the appended 0.0
        if book.size:
            code[nonzero] = assign_nearest(wide[nonzero], book.astype(np.float64))
        if has_zero or book.size == 0:
            code[~nonzero] = book.size
            book = np.append(book, np.float16(0.0))
        codes.append(code)
        books.append(book)
        sizes.append(book.size)
    flat = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
    padded = np.zeros(flat.size + (flat.size & 1), dtype=np.uint8)
    padded[: flat.size] = flat
    half = padded.size // 2
    packed = (padded[:half] | (padded[half:] << 4)).astype(np.uint8)
    return packed, np.concatenate(books).astype(np.float16), np.array(sizes, dtype=np.int64)


def check_values(
    kind: str,
    values: np.ndarray,
    shapes: tuple[tuple[int, ...], ...],
    entries: np.ndarray,
    *,
    scale: np.ndarray | None,
    scale_rows: np.ndarray | None,
    codebook: np.ndarray | None,
    codebook_sizes: np.ndarray | None,
) -> None:
    """Raise ValueError naming the first broken invariant of the stored values of `kind` for
    `entries[t]` entries of each tensor of `shapes`, and of their side arrays."""
    count = int(entries.sum())
    expected = np.dtype(VALUE_DTYPE[kind])
    size = (count + 1) // 2 if kind == "int4" else count
    if values.dtype != expected or values.shape != (size,):
        raise ValueError(
            f"{kind} values must be {expected} of {size} entries, "
            f"got {values.dtype} of {values.size}"
        )
    k = len(shapes)
    want_scale = kind == "int8"
    if want_scale != (scale is not None) or want_scale != (scale_rows is not None):
        raise ValueError(f"scales must be present exactly for int8 values ({kind})")
    if scale is not None and scale_rows is not None:
        allowed = [{1, s[0] if len(s) >= 2 else 1} for s in shapes]  # per tensor or per row
        if scale_rows.shape != (k,) or any(
            int(r) not in a for r, a in zip(scale_rows, allowed, strict=True)
        ):
            raise ValueError("scale_rows must give 1 or dim 0 scales per tensor")
        if scale.dtype != np.float16 or scale.shape != (int(scale_rows.sum()),):
            raise ValueError(f"int8 scales must be float16 [{int(scale_rows.sum())}]")
    want_codebook = kind == "int4"
    if want_codebook != (codebook is not None) or want_codebook != (codebook_sizes is not None):
        raise ValueError(f"codebooks must be present exactly for int4 values ({kind})")
    if codebook is not None and codebook_sizes is not None:
        sizes = codebook_sizes
        if sizes.shape != (k,) or (sizes < 1).any() or (sizes > CODEBOOK_SIZE).any():
            raise ValueError(f"codebook sizes must lie in [1, {CODEBOOK_SIZE}]")
        if codebook.dtype != np.float16 or codebook.shape != (int(sizes.sum()),):
            raise ValueError(f"int4 codebooks must be float16 [{int(sizes.sum())}]")
        codes = int4_codes(values, count)
        limit = np.repeat(sizes, entries)
        if (codes >= limit).any():
            raise ValueError("an int4 code points past its tensor's codebook")
        if count & 1 and values[-1] >> 4:
            raise ValueError("int4 padding nibble of the last byte must be zero")
