"""Which initializers to store compactly, in which codec, and in which decode group.

The exporter hands every float initializer of the graph, as the graph holds it, to
`plan_storage`. Each tensor gets the storage that costs the fewest bytes among those its value
type allows: kept as it is, an all-zero constant, or a `Compact` codec (positions: rice /
bitmask / dense; values: the requested type). Tensors that share a codec are then pooled
into decode groups (`ticketc.export.grouping`), since each distinct decoder costs ~1 KB in
the file and each group ~30 nodes that onnxruntime folds at session creation: a codec or a
Rice parameter that saves fewer bytes than that is merged into a neighbour. A tensor that
stores best with "dense" positions (a bias, a mostly dense stem conv) joins a rice or bitmask
group of its values as part of its dense tail: no positions and no decoder of its own.

Value types ("values" of the export):
- "fp32": lossless. Each tensor keeps its exact values, in the narrowest float type that holds
  them all (an fp32 tensor of bf16 numbers stores bf16; an fp16 model stores fp16).
- "fp16": rounded to fp16 (exact for 16-bit tensors; a tensor beyond fp16's range stays exact).
- "int8": symmetric int8 with per-row or per-tensor scales.
- "int4": a 16-entry k-means codebook per tensor, or int8 where the codebook would cost more.
The integer types quantize weights only: a vector-like tensor (a bias, a norm's scale and
shift, folded or running BatchNorm statistics, an LSTM's packed biases: at most two elements
per entry of its longest axis) keeps its exact values, as quantizers in the field do. Its few
bytes decide much of the output (a running variance off by half is off by half in every
output of its channel).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ticketc.export.decoder import ONNX_TYPE
from ticketc.export.grouping import (
    TENSOR_COST,
    Option,
    float_kind,
    merge_codecs_,
    merge_rice_k_,
    pool,
)
from ticketc.export.portable import Group
from ticketc.formats import rice
from ticketc.formats.compact import Compact
from ticketc.formats.compact_positions import mask_entropy_bits
from ticketc.formats.compact_values import (
    CODEBOOK_SIZE,
    VALUE_BITS,
    VALUE_DTYPE,
    int8_scale_count,
)
from ticketc.formats.quantize import FP16_MAX, is_vector_like

__all__ = ["VALUES", "StoragePlan", "TensorStorage", "plan_storage"]

VALUES = ("fp32", "fp16", "int8", "int4")
POSITIONS = ("auto", "rice", "bitmask", "dense")
ZERO_COST = 30  # an all-zero tensor as ConstantOfShape
# fp16's smallest normal value: below it fp16 values (and int4 codebooks, stored in fp16) lose
# precision, down to 0 below 6e-8, so a tensor smaller than that keeps its exact values
FP16_TINY = 2.0**-14
# Smallest int8 scale (stored in fp16, rounded up): fp16's spacing there (2^-24) makes the
# scale, and so the step between codes, at most 1/16 coarser than the row needs
INT8_SMALLEST_SCALE = 2.0**-20


@dataclass(frozen=True)
class TensorStorage:
    """What was decided for one initializer."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # its float kind in the graph: "fp32", "fp16", ...
    nnz: int
    form: str  # "compact" | "zeros" | "kept"
    codec: str  # "rice+int4", "dense+fp16", "zeros", "fp32" (kept as is), ...
    nbytes: float  # its share of the file's stored arrays
    bound_bits: float  # numel * H(density) + nnz * value bits of the export's value type

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0


@dataclass
class StoragePlan:
    groups: list[Group] = field(default_factory=list)
    zeros: list[tuple[str, int]] = field(default_factory=list)  # (name, ONNX type)
    tensors: list[TensorStorage] = field(default_factory=list)  # every float initializer
    notes: list[str] = field(default_factory=list)


