"""Stage 3: a pruned model -> a small ONNX file that gives the same outputs.

    masks applied -> torch.onnx (dynamo) -> every initializer of the graph, as the graph holds
    it (BatchNorm folded, transposed, LSTM gates re-packed, shared weights once) -> stored
    compactly where its zeros pay -> decoded weights checked against what their value type
    promises -> outputs checked in onnxruntime against the model -> file moved into place.

The same rewrite runs on an existing ONNX file (`export_onnx_file`): the graph's initializers
are all there is to read. What decides the storage of a tensor is its values in the graph,
never a layer type or a name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from ticketc import __version__
from ticketc.atomic import staging_dir as _staging
from ticketc.errors import UserError
from ticketc.export.storage import POSITIONS as _PLAN_POSITIONS
from ticketc.export.storage import (
    VALUES,
    StoragePlan,
    TensorStorage,
    is_float,
    plan_storage,
    tensor_record,
)
from ticketc.export.trace import drop_data_, quiet, slim_, torch_to_onnx
from ticketc.formats.compact import value_kind_of
from ticketc.inputs import ExampleInputs, fixed_batch, float_dtype
from ticketc.load import set_eval_
from ticketc.masks import Masks, masked_model
from ticketc.verify import (
    OUTPUT_RTOL,
    RuntimeUnsupported,
    Verification,
    ort_session,
    sample_for,
    verify,
)

FORMATS = ("portable", "sparse-initializer", "dense")
POSITIONS = tuple(p for p in _PLAN_POSITIONS if p != "dense")
DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}
MIN_OPSET = 18
# One protobuf may not exceed 2 GiB; past this the weights go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

__all__ = [
    "DTYPES",
    "FORMATS",
    "POSITIONS",
    "VALUES",
    "ExportConfig",
    "ExportResult",
    "LayerRecord",
    "export_model",
    "read_metadata",
]


@dataclass(frozen=True)
class ExportConfig:
    format: str = "portable"
    # "fp32": lossless (each weight in the narrowest float type that holds it exactly);
    # "fp16", "int8", "int4": lossy, every decoded weight within the quantiser's own bound
    values: str = "fp32"
    verify: bool = True
    tolerance: float | None = None  # None: lossless must match to the dtype's OUTPUT_RTOL,
    # lossy output errors are reported (their weights are checked against the bound)
    opset: int | None = None  # None: torch.onnx's default
    dynamic_batch: bool = True  # dynamic batch (and sequence, for integer inputs) axes
    dead_units: bool = False  # drop units a ticket cut off: real dims shrink, in every runtime
    # how positions are coded: "auto" = the fewest bytes per tensor
    positions: str = "auto"
    dtype: str | None = None  # None: the model's own float type (fp32 where onnxruntime lacks it)
    input_names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None
    card: bool = True  # write the sparsity card (OUT.card.md / .card.json) with the file

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.values not in VALUES:
            raise ValueError(f"values {self.values!r} is not one of {', '.join(VALUES)}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions {self.positions!r} is not one of {', '.join(POSITIONS)}")
        if self.values != "fp32" and self.format != "portable":
            raise ValueError(f"values {self.values!r} need format 'portable' (got {self.format!r})")
        if self.tolerance is not None and not self.tolerance >= 0:
            raise ValueError(f"tolerance {self.tolerance!r} must be >= 0")
        if self.opset is not None and self.opset < MIN_OPSET:
            raise ValueError(f"opset {self.opset} is below the minimum {MIN_OPSET}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    def output_tolerance(self, graph_dtype: str) -> float | None:
        """The relative output error that fails the export (None: reported only)."""
        if self.tolerance is not None:
            return self.tolerance
        return (
            OUTPUT_RTOL.get(graph_dtype, OUTPUT_RTOL["float32"]) if self.values == "fp32" else None
        )


@dataclass(frozen=True)
class LayerRecord:
    initializer: str  # its name in the ONNX graph
    sources: list[str]  # PyTorch parameters / buffers it was made from ("*": values rewritten)
    shape: tuple[int, ...]
    dtype: str  # as the graph holds it: "fp32", "fp16", ...
    nnz: int
    density: float
    codec: str  # "rice+int4", "dense+fp16", "coo-int64", "zeros", "fp32" (kept), ...
    nbytes: int  # bytes of its stored form (its share of a group's streams)
    bound_bytes: float  # numel * H(density) + nnz * value bits, in bytes

    @property
    def name(self) -> str:
        """The PyTorch name where known, else the initializer's."""
        return ", ".join(self.sources) if self.sources else self.initializer


