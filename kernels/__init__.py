"""Triton kernels for sparse linear layers (installed as `ticketc.kernels`).

Importing this package imports Triton; `ticketc.ops` imports it only on the CUDA path. One
kernel per file: csr_linear (small batch, unstructured), bsr_linear (block-sparse, tensor
cores), tiled_linear (bitmap tiles decoded into tensor-core dots).
"""

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
