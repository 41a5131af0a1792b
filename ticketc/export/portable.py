"""Portable compact ONNX: pruned weights stored as `Compact` arrays, decoded inside the graph.

Every replaced initializer W (the i-th) becomes its small arrays (`i.p` positions, `i.r` Rice
remainder planes, `i.v` values, `i.s` int8 scale or `i.c` int4 codebook; fp16 copies of other
initializers are `i.h`) and one node
`ticketc.Decode<Positions><Values>(...) -> W` carrying the shape as an ints attribute `t`. The
op is a model-local function (FunctionProto) built from standard ops only, defined once per
(positions, values) pair and shared by all layers, so any ONNX runtime can run the file;
onnxruntime inlines it and constant-folds the decode when the session is created, so inference
then runs on the dense weight.

Decode recipe (all index arithmetic int64):
  gap8/16: idx = CumSum(Cast(p) + 1) - 1                      (linear index of every entry)
  rice:    z = TopK(bits(p), #ones) positions of the unary terminators, r = 2^j @ planes,
           idx = 2^k * z + CumSum(r - (2^k - 1)) + (2^k - 1)   (see ticketc.formats.rice)
  values:  fp32 as is | fp16, int8 Cast | int4 Gather(codebook, nibbles)
  dense:   Reshape(ScatterElements(zeros[numel], idx, values), shape)
  bitmask: dense = Gather([0, values...], CumSum(bits) * bits)   (bits little-endian in a byte)
  int8:    y = dense * scale[rows, 1, ...]
NonZero and Compress are avoided on purpose: onnxruntime does not constant-fold ops whose
output shape depends on data, and the decode would then run on every inference.

Size choices (they matter: a 3.6 %-dense Lenet-300-100 is ~15 KB in int4): the shape is an
attribute referenced from the function body (14 B per layer for [300, 784], against 48 B for
an int64 shape initializer plus its input name), constants are shared and use the short
`value_int(s)` forms, nothing has a doc string, and intermediate names are one or two letters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ticketc.formats.compact import POSITIONS_KINDS, VALUES_KINDS, Compact
from ticketc.formats.rice import MAX_K as _MAX_RICE_K

__all__ = ["DOMAIN", "decode_function", "function_name", "read_portable", "to_portable"]

DOMAIN = "ticketc"
MIN_OPSET = 13  # Unsqueeze/ReduceSum/Slice with tensor inputs, as used below
_SHAPE_ATTR = "t"


def function_name(positions_kind: str, values_kind: str) -> str:
    """`Decode<Positions><Values>`, e.g. DecodeGap8Int4."""
    return "Decode" + positions_kind.capitalize() + values_kind.capitalize()


# Short names for function-body tensors (the inputs and output use p, r, v, s, c, y).
_LETTERS = "abdefghijklmnoqtuwxzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class _Body:
    """Accumulates function-body nodes with one- or two-letter tensor names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0
        self._consts: dict[tuple[int, ...] | int, str] = {}

    def fresh(self) -> str:
        n, self._count = self._count, self._count + 1
        if n < len(_LETTERS):
            return _LETTERS[n]
        return _LETTERS[n // len(_LETTERS) - 1] + _LETTERS[n % len(_LETTERS)]

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        out = self.fresh()
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value: int | list[int]) -> str:
        """An int64 constant, a scalar or 1-D (the shortest Constant encodings), made once."""
        key = tuple(value) if isinstance(value, list) else value
        if key not in self._consts:
            if isinstance(value, list):
                self._consts[key] = self.op("Constant", value_ints=value)
            else:
                self._consts[key] = self.op("Constant", value_int=value)
        return self._consts[key]

    def bits(self, packed: str) -> str:
        """Unpack uint8 `packed` [..., n] little-endian into int64 bits [..., n, 8]."""
        wide = self.op("Cast", packed, to=TensorProto.INT64)
        column = self.op("Unsqueeze", wide, self.const([-1]))
        weights = self.const([1 << j for j in range(8)])
        return self.op("Mod", self.op("Div", column, weights), self.const(2))