@dataclass
class ExportResult:
    path: Path
    files: list[Path]
    total_bytes: int  # all files of the artifact (.onnx and any external data)
    layers: list[LayerRecord]  # every float initializer of the graph, compressed or not
    verification: Verification | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    weight_bytes: int = 0  # the graph's initializers as the graph held them: what it shrinks from
    dtype: str = "fp32"  # the graph's float type
    values: str = "fp32"

    @property
    def bound_bytes(self) -> float:
        """The entropy bound of every float initializer for this value type, in bytes."""
        return sum(layer.bound_bytes for layer in self.layers)

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["files"] = [str(f) for f in self.files]
        out["bound_bytes"] = self.bound_bytes
        if self.verification is not None:
            out["verification"]["passed"] = self.verification.passed
        return out


def export_model(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any,
    out: str | os.PathLike[str],
    config: ExportConfig | None = None,
    *,
    masks: Masks | None = None,
    sample: Any = None,
    source: str | None = None,
) -> ExportResult:
    """Export a pruned model to `out`, verified; write nothing on failure.

    `model`: an nn.Module, with prune hooks, parametrizations or `masks` (parameter name ->
    bool) applied on a copy (the module passed in is not modified), or a torch.export program.
    `example_inputs`: a tensor, a tuple of tensors or a dict of name -> tensor (a batch of 1 is
    fine: the batch axis is exported dynamic). `sample`: the same, real data to verify on
    (default: random, batch 3). `source` names the model in the sparsity card written beside
    `out` (`config.card`). Raises UserError with one line naming what went wrong.
    """
    config = config or ExportConfig()
    source = source or "an in-memory model"
    start = time.perf_counter()
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    notes: list[str] = []
    batch = fixed_batch(model)
    if batch is not None and config.dynamic_batch:
        config = replace(config, dynamic_batch=False)
        notes.append(
            f"the program was exported with a fixed batch of {batch}, which its guards enforce: "
            f"the file keeps it (torch.export.export(..., dynamic_shapes=...) makes it dynamic)"
        )
    prepared, _ = masked_model(model, masks)
    own = float_dtype(prepared)
    target = DTYPES[config.dtype] if config.dtype else own
    try:
        return _export(
            prepared, example_inputs, out, config, sample, target, start, notes, source
        )
    except RuntimeUnsupported as e:
        if config.dtype is not None or target == torch.float32:
            raise UserError(
                f"{e} (pass --dtype fp32, or --no-verify to keep {_kind(target)})"
            ) from e
        note = (
            f"exported in fp32: onnxruntime's CPU provider cannot run this {_kind(target)} graph "
            f"(pass --dtype {_kind(target)} --no-verify to keep {_kind(target)})"
        )
        return _export(
            prepared, example_inputs, out, config, sample, torch.float32, start, [*notes, note],
            source,
        )


