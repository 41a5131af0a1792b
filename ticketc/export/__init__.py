"""ONNX export: dense, ONNX sparse initializers, or ticketc's portable compact codec."""

from ticketc.export.onnx_export import (
    DTYPES,
    FORMATS,
    VALUES,
    ExportConfig,
    ExportResult,
    LayerRecord,
    export_model,
    read_metadata,
)
from ticketc.export.onnx_in import export_onnx_file

__all__ = [
    "DTYPES",
    "FORMATS",
    "VALUES",
    "ExportConfig",
    "ExportResult",
    "LayerRecord",
    "export_model",
    "export_onnx_file",
    "read_metadata",
]
