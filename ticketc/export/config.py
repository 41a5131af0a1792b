"""What an ONNX export is asked for (`ExportConfig`) and what it returns (`ExportResult`,
one `LayerRecord` per float initializer of the graph)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch

from ticketc.export.storage import POSITIONS as _PLAN_POSITIONS
from ticketc.export.storage import VALUES
from ticketc.verify import OUTPUT_RTOL, Verification

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
    # with dynamic_batch: the sequence axis of integer inputs dynamic too (off where the graph
    # keeps the traced length: the batch alone stays dynamic)
    dynamic_sequence: bool = True
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
        if self.opset is not None and self.opset > (latest := onnx.defs.onnx_opset_version()):
            # torch.onnx would fall back to its default opset without a word
            raise ValueError(f"opset {self.opset} is past the latest this onnx knows ({latest})")
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
