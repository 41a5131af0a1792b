"""Sparse linear-layer kernels.

Triton (GPU, or CPU through its interpreter), one kernel per file: csr_linear (small batch,
unstructured), bsr_linear (block-sparse, tensor cores), tiled_linear (bitmap tiles decoded into
tensor-core dots). CPU: csr_cpu (Numba), which works without Triton.

Triton is an optional dependency (`pip install 'ticketc[gpu]'`) and is imported only when a
Triton kernel is first asked for: `from ticketc.kernels import csr_cpu` never imports it, and
`from ticketc.kernels import csr_linear` without Triton raises ImportError naming the extra.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

# public name -> the module of this package that defines it (each imports triton)
_TRITON = {
    "BSR_BLOCKSIZES": "bsr_linear",
    "bsr_config": "bsr_linear",
    "bsr_linear": "bsr_linear",
    "csr_config": "csr_linear",
    "csr_linear": "csr_linear",
    "tiled_config": "tiled_linear",
    "tiled_linear": "tiled_linear",
}

_NEEDS_TRITON = "ticketc's Triton kernels need Triton: pip install 'ticketc[gpu]'"

__all__ = [*_TRITON, "triton_kernels"]


def triton_kernels() -> SimpleNamespace:
    """Every Triton kernel and config helper of this package, by name (imports Triton).

    Raises ImportError naming the `gpu` extra when Triton is not installed.
    """
    global _LOADED
    if _LOADED is None:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ImportError(_NEEDS_TRITON) from e
        modules = {m: importlib.import_module(f"{__name__}.{m}") for m in set(_TRITON.values())}
        _LOADED = SimpleNamespace(**{n: getattr(modules[m], n) for n, m in _TRITON.items()})
    return _LOADED


_LOADED: SimpleNamespace | None = None


def __getattr__(name: str) -> Any:
    if name not in _TRITON:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    loaded = triton_kernels()
    # Importing the submodules bound the package attributes csr_linear, bsr_linear and
    # tiled_linear to them: bind every public name to its function instead, as eager
    # `from .csr_linear import csr_linear` imports would.
    globals().update(vars(loaded))
    return getattr(loaded, name)
