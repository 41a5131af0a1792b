"""ticketc: turn lottery tickets into deployable sparse models.

    import ticketc
    loaded = ticketc.load_model("ticket.pt")                  # any supported model file
    ticketc.export_model(loaded.model, loaded.example_input, "m.onnx")
    fast = ticketc.compile(loaded.model)                      # sparse kernels, planned per layer

Importing ticketc registers its torch custom ops (`torch.ops.ticketc.*`: schemas and Python
kernels, a few ms after torch itself), so that `torch.export.load` runs a compiled `.pt2` after
a plain `import ticketc`. Nothing else happens at import and nothing here needs a GPU, Triton or
Numba: the stages are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

import ticketc.ops  # noqa: F401 - registers torch.ops.ticketc.* for compiled .pt2 programs
from ticketc.errors import UserError

__version__ = "0.1.0"

# public name -> module that defines it, imported on first access
_LAZY = {
    "compile": "ticketc.compile",  # the package itself is callable: ticketc.compile(model, config)
    "load_model": "ticketc.load",
    "export_model": "ticketc.export",
    "ExportConfig": "ticketc.export",
    "CompileConfig": "ticketc.compile",
}

__all__ = ["UserError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ticketc' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if name == "compile" else getattr(module, name)
