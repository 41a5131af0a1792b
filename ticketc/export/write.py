"""Writing an exported graph: each initializer stored as its plan says (dense, ONNX sparse
initializers, or the portable codec decoded in-graph), decoded weights checked against their
value type's bound, outputs checked in onnxruntime, the file (and its card) moved into place."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ticketc import __version__
from ticketc.atomic import staging_dir as _staging
from ticketc.errors import UserError
from ticketc.export.config import (
    EXTERNAL_DATA_THRESHOLD,
    ExportConfig,
    ExportResult,
    LayerRecord,
)
from ticketc.export.graph_edits import deduplicate_, drop_data_, slim_
from ticketc.export.storage import (
    StoragePlan,
    TensorStorage,
    is_float,
    plan_storage,
    tensor_record,
)
from ticketc.export.trace import quiet
from ticketc.formats.compact_values import value_kind_of
from ticketc.verify import Verification


def ir_numpy(tensor: Any) -> np.ndarray:
    """An IR tensor's values as numpy (bfloat16 as ml_dtypes.bfloat16), without a copy where
    the data is already in memory."""
    return np.asarray(tensor.numpy())


def graph_arrays(model: ir.Model) -> dict[str, np.ndarray]:
    """Every initializer of the main graph with data, as numpy."""
    arrays = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None:
            arrays[name] = ir_numpy(tensor)
    return arrays


def write_onnx(
    model: ir.Model,
    out: str | os.PathLike[str],
    config: ExportConfig,
    sources: dict[str, list[str]],
    notes: list[str],
    check_outputs: Callable[[Path], Verification] | None,
    start: float,
    skip: Collection[str] = (),
    source: str = "an in-memory model",
) -> ExportResult:
    """Store `model`'s initializers as `config` says, check the file and move it to `out`.

    `check_outputs(staged_path)` compares the file's outputs with the reference; it runs
    unless `config.verify` is off. Lossy and lossless weights are always checked against
    what their value type promises. Initializers in `skip` are left as they are. With
    `config.card`, the sparsity card (ticketc.card; `source` names the model in it) is staged
    and lands beside `out` together with it. Raises
    UserError (no file written) when a check fails.
    """
    gone = [] if skip else deduplicate_(model, sources)  # skip: a file's own decoders stay
    if gone:
        notes.append(f"{len(gone)} initializer(s) held the same values as another: stored once")
    arrays = {n: a for n, a in graph_arrays(model).items() if n not in skip}
    weight_bytes = sum(a.nbytes for a in arrays.values())
    codecs: dict[str, str] = {}
    if config.format == "dense":
        plan = StoragePlan()
        tensors = _kept(arrays, config.values)
        proto = None
    elif config.format == "sparse-initializer":
        proto, tensors = _sparse_proto(model, arrays)
        plan = StoragePlan()
    else:
        plan = plan_storage(arrays, config.values, config.positions)
        notes = notes + plan.notes
        tensors = plan.tensors
        proto, codecs = _portable_proto(model, plan)
    graph_dtype = _graph_dtype(arrays)
    layers = [_layer(t, sources.get(t.name, [])) for t in tensors]
    metadata = _metadata(config, graph_dtype, layers, codecs)
    inputs = {value.name for value in model.graph.inputs}
    computed = [x.initializer for x in layers if x.codec != x.dtype and x.initializer in inputs]
    if computed:  # an old IR's initializers listed as inputs (keep_initializers_as_inputs)
        notes.append(
            f"{len(computed)} weight(s) the model also lists as graph inputs (overridable) are "
            f"computed in the file and inputs no more: {', '.join(computed[:5])}"
        )
    out = Path(out)
    errors: dict[str, float] = {}  # initializer -> measured max abs error of its stored values
    with _staging(out) as stage:
        staged = stage / out.name
        if proto is None:
            model.metadata_props["ticketc"] = metadata
            with quiet():
                ir.save(model, staged, external_data=staged.name + ".data")
        else:
            proto.metadata_props.add(key="ticketc", value=metadata)
            proto.producer_name, proto.producer_version = "ticketc", __version__
            _save(proto, staged)
            errors = _check_weights(proto, plan, arrays, notes)
        files = sorted(stage.iterdir())
        seconds = time.perf_counter() - start  # export and write; output verification not counted
        verification = None
        if config.verify and check_outputs is not None:
            try:
                verification = check_outputs(staged)
            except UserError as e:
                # the staging folder means nothing to the user: name the output
                e.args = (str(e).replace(str(staged), str(out)),)
                raise
            if not verification.passed:
                raise UserError(
                    f"verification failed: onnxruntime differs from the reference beyond "
                    f"relative tolerance {verification.tolerance:g} ({verification.summary()}); "
                    f"no file written"
                )
        if not any(layer.nnz < int(np.prod(layer.shape)) for layer in layers):
            notes.append("no zeros in any weight: the file is not smaller than the dense export")
        total = sum(f.stat().st_size for f in files)
        result = ExportResult(
            out,
            files,
            total,
            layers,
            verification,
            seconds,
            notes,
            weight_bytes,
            graph_dtype,
            config.values,
        )
        if config.card:  # staged with the file: both land in place, or neither
            from ticketc.card import card_stem, export_card, write_card

            write_card(export_card(result, source, arrays, errors), card_stem(staged))
        result.files = [
            f
            for f in _commit(stage, out, sorted(stage.iterdir()))
            if not f.name.endswith((".card.md", ".card.json"))
        ]
    return result


def _graph_dtype(arrays: dict[str, np.ndarray]) -> str:
    counts: dict[str, int] = {}
    for a in arrays.values():
        if is_float(a):
            counts[str(a.dtype)] = counts.get(str(a.dtype), 0) + a.size
    return max(counts, key=counts.__getitem__) if counts else "float32"


def _kept(arrays: dict[str, np.ndarray], values: str) -> list[TensorStorage]:
    """Records of the float initializers as they are (the dense format)."""
    return [
        tensor_record(
            name, a, int(np.count_nonzero(a)), "kept", value_kind_of(a.dtype), a.nbytes, values
        )
        for name, a in arrays.items()
        if is_float(a) and a.ndim >= 1
    ]


def _layer(t: TensorStorage, sources: list[str]) -> LayerRecord:
    return LayerRecord(
        t.name,
        sources,
        t.shape,
        t.dtype,
        t.nnz,
        t.density,
        t.codec,
        round(t.nbytes),
        t.bound_bits / 8,
    )


def _portable_proto(model: ir.Model, plan: StoragePlan) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The graph with the plan's tensors stored compactly. Their dense data is dropped from the
    IR before it is serialised, so no second dense copy of the model is made."""
    from ticketc.export.portable import write_portable_

    for group in plan.groups:
        for name in group.names:
            drop_data_(model.graph, name)
    for name, _ in plan.zeros:
        drop_data_(model.graph, name)
    proto = ir.to_proto(model)
    slim_(proto)
    codecs = write_portable_(proto, plan.groups, plan.zeros)
    return proto, codecs


