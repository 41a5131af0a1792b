"""Portable compact ONNX: weights stored as `Compact` streams and decoded inside the graph.

Each group of initializers that share a codec (one `Compact` holding K tensors) becomes its
arrays (for the g-th group: `g.p` positions, `g.r` Rice remainder planes, `g.w` the Rice
powers 1, 2, .., 2^(k-1), `g.v` values, `g.s` int8 scales or `g.c` int4 codebooks, and the
per-tensor tables `g.n` numel and, where the values need them, `g.e` first entry, `g.f` first
element, `g.l` row length, `g.q` first scale or `g.b` first codebook entry of each tensor) and
a few standard-op nodes that compute

    g.y = all K tensors, flat;  Split(g.y, g.n) -> g.0, g.1, ...;  Reshape(g.t, shape) -> W_t

so every initializer keeps its own name and the rest of the graph is unchanged. A group of
more than BLOCK_NUMEL elements that scatters its entries does so in blocks of consecutive
tensors (`g.y0`, `g.y1`, ..., each split by constant sizes or reshaped), which onnxruntime
folds ~2x faster than one flat tensor of millions of elements. Any ONNX
runtime runs the file; onnxruntime constant-folds the decode when it creates the session, and
inference then runs on dense weights. One decoder per group, not per tensor, and nodes
inlined in the graph (no FunctionProto, constants as initializers) keep session creation
close to the dense file's: folding costs ~15 us per node on top of the work itself, and the
work is mostly the bytes of the intermediate tensors, so the decoder keeps them few and int32.

The file's "ticketc" metadata names each group's prefix and codec ("0." -> "rice+int4", or
"rice+int4/2" with a dense tail of 2 tensors; files before dense tails never end in "/N"); its
arrays and the Split / Reshape nodes after it are all a reader needs (`read_portable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ticketc.export.decoder import (
    ONNX_TYPE,
    DecoderGraph,
    add_decoder,
    decode_blocks,
    decodes_by_gather,
    group_arrays,
    splits_flat,
    work_kind,
    zero_of,
)
from ticketc.formats.compact import Compact
from ticketc.formats.compact_positions import POSITIONS_KINDS
from ticketc.formats.compact_values import VALUES_KINDS

__all__ = [
    "MIN_OPSET",
    "Group",
    "StoredGroup",
    "codec_name",
    "default_opset",
    "parse_codec",
    "write_portable_",
]

MIN_OPSET = 13  # Split / ReduceSum / Unsqueeze take their sizes and axes as inputs


@dataclass(frozen=True)
class Group:
    """Initializers stored in one `Compact` stream: `names[t]` is tensor t of `compact`;
    `out_kind` is the float kind the graph holds them in ("fp32", "fp16", ...)."""

    names: tuple[str, ...]
    compact: Compact
    out_kind: str


@dataclass(frozen=True)
class StoredGroup:
    """A group as read back from a file, with the names of its stored arrays."""

    names: tuple[str, ...]
    compact: Compact
    out_kind: str
    arrays: tuple[str, ...]  # initializer names of the streams and tables


def codec_name(positions_kind: str, values_kind: str, out_kind: str, dense_tail: int = 0) -> str:
    """ "rice+int4", or "rice+int4>fp16" when the graph holds the tensors in another type,
    each followed by "/N" when the group ends in a dense tail of N tensors."""
    name = f"{positions_kind}+{values_kind}"
    name = name if out_kind == work_kind(values_kind) else f"{name}>{out_kind}"
    return f"{name}/{dense_tail}" if dense_tail else name


def parse_codec(name: str) -> tuple[str, str, str, int]:
    """(positions kind, values kind, out kind, dense tail) of a `codec_name`; ValueError if
    malformed."""
    name, slash, tail = name.partition("/")
    if slash and not (tail.isdigit() and int(tail) > 0):
        raise ValueError(f"unknown codec {name}/{tail!r}")
    codec, _, out = name.partition(">")
    positions_kind, _, values_kind = codec.partition("+")
    if positions_kind not in POSITIONS_KINDS or values_kind not in VALUES_KINDS:
        raise ValueError(f"unknown codec {name!r}")
    out = out or work_kind(values_kind)
    if out not in ONNX_TYPE:
        raise ValueError(f"unknown output type in codec {name!r}")
    return positions_kind, values_kind, out, int(tail) if slash else 0


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset; ValueError when it imports none."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("model imports no default ONNX opset")


_OURS = set("0123456789kLs")


def _prefix(taken: set[str]) -> str:
    """A prefix for the decoders' names (groups "0.", constants "k", shapes "s", the bit table
    "L") under which no name is already taken in the graph."""
    for candidate in ("", "~", "ticketc."):
        if not any(n.startswith(candidate) and n[len(candidate) :][:1] in _OURS for n in taken):
            return candidate
    return "ticketc~"


def write_portable_(
    model: onnx.ModelProto, groups: Sequence[Group], zeros: Sequence[tuple[str, int]] = ()
) -> dict[str, str]:
    """Store the initializers named in `groups` compactly and `zeros` as ConstantOfShape, in place.

    Each group's initializers are removed and computed by its decoder under their own names,
    so the rest of the graph is unchanged (the initializer may already hold no data: only its
    name, type and shape are read). `zeros` lists (name, ONNX type) of all-zero initializers.
    The decoded tensors equal `Compact.to_dense()` cast to the graph's type. Returns each
    group's prefix -> codec name, for the file's metadata (`read_portable` needs it).
    Raises ValueError when a name is not an initializer, or its shape or type disagrees, or
    the model's opset is below MIN_OPSET.
    """
    graph = model.graph
    opset = default_opset(model)
    if groups and opset < MIN_OPSET:
        raise ValueError(f"the portable decoder needs ONNX opset >= {MIN_OPSET}, model has {opset}")
    by_name = {init.name: init for init in graph.initializer}
    replaced: list[str] = []
    for group in groups:
        c = group.compact
        if c.total >= 2**31:
            raise ValueError(f"a group of {c.total} elements exceeds int32 indices")
        if len(c.shapes) > 1 and c.values_kind in ("int8", "int4") and (c.entries == 0).any():
            raise ValueError("every tensor of an int8 / int4 group needs an entry")
        for name, shape in zip(group.names, c.shapes, strict=True):
            _check_target(by_name, name, shape, ONNX_TYPE[group.out_kind])
            replaced.append(name)
    for name, dtype in zeros:
        _check_target(by_name, name, tuple(by_name[name].dims) if name in by_name else (), dtype)
        replaced.append(name)
    if len(set(replaced)) != len(replaced):
        raise ValueError("an initializer is listed twice")

    taken = {n for node in graph.node for n in [*node.input, *node.output]} | set(by_name)
    g = DecoderGraph(_prefix(taken), opset)
    shapes: dict[tuple[int, ...], str] = {}

    def shape_constant(shape: tuple[int, ...]) -> str:
        if shape not in shapes:
            shapes[shape] = f"{g.base}s{len(shapes)}"
            g.inits.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), shapes[shape]))
        return shapes[shape]

    codecs: dict[str, str] = {}
    for index, group in enumerate(groups):
        c, prefix = group.compact, f"{g.base}{index}."
        codecs[prefix] = codec_name(c.positions_kind, c.values_kind, group.out_kind, c.dense_tail)
        arrays = group_arrays(c).items()
        g.inits += [numpy_helper.from_array(array, prefix + k) for k, array in arrays]
        flat = prefix + "y"
        add_decoder(g, prefix, c, group.out_kind, flat)
        blocks = decode_blocks(c)
        by_gather = decodes_by_gather(c.positions_kind, c.values_kind)
        for j, block in enumerate(blocks):
            block_flat = flat if len(blocks) == 1 else f"{flat}{j}"
            pieces = [block_flat]
            if len(block) > 1 or (by_gather and splits_flat(c)):
                # a vector needs no Reshape: the Split gives it its own name
                pieces = [
                    group.names[t] if len(c.shapes[t]) == 1 else f"{prefix}{t}" for t in block
                ]
                padding = [prefix + "x"] if by_gather and not c.dense_tail else []
                sizes = (
                    prefix + "n"
                    if len(blocks) == 1
                    else g.const([int(c.numel[t]) for t in block], np.int64)
                )
                g.nodes.append(helper.make_node("Split", [block_flat, sizes], pieces + padding))
            for piece, t in zip(pieces, block, strict=True):
                name, shape = group.names[t], c.shapes[t]
                if piece != name:
                    g.nodes.append(
                        helper.make_node("Reshape", [piece, shape_constant(shape)], [name])
                    )
    for name, dtype in zeros:
        shape = tuple(by_name[name].dims)
        g.nodes.append(
            helper.make_node(
                "ConstantOfShape", [shape_constant(shape)], [name], value=zero_of(dtype)
            )
        )

    gone = set(replaced)
    kept = [init for init in graph.initializer if init.name not in gone]
    graph.ClearField("initializer")
    graph.initializer.extend(kept + g.inits)
    # Old IRs list initializers as graph inputs too; a computed tensor must not be an input.
    inputs = [i for i in graph.input if i.name not in gone]
    graph.ClearField("input")
    graph.input.extend(inputs)
    nodes = list(graph.node)
    graph.ClearField("node")
    graph.node.extend(g.nodes + nodes)  # decoders first keeps the graph topologically sorted
    return codecs


def _check_target(
    by_name: dict[str, onnx.TensorProto], name: str, shape: tuple[int, ...], dtype: int
) -> None:
    if name not in by_name:
        raise ValueError(f"initializer {name!r} is not in the model")
    init = by_name[name]
    if tuple(init.dims) != tuple(shape):
        raise ValueError(f"{name!r} has shape {tuple(init.dims)}, its encoding {tuple(shape)}")
    if init.data_type != dtype:
        raise ValueError(
            f"{name!r} is {TensorProto.DataType.Name(init.data_type)}, "
            f"its encoding decodes to {TensorProto.DataType.Name(dtype)}"
        )
