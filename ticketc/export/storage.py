"""Which initializers to store compactly, in which codec, and in which decode group.

The exporter hands every float initializer of the graph, as the graph holds it, to
`plan_storage`. Each tensor gets the storage that costs the fewest bytes among those its value
type allows: kept as it is, an all-zero constant, or a `Compact` codec (positions: rice /
bitmask / dense; values: the requested type). Tensors that share a codec are then pooled into
decode groups, since each distinct decoder costs ~1 KB of function body in the file and each
group ~30 nodes that onnxruntime folds at session creation: a codec or a Rice parameter that
saves fewer bytes than that is merged into a neighbour. A tensor that stores best with "dense"
positions (a bias, a mostly dense stem conv) joins a rice or bitmask group of its values as
part of its dense tail: no positions and no decoder of its own.

Value types ("values" of the export):
- "fp32": lossless. Each tensor keeps its exact values, in the narrowest float type that holds
  them all (an fp32 tensor of bf16 numbers stores bf16; an fp16 model stores fp16).
- "fp16": rounded to fp16 (exact for 16-bit tensors; a tensor beyond fp16's range stays exact).
- "int8": symmetric int8 with per-row or per-tensor scales.
- "int4": a 16-entry k-means codebook per tensor, or int8 where the codebook would cost more.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ticketc.export.decoder import ONNX_TYPE, decoder_nbytes
from ticketc.export.portable import Group
from ticketc.formats import rice
from ticketc.formats.compact import (
    CODEBOOK_SIZE,
    INT8_ENTRIES_PER_ROW_SCALE,
    VALUE_BITS,
    VALUE_DTYPE,
    Compact,
    value_kind_of,
)
from ticketc.formats.quantize import FP16_MAX

__all__ = ["VALUES", "StoragePlan", "TensorStorage", "plan_storage"]

VALUES = ("fp32", "fp16", "int8", "int4")
POSITIONS = ("auto", "rice", "bitmask", "dense")

# Bytes a stored form costs beyond its arrays, as measured in written files:
TENSOR_COST = 40  # per tensor in a group: its Reshape node and its rows of the group's tables
# per group beyond its decoder's bytes: ~30 nodes that onnxruntime folds at session creation
# (~15 us each), weighed as bytes so that a group must save at least this much to exist
GROUP_COST = 400
ZERO_COST = 30  # an all-zero tensor as ConstantOfShape
TAIL_COST = 120  # a dense tail in a group: its Range and Concat nodes and their constants
TAIL_HOSTS = ("rice", "bitmask")  # positions kinds whose groups take a dense tail
# Most elements in one group: a group decodes to one flat tensor at session creation, and int64
# index temporaries of ~8 B per entry; this bounds that transient memory to ~2 GB.
MAX_GROUP_NUMEL = 2**27
# A tensor this large decodes in a group of its own where its stored bytes dwarf a decoder's
# (ALONE_PAYLOAD x its cost): a group with one tensor needs no Split, which would copy every
# element once more when onnxruntime folds the decode.
ALONE_NUMEL = 2**18
ALONE_PAYLOAD = 20


@dataclass(frozen=True)
class Option:
    """One way to store one tensor: its codec and the bytes it costs there."""

    positions: str
    values: str
    rice_k: int  # 0 unless positions == "rice"
    nbytes: int


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
    floats = {n: a for n, a in arrays.items() if _float_kind(a) is not None and a.ndim >= 1}
    info: dict[str, tuple[int, np.ndarray]] = {}
    for name, array in floats.items():
        flat = array.reshape(-1)
        index = np.flatnonzero(flat != 0)
        info[name] = (index.size, index)
        raw = array.nbytes
        if index.size == 0 and array.size:
            if raw > ZERO_COST:
                plan.zeros.append((name, ONNX_TYPE[_float_kind(array) or "fp32"]))
            continue
        candidates, notes = _options(name, array, index, values, positions)
        plan.notes += notes
        best = min(candidates, key=lambda o: o.nbytes, default=None)
        if best is None or best.nbytes + TENSOR_COST >= raw:
            continue  # kept as the graph holds it: exact, and no larger
        options[name] = candidates
        chosen[name] = best
    _merge_codecs_(chosen, options, {n: a.nbytes for n, a in floats.items()})
    _merge_rice_k_(chosen, options, floats)
    zero_names = {n for n, _ in plan.zeros}
    for key, names, tail in _groups(chosen, floats):
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
            kind = _float_kind(array) or "fp32"
            plan.tensors.append(
                tensor_record(name, array, count, "kept", kind, array.nbytes, values)
            )
    return plan


def tensor_record(
    name: str, array: np.ndarray, nnz: int, form: str, codec: str, nbytes: float, values: str
) -> TensorStorage:
    from ticketc.formats.compact import mask_entropy_bits

    kind = _float_kind(array) or "fp32"
    bits = VALUE_BITS[values] if values != "fp32" else VALUE_BITS[kind]
    bits = min(bits, VALUE_BITS[kind])
    bound = mask_entropy_bits(array.size, nnz) + nnz * bits
    return TensorStorage(name, tuple(array.shape), kind, nnz, form, codec, nbytes, bound)


def is_float(array: np.ndarray) -> bool:
    """Whether the codec can store this array (fp64, fp32, bf16 or fp16)."""
    return _float_kind(array) is not None


def _float_kind(array: np.ndarray) -> str | None:
    try:
        return value_kind_of(array.dtype)
    except ValueError:
        return None


def exact_kind(array: np.ndarray) -> str:
    """The narrowest float kind that holds every value of `array` exactly."""
    own = _float_kind(array)
    assert own is not None
    for kind in ("fp16", "bf16", "fp32", "fp64"):
        if VALUE_BITS[kind] >= VALUE_BITS[own]:
            return own
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
    if values == "fp16":
        if largest > FP16_MAX:
            return [exact], [f"values beyond fp16's range ({largest:.4g}): stored exactly"]
        return ["fp16"], []
    kinds = []
    if largest / 127 <= FP16_MAX:
        kinds.append("int8")
    if values == "int4" and largest <= FP16_MAX:
        kinds.append("int4")
    if not kinds:
        return [exact], [f"values beyond an fp16 scale ({largest:.4g}): stored exactly"]
    return kinds, []


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
            side = _side_bytes(kind, array.shape, entries, dense_zeros=p == "dense" and m < n)
            value_bytes = (entries * VALUE_BITS[kind] + 7) // 8 + side
            if p == "rice":
                for k in range(1, rice.MAX_K + 1):
                    out.append(Option(p, kind, k, rice.nbytes(gaps, k) + value_bytes))
            elif p == "bitmask":
                out.append(Option(p, kind, 0, (n + 7) // 8 + value_bytes))
            else:
                out.append(Option(p, kind, 0, value_bytes))
    return out, notes


def _side_bytes(kind: str, shape: tuple[int, ...], entries: int, dense_zeros: bool) -> int:
    if kind == "int8":
        rows = shape[0] if len(shape) >= 2 else 1
        per_row = rows > 1 and entries >= INT8_ENTRIES_PER_ROW_SCALE * rows
        return 2 * (rows if per_row else 1) + 8  # + the scale-rows table entry
    if kind == "int4":
        return 2 * min(CODEBOOK_SIZE, entries + dense_zeros) + 8
    return 0


@functools.lru_cache(maxsize=64)
def _group_cost(positions_kind: str, values_kind: str) -> int:
    """Bytes-equivalent of one more decode group: its decoder's nodes, plus GROUP_COST for
    the session time its ~30 nodes take to fold."""
    return decoder_nbytes(positions_kind, values_kind) + GROUP_COST


def _merge_codecs_(
    chosen: dict[str, Option], options: dict[str, list[Option]], raw: Mapping[str, int]
) -> None:
    """Drop a codec (decoder function) when moving its tensors elsewhere costs less than it:
    to another codec in use, or back to the graph as they are (`raw`: their bytes there), so
    a codec that saves fewer bytes than its decoder costs is not written beside another (a
    last codec left stays: whether a lone group pays for its decoder is not weighed here)."""
    while True:
        used = {(o.positions, o.values) for o in chosen.values()}
        if len(used) <= 1:
            return
        # the codecs with their Rice k as chosen: a dense tensor moved into a rice group pays
        # that group's k, not its own best (k = 1 for a dense run), once the ks are merged
        coded = {(o.positions, o.values, o.rice_k) for o in chosen.values()}
        best_move: tuple[int, dict[str, Option | None]] | None = None
        for codec in used:
            others = used - {codec}
            hosted = _host(codec, used)
            moved: dict[str, Option | None] = {}  # None: kept as the graph holds it
            extra = 0
            for name, option in chosen.items():
                if (option.positions, option.values) != codec:
                    continue
                alternatives = [
                    o
                    for o in options[name]
                    if (o.positions, o.values) in others
                    and (not hosted or (o.positions, o.values, o.rice_k) in coded)
                ]
                alt = min(alternatives, key=lambda o: o.nbytes, default=None)
                kept = raw[name] - TENSOR_COST  # a kept tensor has no Reshape or table rows
                if alt is None or kept <= alt.nbytes:
                    moved[name], extra = None, extra + kept - option.nbytes
                else:
                    moved[name], extra = alt, extra + alt.nbytes - option.nbytes
            # kind cost in the default out type is close enough for a decision; dense
            # tensors beside a host codec ride in its dense tail and cost no group
            saving = TAIL_COST if hosted else _group_cost(*codec)
            if extra < saving and (best_move is None or extra - saving < best_move[0]):
                best_move = (extra - saving, moved)
        if best_move is None:
            return
        for name, alt in best_move[1].items():
            if alt is None:
                del chosen[name]
            else:
                chosen[name] = alt


def _host(codec: tuple[str, str], used: set[tuple[str, str]]) -> bool:
    """Whether a dense codec's tensors have a group in `used` to join as a dense tail."""
    positions_kind, values_kind = codec
    return positions_kind == "dense" and any((p, values_kind) in used for p in TAIL_HOSTS)