def _gap_index(b: _Body) -> str:
    # One constant serves three uses: p - (-1) = gap, CumSum over axis -1 (the only axis),
    # cumulative sum + (-1) = 0-based linear index.
    minus_one = b.const(-1)
    gaps = b.op("Sub", b.op("Cast", "p", to=TensorProto.INT64), minus_one)
    return b.op("Add", b.op("CumSum", gaps, minus_one), minus_one)


def _rice_index(b: _Body, opset: int) -> tuple[str, str]:
    """(linear index [m], entry count m as [1]) of Rice-coded gaps; see ticketc.formats.rice."""
    unary = b.op("Reshape", b.bits("p"), b.const([-1]))  # entry i ends at its terminator z_i
    count = b.op("ReduceSum", unary)  # [1]: one terminator per entry
    # TopK breaks ties by lower index (ONNX spec), so the m ones come out in bit order; unlike
    # NonZero its output shape is known once count is, so onnxruntime still constant-folds it.
    z = b.fresh()
    # (largest=1 and sorted=1 are TopK's defaults: not written.)
    b.nodes.append(helper.make_node("TopK", [unary, count], [b.fresh(), z]))
    # [k, 8 * bytes]: bit j of every remainder (k >= 1, so the 0 in [0, -1] copies a nonzero
    # dim, which shape inference requires).
    planes = b.op("Reshape", b.bits("r"), b.const([0, -1]))
    if opset >= 15:  # Shape's end attribute saves a Slice and a constant
        k = b.op("Shape", "r", end=1)
    else:
        k = b.op("Slice", b.op("Shape", "r"), b.const([0]), b.const([1]))
    powers = b.op("Slice", b.const([1 << j for j in range(_MAX_RICE_K)]), b.const([0]), k)
    remainder = b.op("Slice", b.op("MatMul", powers, planes), b.const([0]), count)
    minus_one = b.const(-1)
    m_minus_1 = b.op("ReduceSum", powers, keepdims=0)  # 2^k - 1
    scale = b.op("Sub", m_minus_1, minus_one)  # 2^k
    offsets = b.op("CumSum", b.op("Sub", remainder, m_minus_1), minus_one)
    index = b.op("Add", b.op("Add", b.op("Mul", scale, z), offsets), m_minus_1)
    return index, count


