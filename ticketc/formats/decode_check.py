"""Decoded weights checked against what their value type promises: each element within the
quantiser's own bound (fp types: half a unit in the last place; int8: half a scale step; int4:
the distance to the nearest other codebook entry's midpoint), so a wrong weight fails even when
the model's output error looks small."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ticketc.formats.compact import Compact
from ticketc.formats.compact_values import FLOAT_KINDS, VALUE_DTYPE
from ticketc.formats.quantize import assign_nearest

__all__ = ["DecodeCheck", "check_decoded"]


# Relative rounding of a float type: half a unit in the last place.
_UNIT_ROUNDOFF = {
    np.dtype(np.float64): 2.0**-53,
    np.dtype(np.float32): 2.0**-24,
    np.dtype(ml_dtypes.bfloat16): 2.0**-8,
    np.dtype(np.float16): 2.0**-11,
}


@dataclass(frozen=True)
class DecodeCheck:
    """How one decoded tensor compares with the tensor it encodes."""

    max_abs_error: float  # max |decoded - original|
    within_bound: bool  # every element within the quantiser's own bound
    worst: int  # flat index of the element furthest past (or closest to) its bound
    flushed: int = 0  # nonzero elements that decode to 0 (below the value type's resolution)


def check_decoded(
    compact: Compact, originals: Sequence[np.ndarray], decoded: Sequence[np.ndarray]
) -> list[DecodeCheck]:
    """Check decoded tensors against the originals, within what the value kind promises.

    `originals[t]` and `decoded[t]` are tensor t in the graph's own dtype (decoded after the
    decoder's final cast to it). Zeros must decode to exactly 0. fp kinds must give exactly the
    original rounded to the kind (fp16: to nearest; the exact kinds: the original itself). int8
    must be within half the entry's scale, int4 no further than the nearest codebook entry,
    each plus the rounding of the final cast to the graph's dtype.
    """
    results = []
    tensor_of = compact.tensor_of_entries()
    index = compact.linear_indices() - compact.offsets[tensor_of]
    entry_bound = _entry_bounds(compact, originals, tensor_of, index)
    for t, (original, got) in enumerate(zip(originals, decoded, strict=True)):
        w = np.asarray(original).reshape(-1)
        y = np.asarray(got).reshape(-1)
        if w.shape != y.shape:
            raise ValueError(f"tensor {t}: decoded {y.shape} elements, expected {w.shape}")
        w64, y64 = w.astype(np.float64), y.astype(np.float64)
        with np.errstate(invalid="ignore"):  # inf - inf: equal infinities are no error
            error = np.abs(y64 - w64)
        error[(np.isnan(w64) & np.isnan(y64)) | (y64 == w64)] = 0.0
        if compact.values_kind in FLOAT_KINDS:
            expected = w.astype(VALUE_DTYPE[compact.values_kind]).astype(w.dtype).astype(np.float64)
            excess = np.where(
                (y64 == expected) | (np.isnan(y64) & np.isnan(expected)), -1.0, np.inf
            )
        else:
            bound = np.zeros(w.size)  # elements that are not entries must decode to 0
            mine = tensor_of == t
            bound[index[mine]] = entry_bound[mine]
            bound += np.abs(y64) * _UNIT_ROUNDOFF.get(np.dtype(w.dtype), 0.0)
            excess = error - bound
            excess[np.isnan(error)] = np.inf
        worst = int(np.argmax(excess)) if excess.size else 0
        within = not excess.size or bool(excess[worst] <= 0)
        flushed = int(np.count_nonzero((w64 != 0) & (y64 == 0)))
        max_error = float(np.nanmax(error)) if error.size else 0.0
        results.append(DecodeCheck(max_error, within, worst, flushed))
    return results


def _entry_bounds(
    compact: Compact, originals: Sequence[np.ndarray], tensor_of: np.ndarray, index: np.ndarray
) -> np.ndarray:
    """The quantiser's own error bound of every entry (float64 [m]); 0 for float kinds."""
    m = index.size
    if compact.values_kind in FLOAT_KINDS:
        return np.zeros(m)
    flat = [np.asarray(o).reshape(-1).astype(np.float64) for o in originals]
    source = np.empty(m)
    for t, w in enumerate(flat):
        mine = tensor_of == t
        source[mine] = w[index[mine]]
    # the decoder's product code * scale (or the codebook entry) is rounded to float32 once
    product_roundoff = 2.0**-24 * np.abs(source) * 2
    if compact.values_kind == "int8":
        assert compact.scale is not None and compact.scale_rows is not None
        row_length = compact.numel // np.maximum(compact.scale_rows, 1)
        first_scale = np.concatenate([[0], np.cumsum(compact.scale_rows)[:-1]])
        row = first_scale[tensor_of] + index // np.maximum(row_length[tensor_of], 1)
        return compact.scale.astype(np.float64)[row] / 2 + product_roundoff
    assert compact.codebook is not None and compact.codebook_sizes is not None
    bound = np.empty(m)
    first = np.concatenate([[0], np.cumsum(compact.codebook_sizes)[:-1]])
    for t in range(len(compact.shapes)):
        mine = tensor_of == t
        book = compact.codebook[first[t] : first[t] + compact.codebook_sizes[t]].astype(np.float64)
        x = source[mine]
        nonzero_book = book[book != 0] if (x == 0).any() and (book == 0).any() else book
        if nonzero_book.size == 0:
            nonzero_book = book
        nearest = nonzero_book[assign_nearest(x, nonzero_book)]
        bound[mine] = np.where(x == 0, 0.0, np.abs(nearest - x))
    return bound + product_roundoff
