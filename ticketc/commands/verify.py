"""`ticketc verify OUT.onnx --against MODEL`: compare an ONNX file with its PyTorch model, or
with the ONNX file it was exported from."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from ticketc.commands._common import add_model_arguments, inputs_from_args, load_from_args
from ticketc.errors import UserError
from ticketc.export import read_metadata
from ticketc.export.onnx_in import onnx_sample
from ticketc.inputs import ExampleInputs
from ticketc.load import check_file
from ticketc.safe_load import looks_like_onnx
from ticketc.safe_onnx import load_onnx, parse_onnx
from ticketc.verify import (
    OUTPUT_RTOL,
    Verification,
    check_loads_in_a_child,
    ort_session,
    sample_for,
    verify,
    verify_against_onnx,
)

if TYPE_CHECKING:
    from ticketc.export.portable import StoredGroup

NAME = "verify"
HELP = "run an ONNX file in onnxruntime and compare it with the PyTorch model (or ONNX file)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", help="the exported .onnx file")
    add_model_arguments(parser, "--against")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="maximum relative output error (default: from the file's metadata: "
        f"{OUTPUT_RTOL['float32']:g} for lossless fp32, looser for fp16 / bf16 graphs; "
        "lossy files (fp16 / int8 / int4 values): output errors reported, every stored "
        "weight checked against the model's own, within its value type's bound, and the "
        "model's graph run on the file's weights checked against the file, at the lossless "
        "tolerance)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def default_tolerance(path: str) -> tuple[float | None, str]:
    """The tolerance a file's own metadata calls for, and what it is stored as."""
    meta = read_metadata(parse_onnx(check_file(path))) or {}
    values = str(meta.get("values", "fp32"))
    dtype = str(meta.get("dtype", "float32"))
    if values != "fp32":
        return None, f"{values} values (lossy: reported)"
    return OUTPUT_RTOL.get(dtype, OUTPUT_RTOL["float32"]), f"lossless, {dtype}"


def run(args: argparse.Namespace) -> int:
    if args.against is None:
        raise UserError("pass --against MODEL: the PyTorch model to compare with")
    if args.tolerance is not None and args.tolerance < 0:
        raise UserError(f"tolerance {args.tolerance} must be >= 0")
    check_file(args.onnx)
    check_loads_in_a_child(args.onnx)
    against = Path(args.against)
    if against.is_file() and against.stat().st_size and looks_like_onnx(against):
        tolerance, stored = _tolerance(args)
        result, random_sample = _against_onnx(args, tolerance)
        if tolerance is None:  # lossy values: their weights and graph against the file's
            reference = stored_once(load_onnx(args.against))
            stored += "; " + lossy_checked(args.onnx, reference, random_sample)
    else:
        args.model = args.against
        loaded = load_from_args(args)  # the model first: refusals (pickle, remote code) first
        example, sample = inputs_from_args(args, loaded)
        tolerance, stored = _tolerance(args)
        if sample is None:
            sample = sample_for(ort_session(args.onnx), example, loaded.model)
        result = verify(args.onnx, loaded.model, sample, tolerance)
        if tolerance is None:  # lossy values: their weights and graph against the model's
            reference = traced_graph(loaded.model, example)
            stored += "; " + lossy_checked(args.onnx, reference, ExampleInputs.of(sample))
    if args.json:
        print(
            json.dumps(
                {
                    "passed": result.passed,
                    "tolerance": result.tolerance,
                    "stored": stored,
                    "outputs": [o.__dict__ for o in result.outputs],
                },
                indent=2,
            )
        )
    limit = f"relative tolerance {tolerance:g}" if tolerance is not None else "no tolerance"
    if not args.json and result.passed:
        print(f"ok: {result.summary()} ({stored}; {limit})")
    if not result.passed:  # exit 2 with the one line on stderr, as for any other bad input
        raise UserError(f"{args.onnx}: verification FAILED: {result.summary()} ({stored}; {limit})")
    return 0


