"""ticketc: turn lottery tickets into deployable sparse models.

    import ticketc
    loaded = ticketc.load_model("ticket.pt")                  # any supported model file
    ticketc.export_model(loaded.model, loaded.example_input, "m.onnx")
    ticketc.verify_onnx("m.onnx", loaded.model, x, tolerance=1e-5)  # onnxruntime vs PyTorch
    fast = ticketc.compile_model(loaded.model)                # sparse kernels, planned per layer
    model = ticketc.load_packed("packed-dir")                 # written by `ticketc pack`

In-memory models are accepted as they are, pruned with torch.nn.utils.prune (hooks on) or
torch.ao.pruning (parametrizations on): export and compile work on a copy. See
examples/python_api.py and the README's "Python API".

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
    "compile_model": "ticketc.compile",
    "load_model": "ticketc.load",
    "export_model": "ticketc.export",
    "ExportConfig": "ticketc.export",
    "CompileConfig": "ticketc.compile",
    "load_packed": "ticketc.pack",
    "verify_onnx": "ticketc.verify",  # ticketc.verify.verify (ticketc.verify is the module)
    "Verification": "ticketc.verify",
}
_RENAMED = {"verify_onnx": "verify"}

__all__ = ["UserError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name == "compile":  # the subpackage, as after `import ticketc.compile`
        return importlib.import_module("ticketc.compile")
    if name not in _LAZY:
        raise AttributeError(f"module 'ticketc' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), _RENAMED.get(name, name))