def _merge_rice_k_(
    chosen: dict[str, Option], options: dict[str, list[Option]], arrays: Mapping[str, np.ndarray]
) -> None:
    """Give tensors of one rice codec a common k where a separate group would cost more."""
    by_codec: dict[tuple[str, str, str], list[str]] = {}
    for name, option in chosen.items():
        if option.positions == "rice":
            kind = _float_kind(arrays[name]) or "fp32"
            by_codec.setdefault((option.values, kind, ""), []).append(name)
    for names in by_codec.values():
        values_kind = chosen[names[0]].values

        def cost(k: int, members: list[str], v: str = values_kind) -> int:
            return sum(
                next(
                    o.nbytes
                    for o in options[n]
                    if o.positions == "rice" and o.values == v and o.rice_k == k
                )
                for n in members
            )

        clusters = sorted(
            (
                {
                    chosen[n].rice_k: [m for m in names if chosen[m].rice_k == chosen[n].rice_k]
                    for n in names
                }
            ).items()
        )
        merged = True
        while merged and len(clusters) > 1:
            merged = False
            best = None
            for i in range(len(clusters) - 1):
                (ka, a), (kb, b) = clusters[i], clusters[i + 1]
                both = a + b
                k = min(range(1, rice.MAX_K + 1), key=lambda k: cost(k, both))
                extra = cost(k, both) - cost(ka, a) - cost(kb, b)
                if extra < _group_cost("rice", values_kind) and (best is None or extra < best[0]):
                    best = (extra, i, k, both)
            if best is not None:
                _, i, k, both = best
                clusters[i : i + 2] = [(k, both)]
                merged = True
        for k, members in clusters:
            for n in members:
                chosen[n] = next(
                    o
                    for o in options[n]
                    if o.positions == "rice" and o.values == values_kind and o.rice_k == k
                )


