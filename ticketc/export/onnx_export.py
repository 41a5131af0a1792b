"""Stage 3: a masked PyTorch module -> a small ONNX file that gives the same outputs.

torch.onnx (dynamo) writes the dense graph; ticketc then swaps each pruned weight's
initializer for its compact encoding (portable), for an ONNX sparse initializer, or keeps it
(dense, the baseline). The file is verified in onnxruntime before it is moved into place.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ticketc import __version__
from ticketc.errors import UserError
from ticketc.load import set_eval_
from ticketc.masks import Masks, masks_from_zeros
from ticketc.verify import FP32_RTOL, Verification, random_sample, verify

FORMATS = ("portable", "sparse-initializer", "dense")
VALUES = ("fp32", "fp16", "int8", "int4")
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

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.values not in VALUES:
            raise ValueError(f"values {self.values!r} is not one of {', '.join(VALUES)}")
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
    proto, trace_notes = torch_to_onnx(model, example_input, config)
    notes += trace_notes
    if config.format != "dense":  # dense stays exactly as torch writes it: the size baseline
        slim_(proto)
    found, missing = _pruned_initializers(proto, model, masks)
    notes += missing
    proto, stored = _rewrite(proto, {f.initializer: f.weight for f in found}, config)
    layers = [
        LayerRecord(
            f.name,
            f.initializer,
            tuple(f.weight.shape),
            f.nnz,
            f.nnz / max(f.weight.numel(), 1),
            *stored.get(f.initializer, ("dense", 4 * f.weight.numel())),
        )
        for f in found
    ]
    _add_metadata(proto, config, layers)
    seconds = time.perf_counter() - start
    out = Path(out)
    with _staging(out) as stage:
        files = _save(proto, stage / out.name)
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
    return ExportResult(out, final, total, layers, verification, seconds, notes)


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


def torch_to_onnx(
    model: nn.Module, example_input: torch.Tensor, config: ExportConfig
) -> tuple[onnx.ModelProto, list[str]]:
    """torch.onnx (dynamo) with a dynamic batch dimension; names the layer that cannot export.

    Returns the dense model and notes for the user (e.g. why the batch size had to be fixed).
    """
    notes: list[str] = []
    program = None
    if config.dynamic_batch and example_input.dim() > 0:
        # torch.export specialises dimensions of size 1, so trace the batch at size 2.
        traced = example_input
        if example_input.shape[0] == 1:
            traced = example_input.expand(2, *example_input.shape[1:]).contiguous()
        batch = torch.export.Dim("batch")
        try:
            program = torch.export.export(model, (traced,), dynamic_shapes=({0: batch},))
        except Exception as e:  # noqa: BLE001 - torch.export raises many types
            notes.append(f"batch size fixed at {example_input.shape[0]}: {_first_line(e)[:150]}")
    if program is None:
        try:
            program = torch.export.export(model, (example_input,))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot trace the model with torch.export: {_first_line(e)}") from e
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                program, dynamo=True, opset_version=config.opset, verbose=False
            )
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot export to ONNX: {_blame(program, e)}") from e
    assert onnx_program is not None
    return onnx_program.model_proto, notes


def slim_(proto: onnx.ModelProto) -> None:
    """Drop what torch.onnx adds for debugging (stack traces, module paths, inferred shapes).

    About 5 KB on Lenet-300-100: a third of a 3.6 %-dense int4 file. ONNX needs none of it.
    """
    graph = proto.graph
    del graph.value_info[:]
    graph.doc_string = ""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        node.name = ""
    for value in [*graph.input, *graph.output]:
        del value.metadata_props[:]
        value.doc_string = ""


def _blame(program: torch.export.ExportedProgram, error: Exception) -> str:
    """Name the layer whose operator torch.onnx could not translate."""
    text = "".join(traceback.format_exception(error))
    for node in program.graph.nodes:
        if node.op != "call_function" or str(node.target) not in text:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        layer = "the model's forward"
        if stack:
            path, cls = list(stack.values())[-1]
            layer = f"layer {path or '(top level)'!r} ({getattr(cls, '__name__', cls)})"
        return f"{layer} uses {node.target}, which torch.onnx cannot translate"
    return re.sub(r"\x1b\[[0-9;]*m", "", _first_line(error))


@contextlib.contextmanager
def _quiet():
    """torch.onnx logs and warns a lot (missing torchvision, progress lines): hide it."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class _Found:
    name: str  # parameter name
    initializer: str  # graph initializer holding it
    weight: torch.Tensor  # as stored in the graph (possibly transposed)
    nnz: int


