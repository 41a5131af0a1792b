"""The in-graph decoder of a portable file: standard-op nodes that rebuild a group's tensors
from its stored arrays (`ticketc.export.portable` writes them into the graph).

One decoder per group, not per tensor, and nodes inlined in the graph (no FunctionProto,
constants as initializers) keep session creation close to the dense file's: onnxruntime
constant-folds the decode when it creates the session, at ~15 us per node on top of the work
itself, and the work is mostly the bytes of the intermediate tensors (each folded node's
output is copied), so the decoder keeps them few and int32.

Decode recipe (index arithmetic in int32: a group never reaches 2^31 elements):
  bits(x):  Gather(LUT[256, 8], x): the little-endian bits of every byte
  ones(b):  the indices of the set bits of b in order (optionally scaled and offset: a
            Range's start and step, no extra pass): every bit is scattered to slot
            "set bits before it" (exclusive CumSum), reduction="max" keeping the set bit's
            position over the clear bits before it (opset >= 18; before: set bits to their
            rank, clear bits to their own slots after the set ones, a permutation)
  rice:     z' = 2^k * ones(bits(p)) + (2^k - 1) (the unary terminators),
            r = Einsum(w, bits(planes)), idx = z' + CumSum(r - (2^k - 1))
            (see ticketc.formats.rice)
  bitmask:  every element gathers [0, values...][CumSum(bits) * bits] (int8: idx = ones(bits));
            float values are stored with their leading 0
  dense:    every element is an entry
  tail:     a group's dense tail (its last tensors, every element an entry, no positions
            stored) appends Range(head elements, N) to idx, or when gathering, the tail's
            entries + 1 to the head's ranks (the bitmask's padding sliced off)
  values:   fp kinds Cast | int8 codes * scale[row of entry] | int4 codebook[tensor][code],
            the tensor of an entry being CumSum of a mark at each tensor's first entry (int4,
            opset >= 16: its codebook's start directly, the starts' steps scatter-added there)
  output:   ScatterElements(zeros[N], idx, values) (or the gather), Cast to the graph's type
Lookups into a 1-D table (values, scales, codebooks) are GatherElements, not Gather: onnxruntime's
Gather copies element by element (14.6 ms for 3.4 M fp32 entries, GatherElements 1.9 ms), and a
folded decode's time is mostly such passes over every element (bert-small at 50 %: session
creation 5.65x -> 4.55x the dense file's, one process). NonZero, Compress and TopK are
avoided on purpose: onnxruntime does not constant-fold the first two (data-dependent shapes),
and TopK is 10x slower than the scatter on large streams.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ticketc.formats.compact import Compact
from ticketc.formats.compact_values import FLOAT_KINDS

__all__ = [
    "BLOCK_NUMEL",
    "ONNX_TYPE",
    "DecoderGraph",
    "add_decoder",
    "array_names",
    "decode_blocks",
    "decoder_nbytes",
    "decodes_by_gather",
    "gathers_stored_values",
    "group_arrays",
    "splits_flat",
    "work_kind",
    "zero_of",
]

# Most elements a group scatters into one flat tensor. onnxruntime folds every node into a new
# tensor at session creation, and a flat tensor of millions of elements costs ~10 ms per node
# that copies it (the scatter, the Split, each Reshape) on top of its work, where blocks of up
# to 2^18 elements cost a third of that (bert-mini's shape, 3 M elements: 30 ms -> 13 ms).
BLOCK_NUMEL = 2**18

# ONNX element type of each float value kind, and back
ONNX_TYPE = {
    "fp64": TensorProto.DOUBLE,
    "fp32": TensorProto.FLOAT,
    "bf16": TensorProto.BFLOAT16,
    "fp16": TensorProto.FLOAT16,
}

_INDEX = TensorProto.INT32


def work_kind(values_kind: str) -> str:
    """The float kind a group's values are decoded in: fp64 for fp64 values, else fp32."""
    return "fp64" if values_kind == "fp64" else "fp32"


