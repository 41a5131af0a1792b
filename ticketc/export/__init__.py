"""ONNX export: dense, ONNX sparse initializers, or ticketc's portable compact codec."""

from ticketc.export.onnx_export import (
    FORMATS,
    VALUES,
    ExportConfig,
    ExportResult,
    LayerRecord,
    export_model,
    read_metadata,
)

__all__ = [
    "FORMATS",
    "VALUES",
    "ExportConfig",
    "ExportResult",
    "LayerRecord",
    "export_model",
    "read_metadata",
]