def lossy_checked(path: str, reference: onnx.ModelProto, sample: ExampleInputs) -> str:
    """A lossy file's stored weights and graph against the reference's (`reference`: the model
    traced as the export traces it, or the ONNX file it was exported from): `weights_checked`
    and `graph_checked`, on one read of the file and one decode of its weights in
    onnxruntime. UserError (verification FAILED) naming what differs; else a phrase for the
    summary."""
    from ticketc.export.decode import decode_in_onnxruntime
    from ticketc.export.portable_read import read_portable

    proto = load_onnx(path)
    codecs = (read_metadata(proto) or {}).get("groups") or {}
    try:
        groups = read_portable(proto, codecs)
    except ValueError as e:
        raise UserError(f"{path}: its stored weights cannot be read ({e})") from e
    held = {init.name for init in proto.graph.initializer}
    computed = {out for node in proto.graph.node for out in node.output} - held
    names = {name for group in groups for name in group.names}
    names |= {i.name for i in reference.graph.initializer if i.name in computed}
    decoded = decode_in_onnxruntime(proto, sorted(names))
    weights = weights_checked(path, proto, groups, decoded, proto_arrays(reference))
    return f"{weights}; {graph_checked(path, proto, decoded, reference, sample)}"


def weights_checked(
    path: str,
    proto: onnx.ModelProto,
    groups: Sequence[StoredGroup],
    decoded: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
) -> str:
    """The file's decoded weights (`decoded`, of its stored `groups`) against the reference's
    own (`reference`: initializer -> array): each within what its value type promises, as the
    export checked them. UserError (verification FAILED) naming the first tensor beyond; else a
    phrase for the summary, which says so where the reference holds other initializers
    (another torch, --dtype or --dead-units at export) and nothing was compared. Output errors
    alone cannot tell a lossy file of another model from this one's."""
    from ticketc.export.decode import decode_checks

    for group in groups:
        for name, shape in zip(group.names, group.compact.shapes, strict=True):
            held = reference.get(name)
            if held is None or held.shape != tuple(shape):
                return "weights not compared: the reference holds other initializers than the file"
    count = 0
    for name, kind, result in decode_checks(proto, groups, reference, decoded):
        if not result.within_bound:
            raise UserError(
                f"{path}: verification FAILED: {name} decodes {result.max_abs_error:.3g} "
                f"away from the reference's weights, beyond what {kind} promises"
            )
        count += 1
    plain = plain_weights_checked(path, proto, reference)
    return (
        f"{count} stored weights within their value type's bound, {plain} stored as they are "
        "equal to the reference's"
    )


_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


def plain_weights_checked(
    path: str, proto: onnx.ModelProto, reference: dict[str, np.ndarray]
) -> int:
    """The file's float initializers stored as they are (biases, normalisation, weights with
    no zeros to compress) that the reference holds too, by name and shape: each exactly the
    reference's (the export copies them unchanged, whatever the value type), else UserError
    (verification FAILED) naming it. Without this a lossy file's outputs, which are only
    reported, are all that would judge them. Returns how many were compared."""
    count = 0
    for init in proto.graph.initializer:
        held = reference.get(init.name)
        if held is None or init.data_type not in _FLOAT_TYPES:
            continue
        value = numpy_helper.to_array(init)
        if value.shape != held.shape:
            continue
        if not np.array_equal(value.astype(np.float64), held.astype(np.float64), equal_nan=True):
            raise UserError(
                f"{path}: verification FAILED: {init.name}, stored as it is, differs from the "
                "reference's"
            )
        count += 1
    return count