def decodes_by_gather(positions_kind: str, values_kind: str) -> bool:
    """Whether a group decodes by gathering every element from [0, values...] at its rank
    among the set bits: a bitmask's cheapest decode (no compaction, no scatter), for values
    that need no entry positions (all but int8's rows). Its flat output is as long as the
    bitmask's bits: `n` then lists the padding as a last piece, which the Split drops (a
    group of one tensor and no padding is reshaped without a Split)."""
    return positions_kind == "bitmask" and values_kind != "int8"


def gathers_stored_values(positions_kind: str, values_kind: str) -> bool:
    """Whether a group gathers straight from its stored values: a gather decode of float
    values, whose array `v` then holds a 0 before the values, the entry of every zero
    element (stored, not concatenated at session creation: one folded copy of the values
    fewer, regnet_x_400mf at 50 %: 166 -> 126 ms in one process)."""
    return decodes_by_gather(positions_kind, values_kind) and values_kind in FLOAT_KINDS


def array_names(
    positions_kind: str, values_kind: str, tensors: int, numel: bool = True
) -> list[str]:
    """Suffixes of a group's arrays, in order, for its codec and number of tensors; `numel`:
    whether it keeps the table `n` (only a group decoded flat and then split needs it)."""
    names = [] if positions_kind == "dense" else ["p"]
    names += ["r", "w"] if positions_kind == "rice" else []
    names += ["v"]
    names += {"int8": ["s"], "int4": ["c"]}.get(values_kind, [])
    names += ["n"] if numel else []
    if values_kind == "int8":
        names += ["l"] + (["e", "f", "q"] if tensors > 1 else [])
    if values_kind == "int4" and tensors > 1:
        names += ["e", "b"]
    return names