def plan_storage(
    arrays: Mapping[str, np.ndarray], values: str = "fp32", positions: str = "auto"
) -> StoragePlan:
    """Decide the storage of every float initializer (name -> array in the graph's dtype).

    Returns the decode groups (their `Compact` encodings built), the all-zero tensors and one
    `TensorStorage` per tensor, kept ones included. Non-float and 0-d arrays are not listed.
    Raises ValueError on an unknown `values` or `positions`.
    """
    if values not in VALUES:
        raise ValueError(f"values {values!r} is not one of {', '.join(VALUES)}")
    if positions not in POSITIONS:
        raise ValueError(f"positions {positions!r} is not one of {', '.join(POSITIONS)}")
    plan = StoragePlan()
    chosen: dict[str, Option] = {}
    options: dict[str, list[Option]] = {}
    floats = {n: a for n, a in arrays.items() if float_kind(a) is not None and a.ndim >= 1}
    info: dict[str, tuple[int, np.ndarray]] = {}
    for name, array in floats.items():
        flat = array.reshape(-1)
        index = np.flatnonzero(flat != 0)
        info[name] = (index.size, index)
        raw = array.nbytes
        if index.size == 0 and array.size:
            if raw > ZERO_COST:
                plan.zeros.append((name, ONNX_TYPE[float_kind(array) or "fp32"]))
            continue
        candidates, notes = _options(name, array, index, values, positions)
        plan.notes += notes
        best = min(candidates, key=lambda o: o.nbytes, default=None)
        if best is None or best.nbytes + TENSOR_COST >= raw:
            continue  # kept as the graph holds it: exact, and no larger
        options[name] = candidates
        chosen[name] = best
    merge_codecs_(chosen, options, {n: a.nbytes for n, a in floats.items()})
    merge_rice_k_(chosen, options, floats)
    zero_names = {n for n, _ in plan.zeros}
    for key, names, tail in pool(chosen, floats):
        positions_kind, values_kind, out_kind, k = key
        compact = Compact.from_dense(
            [floats[n] for n in names],
            values_kind,
            positions_kind,
            rice_k=k or None,
            dense_tail=tail,
        )
        plan.groups.append(Group(tuple(names), compact, out_kind))
        shares = compact.nbytes_per_tensor()
        nnz = compact.nnz()
        for t, name in enumerate(names):
            plan.tensors.append(
                tensor_record(
                    name,
                    floats[name],
                    int(nnz[t]),
                    "compact",
                    f"{'dense' if t >= len(names) - tail else positions_kind}+{values_kind}",
                    float(shares[t]),
                    values,
                )
            )
    for name, array in floats.items():
        if name in chosen:
            continue
        count = info[name][0]
        if name in zero_names:
            plan.tensors.append(tensor_record(name, array, 0, "zeros", "zeros", 0.0, values))
        else:
            kind = float_kind(array) or "fp32"
            plan.tensors.append(
                tensor_record(name, array, count, "kept", kind, array.nbytes, values)
            )
    return plan


def tensor_record(
    name: str, array: np.ndarray, nnz: int, form: str, codec: str, nbytes: float, values: str
) -> TensorStorage:
    kind = float_kind(array) or "fp32"
    quantized = values != "fp32" and not (
        values in ("int8", "int4") and is_vector_like(array.shape)
    )
    bits = min(VALUE_BITS[values] if quantized else VALUE_BITS[kind], VALUE_BITS[kind])
    bound = mask_entropy_bits(array.size, nnz) + nnz * bits
    return TensorStorage(name, tuple(array.shape), kind, nnz, form, codec, nbytes, bound)


def is_float(array: np.ndarray) -> bool:
    """Whether the codec can store this array (fp64, fp32, bf16 or fp16)."""
    return float_kind(array) is not None


def exact_kind(array: np.ndarray) -> str:
    """The narrowest float kind that holds every value of `array` exactly."""
    own = float_kind(array)
    assert own is not None
    for kind in ("fp16", "bf16", "fp32", "fp64"):
        if VALUE_BITS[kind] >= VALUE_BITS[own]:
            return own
        with np.errstate(over="ignore"):  # a value beyond the kind's range is simply not exact
            narrowed = array.astype(VALUE_DTYPE[kind])
        if np.array_equal(narrowed.astype(array.dtype), array, equal_nan=True):
            return kind
    return own


