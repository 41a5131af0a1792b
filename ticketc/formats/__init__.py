"""Sparse storage formats of a masked weight, one file per format.

CSR (`csr.py`), BSR (`bsr.py`) and the tiled bitmap (`tiled.py`) hold exactly the arrays the
kernels and custom ops take and a compiled layer stores; `LAYOUTS` names them as compile's
format strings do ("csr", "bsr(B)", "tiled"). Compact (`compact.py`) is the file codec behind
the portable ONNX export. `layout.py` holds what the first three share.
"""

from __future__ import annotations

from ticketc.formats.bsr import BSR, block_occupancy
from ticketc.formats.compact import Compact
from ticketc.formats.compact_positions import POSITIONS_KINDS, mask_entropy_bits
from ticketc.formats.compact_values import VALUES_KINDS
from ticketc.formats.csr import CSR
from ticketc.formats.tiled import Tiled

__all__ = [
    "BSR",
    "CSR",
    "LAYOUTS",
    "POSITIONS_KINDS",
    "VALUES_KINDS",
    "Compact",
    "Tiled",
    "block_occupancy",
    "mask_entropy_bits",
]

# The runtime's sparse layouts by name: the type whose arrays a compiled layer of that layout
# stores (`from_buffers` / `buffers()`).
LAYOUTS: dict[str, type[CSR] | type[BSR] | type[Tiled]] = {"csr": CSR, "bsr": BSR, "tiled": Tiled}