def decode_function(positions_kind: str, values_kind: str, opset: int) -> onnx.FunctionProto:
    """The FunctionProto that decodes one `Compact` layout to a dense float32 tensor.

    Inputs: p (positions; for rice the unary stream), r (rice only: remainder bit planes),
    v (values), then s (fp16 scale, int8) or c (fp16 codebook, int4). Attribute t: the dense
    shape (ints). Output: y, float32 of shape t.

    Index arithmetic is int64 throughout: correct past numel = 2**31, one function per kind
    (no int32 twin), and constants fit the short `value_int(s)` form; the cost is only
    temporary memory while onnxruntime folds the decode (8 B per stored entry).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"the portable decoder needs ONNX opset >= {MIN_OPSET}, model has {opset}")
    if positions_kind not in POSITIONS_KINDS:
        raise ValueError(f"unknown positions kind {positions_kind!r}")
    if values_kind not in VALUES_KINDS:
        raise ValueError(f"unknown values kind {values_kind!r}")
    b = _Body()
    shape = b.fresh()
    shape_node = helper.make_node("Constant", [], [shape])
    shape_node.attribute.append(
        helper.make_attribute_ref("value_ints", onnx.AttributeProto.INTS, ref_attr_name=_SHAPE_ATTR)
    )
    b.nodes.append(shape_node)
    numel = b.op("ReduceProd", shape)  # [1]

    # Values of the stored entries as float32, in storage order (fillers decode to 0).
    if values_kind == "fp32":
        values = "v"
    elif values_kind in ("fp16", "int8"):
        values = b.op("Cast", "v", to=TensorProto.FLOAT)
    else:
        # int4: byte k holds entry k (low nibble) and entry k + h (high nibble).
        codes = b.op("Cast", "v", to=TensorProto.INT64)  # Gather wants int32/int64 indices
        sixteen = b.const(16)
        nibbles = b.op("Concat", b.op("Mod", codes, sixteen), b.op("Div", codes, sixteen), axis=0)
        values = b.op("Gather", b.op("Cast", "c", to=TensorProto.FLOAT), nibbles)

    if positions_kind == "bitmask":
        # NonZero would keep onnxruntime from constant-folding the decode (data-dependent
        # shape), so gather instead: element j takes entry rank(j) - 1 where its bit is set,
        # the prepended 0 where not; rank = inclusive CumSum of the bits.
        zero = b.const([0])
        flat = b.op("Reshape", b.bits("p"), b.const([-1]))
        bits = b.op("Slice", flat, zero, numel)  # drop the last byte's padding
        rank = b.op("Mul", b.op("CumSum", bits, b.const(-1)), bits)
        table = b.op("Concat", b.op("ConstantOfShape", b.op("Shape", zero)), values, axis=0)
        dense = b.op("Gather", table, rank)
    else:
        if positions_kind == "rice":
            index, count = _rice_index(b, opset)
        else:
            index = _gap_index(b)
            count = b.op("Shape", index) if values_kind == "int4" else ""
        if values_kind == "int4":  # drop the padding nibble when the entry count is odd
            values = b.op("Slice", values, b.const([0]), count)
        zeros = b.op("ConstantOfShape", numel)  # float32 zeros by default
        dense = b.op("ScatterElements", zeros, index, values)

    if values_kind == "int8":
        # s arrives shaped [rows, 1, ...] (the weight's rank): one broadcast Mul dequantises per
        # row, the same single fp32 product as Compact.to_dense. (DequantizeLinear would do too,
        # but onnx.reference lacks it before opset 19.)
        dense = b.op("Reshape", dense, shape)
        scale = b.op("Cast", "s", to=TensorProto.FLOAT)
        b.nodes.append(helper.make_node("Mul", [dense, scale], ["y"]))
    else:
        b.nodes.append(helper.make_node("Reshape", [dense, shape], ["y"]))

    inputs = ["p"] + (["r"] if positions_kind == "rice" else []) + ["v"]
    inputs += {"int8": ["s"], "int4": ["c"]}.get(values_kind, [])
    return helper.make_function(
        DOMAIN,
        function_name(positions_kind, values_kind),
        inputs,
        ["y"],
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=[_SHAPE_ATTR],
    )


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("model imports no default ONNX opset")


def _arrays(prefix: str, weight: Compact) -> list[tuple[str, np.ndarray]]:
    arrays = [(prefix + "p", weight.positions)]
    if weight.remainders is not None:
        arrays.append((prefix + "r", weight.remainders))
    arrays.append((prefix + "v", weight.values))
    if weight.scale is not None:
        # Shaped [rows, 1, ...] so the decoder's Mul broadcasts it over each row.
        rank = len(weight.shape)
        arrays.append((prefix + "s", weight.scale.reshape((-1,) + (1,) * (rank - 1))))
    if weight.codebook is not None:
        arrays.append((prefix + "c", weight.codebook))
    return arrays


def _prefixes(names: list[str], taken: set[str]) -> list[str]:
    """Short prefixes for the stored arrays: "0." -> "0.p", "0.v", ... (each name is written
    twice, and long ones like "features.3.weight.p" add up at a 10-15 KB file size). Falls
    back to the full tensor name if a short one would collide with the graph's own names."""
    short = [f"{i}." for i in range(len(names))]
    if any(p + suffix in taken for p in short for suffix in "prvsch"):
        return [name + "." for name in names]
    return short