def _sparse_proto(
    model: ir.Model, arrays: dict[str, np.ndarray]
) -> tuple[onnx.ModelProto, list[TensorStorage]]:
    """The graph with each float initializer whose COO form is smaller stored as a sparse
    initializer (int64 indices, as the ONNX checker requires)."""
    from ticketc.export.sparse_initializer import to_sparse_initializer

    chosen: dict[str, np.ndarray] = {}
    tensors = []
    for name, a in arrays.items():
        if not is_float(a) or a.ndim < 1:
            continue
        nnz = int(np.count_nonzero(a))
        coo = nnz * (8 + a.itemsize)
        if coo < a.nbytes:
            chosen[name] = a
            tensors.append(tensor_record(name, a, nnz, "compact", "coo-int64", coo, "fp32"))
        else:
            tensors.append(
                tensor_record(name, a, nnz, "kept", value_kind_of(a.dtype), a.nbytes, "fp32")
            )
    for name in chosen:
        drop_data_(model.graph, name)
    proto = ir.to_proto(model)
    slim_(proto)
    return to_sparse_initializer(proto, chosen), tensors


def _check_weights(
    proto: onnx.ModelProto, plan: StoragePlan, arrays: dict[str, np.ndarray], notes: list[str]
) -> dict[str, float]:
    """Decode every group of the file in onnxruntime and compare with the graph's own tensors:
    each within what its value type promises (exact for lossless), else UserError; a note for
    each tensor whose kept weights decode to 0 (below fp16's or a quantizer's resolution).
    Returns initializer -> the measured max abs error of its decoded weights."""
    errors: dict[str, float] = {}
    from ticketc.export.decode import decode_checks

    for name, kind, result in decode_checks(proto, plan.groups, arrays):
        errors[name] = float(result.max_abs_error)
        if not result.within_bound:
            raise UserError(
                f"{name}: the stored {kind} weights decode {result.max_abs_error:.3g} away "
                f"from the graph's, beyond what {kind} promises; no file written"
            )
        if result.flushed:
            notes.append(
                f"{name}: {result.flushed} kept weight(s) decode to 0 in {kind} (below its "
                "resolution there)"
            )
    for name, _ in plan.zeros:
        if np.count_nonzero(arrays[name]):
            raise UserError(f"{name}: stored as zeros but holds nonzeros; no file written")
    return errors