def _pruned_initializers(
    proto: onnx.ModelProto, model: nn.Module, masks: Masks
) -> tuple[list[_Found], list[str]]:
    """The graph initializer of every masked weight (by name, or as the optimizer transposed it)."""
    params = dict(model.named_parameters())
    by_name = {init.name: init for init in proto.graph.initializer}
    found: list[_Found] = []
    notes: list[str] = []
    for name, mask in masks.items():
        weight = params[name].detach().float()
        init_name, stored = _find_initializer(by_name, name, weight)
        if init_name is None:
            notes.append(f"{name}: not found among the ONNX initializers, left as torch wrote it")
            continue
        found.append(_Found(name, init_name, stored, int(mask.sum())))
    return found, notes


def _find_initializer(
    by_name: dict[str, onnx.TensorProto], name: str, weight: torch.Tensor
) -> tuple[str | None, torch.Tensor]:
    if name in by_name and tuple(by_name[name].dims) == tuple(weight.shape):
        return name, weight
    # torch.onnx's optimizer folds Transpose(weight) into a new initializer for MatMul.
    if weight.dim() == 2:
        transposed = weight.t().contiguous()
        for init in by_name.values():
            if (
                tuple(init.dims) == tuple(transposed.shape)
                and init.data_type == onnx.TensorProto.FLOAT
            ):
                value = numpy_helper.to_array(init)
                if np.array_equal(value, transposed.numpy()):
                    return init.name, transposed
    return None, weight


def _rewrite(
    proto: onnx.ModelProto, weights: dict[str, torch.Tensor], config: ExportConfig
) -> tuple[onnx.ModelProto, dict[str, tuple[str, int]]]:
    """Swap the pruned initializers for their sparse form; returns initializer -> (codec, bytes)."""
    if config.format == "dense" or not weights:
        return proto, {}
    if config.format == "sparse-initializer":
        from ticketc.export.sparse_initializer import to_sparse_initializer

        # int64 linear indices + fp32 values per nonzero
        stored = {n: ("coo-int64", 12 * int(w.count_nonzero())) for n, w in weights.items()}
        return to_sparse_initializer(proto, weights), stored
    from ticketc.export.portable import to_portable
    from ticketc.formats.compact import Compact

    encoded = {name: Compact.from_dense(w, values=config.values) for name, w in weights.items()}
    # In lossy modes the other float initializers (biases) go to fp16 too: they count at this scale.
    half = (
        []
        if config.values == "fp32"
        else [
            init.name
            for init in proto.graph.initializer
            if init.name not in encoded and init.data_type == onnx.TensorProto.FLOAT
        ]
    )
    stored = {n: (f"{c.positions_kind}+{c.values_kind}", c.nbytes) for n, c in encoded.items()}
    return to_portable(proto, encoded, half=half), stored


def _add_metadata(proto: onnx.ModelProto, config: ExportConfig, layers: list[LayerRecord]) -> None:
    """Version and per-layer density / codec, as one compact JSON entry (it counts in the size)."""
    records = [
        {"name": layer.name, "density": round(layer.density, 6), "codec": layer.codec}
        for layer in layers
    ]
    meta = {
        "version": __version__,
        "format": config.format,
        "values": config.values,
        "layers": records,
    }
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "ticketc", json.dumps(meta, separators=(",", ":"))
    proto.producer_name, proto.producer_version = "ticketc", __version__


def read_metadata(proto: onnx.ModelProto) -> dict[str, object] | None:
    for entry in proto.metadata_props:
        if entry.key == "ticketc":
            return json.loads(entry.value)  # type: ignore[no-any-return]
    return None


@contextlib.contextmanager
def _staging(out: Path):
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: directory {parent} does not exist")
    if out.is_dir():
        raise UserError(f"cannot write {out}: it is a directory")
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from e
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _save(proto: onnx.ModelProto, path: Path) -> list[Path]:
    if proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, path)
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return [path, data]


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


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