def to_portable(
    model: onnx.ModelProto, weights: dict[str, Compact], half: Iterable[str] = ()
) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `weights` are stored compactly.

    Each such float32 initializer is replaced by the `Compact` arrays and one decode node whose
    output keeps the original name, so the rest of the graph is unchanged. Initializers named
    in `half` (e.g. biases in lossy modes) are stored as fp16 and Cast back to float32.
    The decoded fp32 weights are bit-identical to `Compact.to_dense()`.
    """
    half = list(half)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = _default_opset(out)
    by_name = {init.name: init for init in graph.initializer}
    for name in [*weights, *half]:
        if name not in by_name:
            raise ValueError(f"initializer {name!r} is not in the model")
        if by_name[name].data_type != TensorProto.FLOAT:
            raise ValueError(f"initializer {name!r} is not float32")
    overlap = set(weights) & set(half)
    if overlap:
        raise ValueError(f"initializers {sorted(overlap)} are both compact and half")

    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    functions: dict[str, onnx.FunctionProto] = {}
    taken = {n for node in graph.node for n in [*node.input, *node.output]} | set(by_name)
    prefixes = _prefixes([*weights, *half], taken)
    for prefix, (name, weight) in zip(prefixes, weights.items(), strict=False):
        if not isinstance(weight, Compact):
            raise TypeError(f"weights[{name!r}] must be a Compact, got {type(weight).__name__}")
        dims = tuple(by_name[name].dims)
        if dims != weight.shape:
            raise ValueError(f"weights[{name!r}] has shape {weight.shape}, initializer has {dims}")
        fn = function_name(weight.positions_kind, weight.values_kind)
        if fn not in functions:
            functions[fn] = decode_function(weight.positions_kind, weight.values_kind, opset)
        arrays = _arrays(prefix, weight)
        new_inits += [numpy_helper.from_array(a, n) for n, a in arrays]
        node = helper.make_node(fn, [n for n, _ in arrays], [name], domain=DOMAIN)
        node.attribute.append(helper.make_attribute(_SHAPE_ATTR, list(weight.shape)))
        new_nodes.append(node)
    for prefix, name in zip(prefixes[len(weights) :], half, strict=True):
        source = numpy_helper.to_array(by_name[name])
        new_inits.append(numpy_helper.from_array(source.astype(np.float16), prefix + "h"))
        new_nodes.append(helper.make_node("Cast", [prefix + "h"], [name], to=TensorProto.FLOAT))

    replaced = set(weights) | set(half)
    kept = [init for init in graph.initializer if init.name not in replaced]
    graph.ClearField("initializer")
    graph.initializer.extend(kept + new_inits)
    # Old IRs list initializers as graph inputs too; a computed tensor must not be an input.
    inputs = [i for i in graph.input if i.name not in replaced]
    graph.ClearField("input")
    graph.input.extend(inputs)
    nodes = list(graph.node)
    graph.ClearField("node")
    graph.node.extend(new_nodes + nodes)  # decoders first keeps the graph topologically sorted
    out.functions.extend(
        f for f in functions.values() if f.name not in {g.name for g in out.functions}
    )
    if not any(entry.domain == DOMAIN for entry in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    out.ir_version = max(out.ir_version, 8)  # model-local functions need IR 8
    return out


def read_portable(model: onnx.ModelProto) -> dict[str, Compact]:
    """The `Compact` weights of a portable model, keyed by the decoded tensor's name.

    The inverse of `to_portable` for the weights, in numpy (no runtime needed): use it to
    inspect a file or decode it with `Compact.to_dense()`. `nnz` is recovered as the entries
    that are not gap fillers (a maximal gap whose value decodes to 0).
    """
    kinds = {function_name(p, v): (p, v) for p in POSITIONS_KINDS for v in VALUES_KINDS}
    arrays = {init.name: init for init in model.graph.initializer}
    found: dict[str, Compact] = {}
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type not in kinds:
            continue
        positions_kind, values_kind = kinds[node.op_type]
        names = list(node.input)
        missing = [n for n in names if n not in arrays]
        if missing:
            raise ValueError(f"decode node for {node.output[0]!r} reads missing arrays {missing}")
        data = [numpy_helper.to_array(arrays[n]) for n in names]
        remainders = data.pop(1) if positions_kind == "rice" else None
        positions, values = data[0], data[1]
        side = data[2] if len(data) > 2 else None
        shape = next(tuple(a.ints) for a in node.attribute if a.name == _SHAPE_ATTR)
        weight = Compact(
            shape=shape,
            positions_kind=positions_kind,
            positions=positions,
            values_kind=values_kind,
            values=values,
            nnz=0,
            scale=side.reshape(-1) if values_kind == "int8" and side is not None else None,
            codebook=side if values_kind == "int4" else None,
            remainders=remainders,
        )
        fillers = 0
        if positions_kind in ("gap8", "gap16"):
            maximal = positions == np.iinfo(positions.dtype).max
            fillers = int((maximal & (weight.entry_values() == 0)).sum())
        found[node.output[0]] = replace(weight, nnz=weight.entries - fillers)
    return found
