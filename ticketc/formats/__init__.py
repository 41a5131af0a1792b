"""Sparse storage formats of a masked weight, one file per format, and their registry.

CSR and BSR are what the kernels run; Compact is the file codec behind the portable ONNX export.
"""

from __future__ import annotations

from ticketc.formats.bsr import BSR, block_occupancy
from ticketc.formats.compact import POSITIONS_KINDS, VALUES_KINDS, Compact, mask_entropy_bits
from ticketc.formats.csr import CSR

__all__ = [
    "BSR",
    "CSR",
    "FORMATS",
    "POSITIONS_KINDS",
    "VALUES_KINDS",
    "Compact",
    "block_occupancy",
    "get_format",
    "mask_entropy_bits",
]

FORMATS: dict[str, type[CSR] | type[BSR] | type[Compact]] = {
    "csr": CSR,
    "bsr": BSR,
    "compact": Compact,
}


def get_format(name: str) -> type[CSR] | type[BSR] | type[Compact]:
    """The format class registered as `name`; ValueError listing the known names otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown sparse format {name!r}; known: {', '.join(sorted(FORMATS))}"
        ) from None