def _metadata(
    config: ExportConfig, dtype: str, layers: Sequence[LayerRecord], codecs: dict[str, str]
) -> str:
    """Version, format, value type, the decode groups (prefix -> codec) and, per compressed
    initializer, the PyTorch names behind it ("" when it is the parameter of the same name,
    unchanged; "*" when it is that parameter with its values rewritten, e.g. a BatchNorm
    folded in), as one compact JSON entry: it counts in the size."""
    compressed = {
        layer.initializer: _sources_entry(layer.initializer, layer.sources)
        for layer in layers
        if layer.codec != layer.dtype
    }
    meta: dict[str, object] = {
        "version": __version__,
        "format": config.format,
        "values": config.values,
        "dtype": dtype,
        "layers": compressed,
    }
    if codecs:
        meta["groups"] = codecs
    return json.dumps(meta, separators=(",", ":"))


def _sources_entry(initializer: str, sources: list[str]) -> str:
    if sources == [initializer]:
        return ""
    if sources == [initializer + "*"]:
        return "*"
    return ",".join(sources)


def read_metadata(proto: onnx.ModelProto) -> dict[str, Any] | None:
    """The file's "ticketc" metadata entry as a dict; None when there is none or it is not a
    JSON object (a damaged entry: the file is then read as a plain ONNX file)."""
    for entry in proto.metadata_props:
        if entry.key == "ticketc":
            try:
                meta = json.loads(entry.value)
            except (ValueError, RecursionError):
                return None
            return meta if isinstance(meta, dict) else None
    return None


def _save(proto: onnx.ModelProto, path: Path) -> None:
    if proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, path)
        return
    data = path.with_name(path.name + ".data")
    onnx.save_model(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )


def _commit(stage: Path, out: Path, files: list[Path]) -> list[Path]:
    """Move the staged files into place, external data first so the .onnx never dangles."""
    final = [out.with_name(f.name) for f in files]
    for staged, target in sorted(
        zip(files, final, strict=True), key=lambda p: p[0].suffix == ".onnx"
    ):
        os.replace(staged, target)
    stale = out.with_name(out.name + ".data")
    if stale not in final and stale.exists():
        stale.unlink()  # belonged to the file just replaced
    return final