def _value_kinds(
    array: np.ndarray, nonzero: np.ndarray, values: str
) -> tuple[list[str], list[str]]:
    """The value kinds this tensor may take for the export's value type, and notes."""
    exact = exact_kind(array)
    largest = float(np.abs(nonzero.astype(np.float64)).max()) if nonzero.size else 0.0
    if values == "fp32" or VALUE_BITS[exact] <= VALUE_BITS.get(values, 0):
        return [exact], []
    if values in ("int8", "int4") and is_vector_like(array.shape):
        return [exact], []
    if values == "fp16":
        if largest > FP16_MAX:
            return [exact], [f"values beyond fp16's range ({largest:.4g}): stored exactly"]
        if largest < FP16_TINY:
            return [exact], [f"values below fp16's normal range ({largest:.4g}): stored exactly"]
        return ["fp16"], []
    kinds = []
    smallest_row = _smallest_row_max(array)
    if largest / 127 <= FP16_MAX and smallest_row / 127 >= INT8_SMALLEST_SCALE:
        kinds.append("int8")
    if values == "int4" and FP16_TINY <= largest <= FP16_MAX:
        kinds.append("int4")
    if not kinds:
        beyond = largest / 127 > FP16_MAX
        what = f"beyond an fp16 scale ({largest:.4g})" if beyond else "too small for fp16 scales"
        if not beyond:
            what += f" (largest {largest:.4g}, smallest row {smallest_row:.4g})"
        return [exact], [f"values {what}: stored exactly"]
    return kinds, []


def _smallest_row_max(array: np.ndarray) -> float:
    """The smallest max |value| over the rows (dim 0) that hold a nonzero: what the smallest
    int8 scale of the tensor is made from (the whole tensor's for a vector)."""
    rows = np.abs(array.reshape(array.shape[0] if array.ndim >= 2 else 1, -1)).max(axis=1)
    rows = rows[rows > 0].astype(np.float64)
    return float(rows.min()) if rows.size else 0.0


def _options(
    name: str, array: np.ndarray, index: np.ndarray, values: str, positions: str
) -> tuple[list[Option], list[str]]:
    flat = array.reshape(-1)
    nonzero = flat[index]
    kinds, notes = _value_kinds(array, nonzero, values)
    notes = [f"{name}: {note}" for note in notes]
    n, m = flat.size, index.size
    allowed = ("rice", "bitmask", "dense") if positions == "auto" else (positions,)
    gaps = np.diff(index, prepend=-1)
    out = []
    for kind in kinds:
        for p in allowed:
            entries = n if p == "dense" else m
            side = _side_bytes(kind, array, entries, dense_zeros=p == "dense" and m < n)
            value_bytes = (entries * VALUE_BITS[kind] + 7) // 8 + side
            if p == "rice":
                for k in range(1, rice.MAX_K + 1):
                    out.append(Option(p, kind, k, rice.nbytes(gaps, k) + value_bytes))
            elif p == "bitmask":
                out.append(Option(p, kind, 0, (n + 7) // 8 + value_bytes))
            else:
                out.append(Option(p, kind, 0, value_bytes))
    return out, notes


def _side_bytes(kind: str, array: np.ndarray, entries: int, dense_zeros: bool) -> int:
    if kind == "int8":
        rows = array.shape[0] if array.ndim >= 2 else 1
        by_row = np.abs(array.reshape(rows, -1)).max(1) if array.size else np.zeros(rows)
        scales = int8_scale_count(array.shape, entries, by_row.astype(np.float64))
        return 2 * scales + 8  # + the scale-rows table entry
    if kind == "int4":
        return 2 * min(CODEBOOK_SIZE, entries + dense_zeros) + 8
    return 0