def _kind(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _export(
    prepared: nn.Module,
    example_inputs: Any,
    out: str | os.PathLike[str],
    config: ExportConfig,
    sample: Any,
    dtype: torch.dtype,
    start: float,
    notes: list[str],
    source: str,
) -> ExportResult:
    if dtype != float_dtype(prepared):
        import copy

        prepared = copy.deepcopy(prepared).to(dtype)
        notes = [*notes, f"model cast to {_kind(dtype)}"]
    set_eval_(prepared)
    example = ExampleInputs.of(example_inputs).map(
        lambda t: t.to(dtype) if t.is_floating_point() else t
    )
    reference = prepared
    if config.dead_units:
        prepared, note = _without_dead_units(prepared)
        notes.append(note)
    traced = torch_to_onnx(
        prepared,
        example,
        dynamic=config.dynamic_batch,
        opset=config.opset,
        input_names=list(config.input_names) if config.input_names else None,
        output_names=list(config.output_names) if config.output_names else None,
    )
    notes += traced.notes
    sources = _marked_sources(traced.sources, traced.model, reference)

    def check_outputs(path: Path) -> Verification:
        session = ort_session(path)
        if sample is not None:
            chosen = ExampleInputs.of(sample).map(
                lambda t: t.to(dtype) if t.is_floating_point() else t
            )
        else:
            chosen = sample_for(session, example, reference)
        del session
        # against the model as given: dead-unit removal must not change its outputs
        return verify(path, reference, chosen, config.output_tolerance(str(dtype).split(".")[-1]))

    return write_onnx(
        traced.model, out, config, sources, notes, check_outputs, start, source=source
    )


def _marked_sources(
    sources: dict[str, list[str]], model: ir.Model, reference: nn.Module
) -> dict[str, list[str]]:
    """Sources with a "*" on a parameter whose values the exporter changed under its own name
    (BatchNorm folded into a conv weight): the data tells, not the name."""
    tensors: dict[str, torch.Tensor] = dict(reference.named_parameters(remove_duplicate=False))
    tensors.update(reference.named_buffers(remove_duplicate=False))
    marked: dict[str, list[str]] = {}
    for init, names in sources.items():
        value = model.graph.initializers[init].const_value
        out = []
        for name in names:
            same = True
            if name == init and name in tensors and value is not None:
                held = torch.from_numpy(np.ascontiguousarray(_numpy(value)))
                own = tensors[name].detach()
                same = held.shape == own.shape and bool(
                    torch.equal(held.to(own.dtype) if held.dtype != own.dtype else held, own)
                )
            out.append(name if same else name + "*")
        marked[init] = out
    return marked


def _without_dead_units(model: nn.Module) -> tuple[nn.Module, str]:
    from ticketc.transforms import eliminate_dead_units

    smaller, report = eliminate_dead_units(model)
    if not report.applied:
        return model, f"dead units kept: {report.reason}"
    note = (
        f"dead units: removed {report.removed_units} units, parameters "
        f"{report.params_before:,} -> {report.params_after:,}"
    )
    return smaller, note


def _numpy(tensor: Any) -> np.ndarray:
    """An IR tensor's values as numpy (bfloat16 as ml_dtypes.bfloat16), without a copy where
    the data is already in memory."""
    return np.asarray(tensor.numpy())


def graph_arrays(model: ir.Model) -> dict[str, np.ndarray]:
    """Every initializer of the main graph with data, as numpy."""
    arrays = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None:
            arrays[name] = _numpy(tensor)
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
            errors = _check_weights(proto, plan, arrays)
        files = sorted(stage.iterdir())
        seconds = time.perf_counter() - start  # export and write; output verification not counted
        verification = None
        if config.verify and check_outputs is not None:
            verification = check_outputs(staged)
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
            out, files, total, layers, verification, seconds, notes, weight_bytes, graph_dtype,
            config.values,
        )
        if config.card:  # staged with the file: both land in place, or neither
            from ticketc.card import card_stem, export_card, write_card

            write_card(export_card(result, source, arrays, errors), card_stem(staged))
        result.files = [
            f for f in _commit(stage, out, sorted(stage.iterdir()))
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
    proto: onnx.ModelProto, plan: StoragePlan, arrays: dict[str, np.ndarray]
) -> dict[str, float]:
    """Decode every group of the file in onnxruntime and compare with the graph's own tensors:
    each within what its value type promises (exact for lossless), else UserError. Returns
    initializer -> the measured max abs error of its decoded weights."""
    errors: dict[str, float] = {}
    from ticketc.export.decode import decode_in_onnxruntime
    from ticketc.formats.compact import check_decoded

    for group in plan.groups:
        decoded = decode_in_onnxruntime(proto, group.names)
        originals = [arrays[n] for n in group.names]
        got = [decoded[n].astype(originals[t].dtype) for t, n in enumerate(group.names)]
        for name, result in zip(
            group.names, check_decoded(group.compact, originals, got), strict=True
        ):
            errors[name] = float(result.max_abs_error)
            if not result.within_bound:
                raise UserError(
                    f"{name}: the stored {group.compact.values_kind} weights decode "
                    f"{result.max_abs_error:.3g} away from the graph's, beyond what "
                    f"{group.compact.values_kind} promises; no file written"
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
            except ValueError:
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