def _groups(
    chosen: Mapping[str, Option], arrays: Mapping[str, np.ndarray]
) -> list[tuple[tuple[str, str, str, int], list[str], int]]:
    """Tensors pooled by codec, output type and Rice k, split where a group grows too large;
    then each dense tensor appended, as part of its dense tail, to the smallest group of its
    values and output type with positions (TAIL_HOSTS) that has room, or pooled in
    dense groups where none has. Each item: (key, names, how many of the last are the tail)."""
    pooled: dict[tuple[str, str, str, int], list[str]] = {}
    for name, option in chosen.items():
        kind = _float_kind(arrays[name]) or "fp32"
        pooled.setdefault((option.positions, option.values, kind, option.rice_k), []).append(name)
    out: list[tuple[tuple[str, str, str, int], list[str], int]] = []
    for key, names in pooled.items():
        if key[0] != "dense":
            out += [(key, part, 0) for part in _split(key, names, chosen, arrays)]
    for key, names in pooled.items():
        if key[0] != "dense":
            continue
        hosts = [
            i for i, (k, _, _) in enumerate(out) if k[0] in TAIL_HOSTS and k[1:3] == key[1:3]
        ]
        size = {i: sum(arrays[n].size for n in out[i][1]) for i in hosts}
        rest: list[str] = []
        for name in names:
            fits = [i for i in hosts if size[i] + arrays[name].size <= MAX_GROUP_NUMEL]
            if not fits:
                rest.append(name)
                continue
            i = min(fits, key=size.__getitem__)
            host_key, members, tail = out[i]
            out[i] = (host_key, [*members, name], tail + 1)
            size[i] += arrays[name].size
        out += [(key, part, 0) for part in _split(key, rest, chosen, arrays)]
    return out


def _split(
    key: tuple[str, str, str, int],
    names: list[str],
    chosen: Mapping[str, Option],
    arrays: Mapping[str, np.ndarray],
) -> list[list[str]]:
    """One codec's tensors in groups: a large tensor whose bytes dwarf a decoder's alone, the
    rest in order, up to MAX_GROUP_NUMEL elements each."""
    cost = _group_cost(key[0], key[1])
    alone = [
        n
        for n in names
        if arrays[n].size >= ALONE_NUMEL and chosen[n].nbytes >= ALONE_PAYLOAD * cost
    ]
    parts = [[n] for n in alone]
    part: list[str] = []
    size = 0
    for name in (n for n in names if n not in alone):
        if part and size + arrays[name].size > MAX_GROUP_NUMEL:
            parts.append(part)
            part, size = [], 0
        part.append(name)
        size += arrays[name].size
    return parts + ([part] if part else [])