def graph_checked(
    path: str,
    proto: onnx.ModelProto,
    decoded: dict[str, np.ndarray],
    reference: onnx.ModelProto,
    sample: ExampleInputs,
) -> str:
    """A lossy file's graph against the reference's: the reference graph run in onnxruntime
    on the file's own weights (its initializers, and `decoded`: the tensors its nodes compute,
    as onnxruntime decodes them) must give the file's outputs on `sample` within the lossless
    tolerance of the file's float type. Weights within their bound and outputs near the
    model's cannot tell a file of another graph (another activation, a layer left out)
    holding the same weights; this can. UserError (verification FAILED) when they differ;
    else a phrase for the summary, which says so where the reference's initializers are not
    the file's (other names or shapes: --dead-units, another torch) and nothing was
    compared."""
    held = {init.name: init for init in proto.graph.initializer}
    names = [init.name for init in reference.graph.initializer]
    if any(name not in held and name not in decoded for name in names):
        return "graph not compared: the reference holds other initializers than the file"
    if reference.ByteSize() >= 2**31:  # protobuf's limit: onnxruntime takes no bigger bytes
        return "graph not compared: the reference is over 2 GB"
    on_file_weights = onnx.ModelProto()
    on_file_weights.CopyFrom(reference)
    for init in on_file_weights.graph.initializer:
        if init.name in held:
            init.CopyFrom(held[init.name])
        elif decoded[init.name].shape != tuple(init.dims):
            return "graph not compared: the reference holds other initializers than the file"
        else:
            init.CopyFrom(_tensor_like(init, decoded[init.name]))
    dtype = str((read_metadata(proto) or {}).get("dtype", "float32"))
    tolerance = OUTPUT_RTOL.get(dtype, OUTPUT_RTOL["float32"])
    result = verify_against_onnx(path, on_file_weights.SerializeToString(), sample, tolerance)
    if not result.passed:
        raise UserError(
            f"{path}: verification FAILED: its graph is not the reference's: the reference run "
            f"on the file's own weights differs from the file ({result.summary()}; relative "
            f"tolerance {tolerance:g})"
        )
    return (
        f"the reference's graph on the file's weights gives its outputs (rel {result.max_rel:.2g})"
    )


def _tensor_like(init: onnx.TensorProto, array: np.ndarray) -> onnx.TensorProto:
    """`array` as an initializer of `init`'s name and element type (bf16 arrives as float32)."""
    if init.data_type == onnx.TensorProto.BFLOAT16:
        return helper.make_tensor(init.name, init.data_type, array.shape, array.reshape(-1))
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    return numpy_helper.from_array(array.astype(dtype), init.name)


def traced_graph(model: nn.Module, example: ExampleInputs) -> onnx.ModelProto:
    """`model` as ticketc's export traces it (BatchNorms folded, equal initializers stored
    once), dense."""
    from onnx_ir import to_proto

    from ticketc.export.graph_edits import deduplicate_
    from ticketc.export.trace import torch_to_onnx

    traced = torch_to_onnx(model, example).model
    deduplicate_(traced, {})
    return to_proto(traced)


def stored_once(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with its equal initializers stored once, as the export writes them, so that
    the file's initializer names are the reference's."""
    import onnx_ir as ir

    from ticketc.export.graph_edits import deduplicate_

    model = ir.serde.deserialize_model(proto)
    return ir.to_proto(model) if deduplicate_(model, {}) else proto


def proto_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The main graph's initializers of `model` as numpy arrays (external data loaded)."""
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _tolerance(args: argparse.Namespace) -> tuple[float | None, str]:
    """--tolerance, or the one the file's metadata calls for; and what the file stores."""
    tolerance, stored = default_tolerance(args.onnx)
    return (tolerance if args.tolerance is None else args.tolerance), stored


def _against_onnx(
    args: argparse.Namespace, tolerance: float | None
) -> tuple[Verification, ExampleInputs]:
    """Both files in onnxruntime on random inputs of the reference's input types (symbolic
    batch VERIFY_BATCH): the check `ticketc export model.onnx` runs when it writes; and the
    sample it ran."""
    flags = [f for f in ("input", "input_shape", "sample", "arch") if getattr(args, f, None)]
    if flags:
        given = ", ".join("--" + f.replace("_", "-") for f in flags)
        raise UserError(
            f"{given}: for a PyTorch model; against an ONNX file the sample is random, from "
            "its inputs' types and shapes"
        )
    sample = onnx_sample(ort_session(args.against))
    return verify_against_onnx(args.onnx, args.against, sample, tolerance), sample
