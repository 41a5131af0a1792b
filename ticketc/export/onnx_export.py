"""Stage 3: a masked PyTorch module -> a small ONNX file that gives the same outputs.

torch.onnx (dynamo) writes the dense graph; ticketc then swaps each pruned weight's
initializer for its compact encoding (portable), for an ONNX sparse initializer, or keeps it
(dense, the baseline). The file is verified in onnxruntime before it is moved into place.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from torch import nn

from ticketc import __version__
from ticketc.atomic import staging_dir as _staging
from ticketc.errors import UserError
from ticketc.export.trace import (
    Found,
    drop_data_,
    find_pruned,
    quiet,
    slim_,
    torch_to_onnx,
)
from ticketc.load import set_eval_
from ticketc.masks import Masks, masks_from_zeros
from ticketc.verify import FP32_RTOL, Verification, random_sample, verify

FORMATS = ("portable", "sparse-initializer", "dense")
VALUES = ("fp32", "fp16", "int8", "int4")
POSITIONS = ("auto", "rice", "gap8", "gap16", "bitmask")
MIN_OPSET = 18
# One protobuf may not exceed 2 GiB; past this the weights go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass(frozen=True)
class ExportConfig:
    format: str = "portable"
    values: str = "fp32"
    verify: bool = True
    tolerance: float | None = None  # None: fp32 must match to FP32_RTOL, lossy values are reported
    opset: int | None = None  # None: torch.onnx's default
    dynamic_batch: bool = True
    dead_units: bool = False  # drop units a ticket cut off: real dims shrink, in every runtime
    # How positions are coded. "auto": the fewest bytes per tensor (usually Rice-coded gaps);
    # "gap8" is ~5-10 % larger but folds ~3x faster when onnxruntime creates the session.
    positions: str = "auto"

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

    @property
    def effective_tolerance(self) -> float | None:
        if self.tolerance is not None:
            return self.tolerance
        return FP32_RTOL if self.values == "fp32" else None


@dataclass(frozen=True)
class LayerRecord:
    name: str  # parameter name, e.g. "1.weight"
    initializer: str  # its name in the ONNX graph
    shape: tuple[int, ...]
    nnz: int
    density: float
    codec: str  # "gap8+fp16", "coo-int64", "dense", ...
    nbytes: int  # bytes of the stored form


@dataclass
class ExportResult:
    path: Path
    files: list[Path]
    total_bytes: int  # all files of the artifact (.onnx and any external data)
    layers: list[LayerRecord]
    verification: Verification | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    weight_bytes: int = 0  # the model's parameters and buffers as dense fp32: what it shrinks from

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["files"] = [str(f) for f in self.files]
        if self.verification is not None:
            out["verification"]["passed"] = self.verification.passed
        return out


def export_model(
    model: nn.Module,
    example_input: torch.Tensor,
    out: str | os.PathLike[str],
    config: ExportConfig | None = None,
    *,
    masks: Masks | None = None,
    sample: torch.Tensor | None = None,
) -> ExportResult:
    """Export `model` (masks already applied) to `out`; verify it; write nothing on failure."""
    config = config or ExportConfig()
    start = time.perf_counter()
    set_eval_(model)
    masks = masks if masks is not None else masks_from_zeros(model)
    original, notes = model, []
    if config.dead_units:
        model, masks, note = _without_dead_units(model, masks)
        notes.append(note)
    program, trace_notes = torch_to_onnx(
        model, example_input, dynamic_batch=config.dynamic_batch, opset=config.opset
    )
    notes += trace_notes
    found, missing = find_pruned(program.model.graph, model, masks)
    notes += missing
    if config.format == "dense":
        layers = [_record(f, ("dense", 4 * f.weight.numel())) for f in found]
        program.model.metadata_props["ticketc"] = _metadata(config, layers)

        def write(path: Path) -> None:
            with quiet():  # exactly torch's own export: the baseline of every size figure
                program.save(path, external_data=True)
    else:
        proto, stored = _sparse_proto(program, found, config)
        layers = [_record(f, stored[f.initializer]) for f in found]
        proto.metadata_props.add(key="ticketc", value=_metadata(config, layers))
        proto.producer_name, proto.producer_version = "ticketc", __version__

        def write(path: Path) -> None:
            _save(proto, path)

    out = Path(out)
    with _staging(out) as stage:
        write(stage / out.name)
        files = sorted(stage.iterdir())
        seconds = time.perf_counter() - start  # export and write; verification not counted
        verification = None
        if config.verify:
            sample = sample if sample is not None else random_sample(example_input)
            # against the model as given: dead-unit removal must not change its outputs
            verification = verify(stage / out.name, original, sample, config.effective_tolerance)
            if not verification.passed:
                raise UserError(
                    f"verification failed: onnxruntime differs from PyTorch beyond relative "
                    f"tolerance {verification.tolerance:g} ({verification.summary()}); "
                    f"no file written"
                )
        final = _commit(stage, out, files)
    total = sum(f.stat().st_size for f in final)
    if not any(layer.density < 1 for layer in layers):
        notes.append("no pruned layer found: every weight is dense, so the file is not smaller")
    weight_bytes = sum(4 * t.numel() for t in [*original.parameters(), *original.buffers()])
    return ExportResult(out, final, total, layers, verification, seconds, notes, weight_bytes)


def _without_dead_units(model: nn.Module, masks: Masks) -> tuple[nn.Module, Masks, str]:
    from ticketc.compile.dead_units import eliminate_dead_units

    smaller, report = eliminate_dead_units(model)
    if not report.applied:
        return model, masks, f"dead units kept: {report.reason}"
    note = (
        f"dead units: removed {report.removed_units} units, parameters "
        f"{report.params_before:,} -> {report.params_after:,}"
    )
    return smaller, masks_from_zeros(smaller), note


def _record(found: Found, stored: tuple[str, int]) -> LayerRecord:
    nnz, numel = found.nnz, found.weight.numel()
    shape = tuple(found.weight.shape)
    return LayerRecord(found.name, found.initializer, shape, nnz, nnz / max(numel, 1), *stored)


def _sparse_proto(
    program: torch.onnx.ONNXProgram, found: list[Found], config: ExportConfig
) -> tuple[onnx.ModelProto, dict[str, tuple[str, int]]]:
    """The graph with each pruned weight stored sparse; returns initializer -> (codec, bytes).

    Weights are encoded one at a time from the torch tensors, and their dense data is dropped
    from the graph before it is serialised, so no second dense copy of the model is ever made.
    """
    graph = program.model.graph
    stored: dict[str, tuple[str, int]] = {}
    if config.format == "sparse-initializer":
        from ticketc.export.sparse_initializer import to_sparse_initializer

        weights = {f.initializer: f.weight for f in found}
        for name, w in weights.items():
            stored[name] = ("coo-int64", 12 * int(w.count_nonzero()))  # int64 index + fp32 value
            drop_data_(graph, name)
        proto = ir.to_proto(program.model)
        slim_(proto)
        return to_sparse_initializer(proto, weights), stored

    from ticketc.export.portable import to_portable
    from ticketc.formats.compact import Compact

    encoded = {}
    for f in found:
        c = Compact.from_dense(f.weight, values=config.values, positions=config.positions)
        dense_bytes = 4 * f.weight.numel()
        if c.nbytes >= dense_bytes:  # a (nearly) dense layer: never store it bigger
            # (in lossy modes it then goes to fp16 with the other float initializers)
            lossy = config.values != "fp32"
            stored[f.initializer] = (
                ("dense+fp16", dense_bytes // 2) if lossy else ("dense", dense_bytes)
            )
            continue
        encoded[f.initializer] = c
        stored[f.initializer] = (f"{c.positions_kind}+{c.values_kind}", c.nbytes)
        drop_data_(graph, f.initializer)
    proto = ir.to_proto(program.model)
    slim_(proto)
    # In lossy modes the other float initializers (biases) go to fp16 too: they count at this scale.
    half = [
        init.name
        for init in proto.graph.initializer
        if config.values != "fp32"
        and init.name not in encoded
        and init.data_type == onnx.TensorProto.FLOAT
    ]
    return to_portable(proto, encoded, half=half), stored


def _metadata(config: ExportConfig, layers: list[LayerRecord]) -> str:
    """Version and per-layer density / codec, as one compact JSON entry (it counts in the size)."""
    records = [
        {"name": layer.name, "density": round(layer.density, 6), "codec": layer.codec}
        for layer in layers
    ]
    meta = {"version": __version__, "format": config.format, "values": config.values}
    return json.dumps({**meta, "layers": records}, separators=(",", ":"))


def read_metadata(proto: onnx.ModelProto) -> dict[str, object] | None:
    for entry in proto.metadata_props:
        if entry.key == "ticketc":
            return json.loads(entry.value)  # type: ignore[no-any-return]
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