def _starts(counts: np.ndarray) -> np.ndarray:
    """Exclusive prefix sums as int32: where each tensor's part of a stream begins."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)


def group_arrays(c: Compact) -> dict[str, np.ndarray]:
    rows = c.scale_rows if c.scale_rows is not None else np.ones(len(c.shapes), np.int64)
    padded = decodes_by_gather(c.positions_kind, c.values_kind) and not c.dense_tail
    zero_first = gathers_stored_values(c.positions_kind, c.values_kind)
    data: dict[str, np.ndarray | None] = {
        "p": c.positions,
        "r": c.remainders,
        "w": None
        if c.remainders is None
        else (1 << np.arange(c.remainders.shape[0])).astype(np.int32),
        "v": np.concatenate([np.zeros(1, c.values.dtype), c.values]) if zero_first else c.values,
        "s": c.scale,
        "c": c.codebook,
        "n": np.append(c.numel, 8 * c.positions.size - c.total) if padded else c.numel,
        "l": (c.numel // np.maximum(rows, 1)).astype(np.int32),
        "e": _starts(c.entries),
        "f": _starts(c.numel),
        "q": _starts(rows),
        "b": None if c.codebook_sizes is None else _starts(c.codebook_sizes),
    }
    names = array_names(c.positions_kind, c.values_kind, len(c.shapes), splits_flat(c))
    return {k: v for k in names if (v := data[k]) is not None}


# temporaries: letters that are no array suffix (p r w v s c n l e f q b y x)
_LETTERS = "adghijkmotuzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DecoderGraph:
    """Accumulates decoder nodes and shared constants (as initializers) for one file."""

    def __init__(self, base: str, opset: int = 18) -> None:
        self.base = base
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._consts: dict[tuple[Any, ...], str] = {}
        self._lut = ""
        self._prefix = ""
        self._count = 0

    def start(self, prefix: str) -> None:
        self._prefix, self._count = prefix, 0

    def fresh(self) -> str:
        n, self._count = self._count, self._count + 1
        width = len(_LETTERS)
        letters = _LETTERS[n] if n < width else _LETTERS[n // width - 1] + _LETTERS[n % width]
        return self._prefix + letters

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        name = out or self.fresh()
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def const(self, value: int | list[int], dtype: Any = np.int32) -> str:
        """A shared constant initializer, a scalar or 1-D, made once per file."""
        key = (tuple(value) if isinstance(value, list) else value, np.dtype(dtype).str)
        if key not in self._consts:
            name = f"{self.base}k{len(self._consts)}"
            self._consts[key] = name
            self.inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return self._consts[key]

    def bits(self, packed: str, flat: bool = True) -> str:
        """int32 bits of uint8 `packed` [n], little-endian: [8 n]; or, not `flat`, [..., n, 8]
        as gathered (no Reshape, which would copy every bit once more when folded)."""
        if not self._lut:
            prefix, count = self._prefix, self._count
            self.start(self.base + "L")
            byte = self.op("Range", self.const(0), self.const(256), self.const(1))
            column = self.op("Unsqueeze", byte, self.const([-1], np.int64))
            weights = self.const([1 << j for j in range(8)])
            self._lut = self.op("Mod", self.op("Div", column, weights), self.const(2))
            self._prefix, self._count = prefix, count
        bits = self.op("Gather", self._lut, self.op("Cast", packed, to=TensorProto.INT32))
        return self.op("Reshape", bits, self.const([-1], np.int64)) if flat else bits

    def split(self, x: str, sizes: str, count: int) -> list[str]:
        """`x` split along axis 0 into `count` parts of the int64 `sizes`."""
        parts = [self.fresh() for _ in range(count)]
        self.nodes.append(helper.make_node("Split", [x, sizes], parts))
        return parts

    def cumsum(self, x: str) -> str:
        return self.op("CumSum", x, self.const(0))

    def ones(
        self, bits: str, count: int, size: int, start: int = 0, step: int = 1
    ) -> tuple[str, str]:
        """(`start + step * i` for the position i of each set bit of 1-D int32 `bits`, in
        order; their count as int32 [1]).

        `count` set bits among `size`, both known when the file is written: stored as
        constants, not computed at session creation. Needs a clear bit after the last set one
        (Compact pads its streams so)."""
        count_name = self.const([count])
        stop = start + step * size
        positions = self.op("Range", self.const(start), self.const(stop), self.const(step))
        if self.opset >= 18:
            # every bit goes to slot "set bits before it": set bit j to slot j, and the clear
            # bits before it to the same slot, where reduction="max" keeps the set bit's
            # (larger) position; clear bits after the last set one land at slot `count`,
            # never read back. Two passes over the bits, folded at session creation.
            target = self.op("CumSum", bits, self.const(0), exclusive=1)
            scattered = self.op("ScatterElements", positions, target, positions, reduction="max")
        else:
            # set bit -> rank - 1; clear bit -> count + (clear bits before it): a permutation
            rank = self.cumsum(bits)  # set bits up to and including each position
            plain = (start, step) == (0, 1)
            slots = positions if plain else self.op("Range", *map(self.const, (0, size, 1)))
            target = self.op(
                "Where",
                self.op("Cast", bits, to=TensorProto.BOOL),
                self.op("Sub", rank, self.const(1)),
                self.op("Add", count_name, self.op("Sub", slots, rank)),
            )
            scattered = self.op("ScatterElements", positions, target, positions)
        return self.op("Slice", scattered, self.const([0]), count_name), count_name


def decode_blocks(c: Compact) -> list[list[int]]:
    """The tensors (stream order) of each flat block a group scatters into: one block, unless
    the group scatters its entries (positions other than dense, not gathered) and holds more
    than two blocks' worth of elements (below that, one flat tensor folds as fast and saves
    the blocks' nodes: Lenet-300-100's 266 k elements, 3.1 ms whole vs 3.7 ms in two); then
    consecutive tensors up to BLOCK_NUMEL elements each (a larger tensor alone)."""
    tensors = list(range(len(c.shapes)))
    gathered = decodes_by_gather(c.positions_kind, c.values_kind)
    scatters = c.positions_kind != "dense" and not gathered
    if not scatters or c.total <= 2 * BLOCK_NUMEL:
        return [tensors]
    blocks: list[list[int]] = []
    size = 0
    for t, n in enumerate(c.numel.tolist()):
        if not blocks or size + n > BLOCK_NUMEL:
            blocks.append([])
            size = 0
        blocks[-1].append(t)
        size += n
    return blocks


def splits_flat(c: Compact) -> bool:
    """Whether a group is decoded into one flat block and then split into its tensors (its
    table `n` gives the pieces' sizes); a group of several blocks splits each with constants."""
    if len(decode_blocks(c)) > 1:
        return False
    return len(c.shapes) > 1 or _padding(c) > 0


def _padding(c: Compact) -> int:
    """Elements a gather decode computes past the last tensor (the bitmask's last byte's
    spare bits, or a whole zero byte), which a Split drops; 0 for other decodes."""
    if not decodes_by_gather(c.positions_kind, c.values_kind) or c.dense_tail:
        return 0
    return 8 * c.positions.size - c.total


def add_decoder(g: DecoderGraph, prefix: str, c: Compact, out_kind: str, flat: str) -> None:
    """Nodes that compute all of `c`'s tensors, flat and in `out_kind`, into `flat`; a group
    of several blocks (`decode_blocks`) computes block j into `flat` + j instead."""
    a = {k: prefix + k for k in group_arrays(c)}
    g.start(prefix)
    work = ONNX_TYPE[work_kind(c.values_kind)]
    gathered = decodes_by_gather(c.positions_kind, c.values_kind)
    # sizes known when the file is written are constants, not nodes folded at session creation
    entries = int(c.entries.sum())
    coded = int(c.entries[: len(c.shapes) - c.dense_tail].sum())  # entries with positions
    bit_count = 8 * c.positions.size
    index = count = rank = ""
    if c.positions_kind == "rice":
        k = int(c.remainders.shape[0]) if c.remainders is not None else 0
        # 2^k * z + (2^k - 1), z the positions of the unary terminators
        scaled, count = g.ones(g.bits(a["p"]), coded, bit_count, (1 << k) - 1, 1 << k)
        planes = g.bits(a["r"], flat=False)  # [k, bytes, 8]: bit j of each remainder
        # sum_j 2^j * plane j; Einsum reads the planes as gathered, where MatMul needs them
        # reshaped to [k, 8 * bytes] first (a copy of k bits per entry: 30 % slower to fold)
        weighted = g.op("Einsum", a["w"], planes, equation="k,kbe->be")
        remainder = g.op("Reshape", weighted, g.const([-1], np.int64))
        remainder = g.op("Slice", remainder, g.const([0]), count)
        offsets = g.cumsum(g.op("Sub", remainder, g.const((1 << k) - 1)))
        index = g.op("Add", scaled, offsets)
    elif gathered:
        bits = g.bits(a["p"])
        rank = g.op("Mul", g.cumsum(bits), bits)  # element -> its entry + 1, or 0
        if c.dense_tail:  # the head's elements (padding dropped), then the tail's entries
            head = g.op("Slice", rank, g.const([0]), g.const([c.head_total]))
            tail = g.op("Range", g.const(coded + 1), g.const(entries + 1), g.const(1))
            rank = g.op("Concat", head, tail, axis=0)
    elif c.positions_kind == "bitmask":
        index, count = g.ones(g.bits(a["p"]), coded, bit_count)
    elif c.values_kind == "int8":
        index = g.op("Range", g.const(0), g.const(c.total), g.const(1))
    if c.dense_tail and not gathered:
        tail = g.op("Range", g.const(c.head_total), g.const(c.total), g.const(1))
        index, count = g.op("Concat", index, tail, axis=0), ""  # int4 slices all entries

    segment = zeros = ""
    # int4 needs one per-tensor value at every entry (its codebook's start): summed steps
    # (opset >= 16), two folded passes fewer than the tensor index and a Gather
    summed = c.values_kind == "int4" and g.opset >= 16
    if "e" in a:
        length = g.const([entries], np.int64)
        zeros = g.op("ConstantOfShape", length, value=zero_of(_INDEX))
    if "e" in a and not summed:
        # the tensor of every entry: a mark at the first entry of tensors 1.., summed up
        # (the first tensor starts at 0, where the scatter writes the 0 it already holds)
        marks = g.op("ScatterElements", zeros, a["e"], a["e"])
        segment = g.cumsum(g.op("Min", marks, g.const(1)))

    def per_entry(table: str) -> str:
        if not zeros:
            return table
        if segment:
            return g.op("GatherElements", table, segment)
        # table[t] at every entry of tensor t, for a nondecreasing table with table[0] = 0:
        # its steps added at each tensor's first entry (tensors without entries share a
        # first entry, hence reduction="add"), summed up
        before = g.op("Slice", table, g.const([0]), g.const([-1]))
        steps = g.op("Sub", table, g.op("Concat", g.const([0]), before, axis=0))
        marks = g.op("ScatterElements", zeros, a["e"], steps, reduction="add")
        return g.cumsum(marks)

    if c.values_kind in FLOAT_KINDS:
        same = c.values_kind == work_kind(c.values_kind)
        values = a["v"] if same else g.op("Cast", a["v"], to=work)
    elif c.values_kind == "int8":
        local = g.op("Sub", index, per_entry(a["f"])) if segment else index
        row = g.op("Div", local, per_entry(a["l"]))
        if segment:
            row = g.op("Add", row, per_entry(a["q"]))
        scale = g.op("GatherElements", g.op("Cast", a["s"], to=TensorProto.FLOAT), row)
        values = g.op("Mul", g.op("Cast", a["v"], to=TensorProto.FLOAT), scale)
    else:
        # byte j holds entry j (low nibble) and entry j + h (high nibble); shifts on the
        # bytes themselves cost a fifth of int32 Mod / Div
        four = g.const(4, np.uint8)
        high = g.op("BitShift", a["v"], four, direction="RIGHT")
        if g.opset >= 18:
            low = g.op("BitwiseAnd", a["v"], g.const(15, np.uint8))
        else:
            left = g.op("BitShift", a["v"], four, direction="LEFT")
            low = g.op("BitShift", left, four, direction="RIGHT")
        nibbles = g.op("Concat", low, high, axis=0)
        # drop an odd count's padding nibble
        code = g.op("Slice", nibbles, g.const([0]), count or g.const([entries]))
        code = g.op("Cast", code, to=_INDEX)
        if zeros:
            code = g.op("Add", code, per_entry(a["b"]))
        values = g.op("GatherElements", g.op("Cast", a["c"], to=TensorProto.FLOAT), code)

    out = ONNX_TYPE[out_kind]
    if gathered:
        table = values  # float values hold their leading 0 (gathers_stored_values)
        if c.values_kind not in FLOAT_KINDS:
            zero = g.const([0], helper.tensor_dtype_to_np_dtype(work))
            table = g.op("Concat", zero, values, axis=0)
        values = g.op("GatherElements", table, rank, out=flat if out == work else None)
    elif c.positions_kind != "dense" and len(blocks := decode_blocks(c)) > 1:
        # each block scatters its own entries, at their index within the block
        sizes = g.const([int(c.entries[b].sum()) for b in blocks], np.int64)
        parts = [g.split(index, sizes, len(blocks)), g.split(values, sizes, len(blocks))]
        for j, (block, part_index, part_values) in enumerate(zip(blocks, *parts, strict=True)):
            start = int(c.offsets[block[0]])
            if start:
                part_index = g.op("Sub", part_index, g.const(start))
            size = g.const([int(c.numel[block].sum())], np.int64)
            zeros = g.op("ConstantOfShape", size, value=zero_of(work))
            name = f"{flat}{j}"
            part = g.op(
                "ScatterElements", zeros, part_index, part_values, out=name if out == work else None
            )
            if out != work:
                g.op("Cast", part, out=name, to=out)
        return
    elif c.positions_kind != "dense":
        zeros = g.op("ConstantOfShape", g.const([c.total], np.int64), value=zero_of(work))
        values = g.op("ScatterElements", zeros, index, values, out=flat if out == work else None)
    if out != work:
        g.op("Cast", values, out=flat, to=out)
    elif values != flat:
        g.op("Identity", values, out=flat)


def decoder_nbytes(positions_kind: str, values_kind: str, out_kind: str = "fp32") -> int:
    """Bytes a group of this codec adds to a file beyond its streams: its decoder's nodes and
    constants (the bit table and the constants it shares with other groups counted in full)."""
    dense = np.zeros((2, 8), dtype=np.float32)
    dense[0, 1] = dense[1, 3] = 1.0
    c = Compact.from_dense([dense, dense], values_kind, positions_kind)
    g = DecoderGraph("~")
    add_decoder(g, "~0.", c, out_kind, "~0.y")
    names = list(group_arrays(c))
    headers = sum(len(n) + 8 for n in names)  # each array's name, type and dims
    return sum(n.ByteSize() for n in g.nodes) + sum(i.ByteSize() for i in g.inits) + headers


def zero_of(dtype: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(dtype)))
