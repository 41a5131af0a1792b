"""Sparse linear-layer kernels (installed as `ticketc.kernels`).

Triton (GPU, or CPU through its interpreter), one kernel per file: csr_linear (small batch,
unstructured), bsr_linear (block-sparse, tensor cores), tiled_linear (bitmap tiles decoded into
tensor-core dots). CPU: csr_cpu (Numba), which works without Triton: the Triton kernels are
imported here only where Triton is installed.
"""

from importlib.util import find_spec

if find_spec("triton") is not None:
    from .bsr_linear import BSR_BLOCKSIZES, bsr_config, bsr_linear
    from .csr_linear import csr_config, csr_linear
    from .tiled_linear import tiled_config, tiled_linear

__all__ = [
    "BSR_BLOCKSIZES",
    "bsr_config",
    "bsr_linear",
    "csr_config",
    "csr_linear",
    "tiled_config",
    "tiled_linear",
]
