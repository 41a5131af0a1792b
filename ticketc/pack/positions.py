"""Where a packed tensor's entries are: the position layouts of ticketc.pack.codec.

- "rice": Golomb-Rice coded gaps between linear indices (ticketc.formats.rice): a unary stream
  in "positions" and k remainder bit planes in "remainders";
- "bitmask": numel bits, little-endian, in "positions";
- "N:M" / "N:M@0": group codes in "codes" (ticketc.pack.nm.NMPositions).
`smallest_positions` picks the exact layout with the fewest bytes, values included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ticketc.formats import rice
from ticketc.pack.nm import NMPositions, detect_nm

__all__ = ["MaskPositions", "Positions", "position_streams", "smallest_positions"]


@dataclass(frozen=True, eq=False)
class MaskPositions:
    """Positions of the nonzeros of a flat tensor of `numel` elements: "rice" (`positions` the
    unary stream, `remainders` the bit planes; ticketc.formats.rice) or "bitmask" (`positions`
    numel bits, little-endian)."""

    kind: str
    numel: int
    positions: np.ndarray
    remainders: np.ndarray | None = None

    @classmethod
    def from_mask(cls, keep: np.ndarray) -> MaskPositions:
        """The smaller of the two codings of the flat bool mask `keep`."""
        index = np.flatnonzero(keep)
        gaps = np.diff(index, prepend=-1)
        k = rice.best_k(gaps)
        if rice.nbytes(gaps, k) <= (keep.size + 7) // 8:
            unary, planes = rice.encode(gaps, k)
            return cls("rice", keep.size, unary, planes)
        return cls("bitmask", keep.size, np.packbits(keep, bitorder="little"))

    @property
    def nbytes(self) -> int:
        extra = self.remainders.nbytes if self.remainders is not None else 0
        return int(self.positions.nbytes + extra)

    def linear_indices(self) -> np.ndarray:
        """Row-major linear index of every entry, int64, increasing."""
        if self.kind == "bitmask":
            bits = np.unpackbits(self.positions, bitorder="little")[: self.numel]
            return np.flatnonzero(bits).astype(np.int64)
        assert self.remainders is not None
        return rice.decode(self.positions, self.remainders)

    def check(self, entries: int) -> None:
        """Raise ValueError unless the streams code exactly `entries` positions below numel."""
        if self.positions.dtype != np.uint8 or self.positions.ndim != 1:
            raise ValueError(f"{self.kind} positions must be a 1-D uint8 array")
        if self.kind == "bitmask":
            if self.positions.size != (self.numel + 7) // 8 or self.remainders is not None:
                raise ValueError(
                    f"a bitmask of {self.numel} elements takes {(self.numel + 7) // 8} bytes"
                )
            bits = np.unpackbits(self.positions, bitorder="little")
            if bits[self.numel :].any() or int(bits.sum()) != entries:
                raise ValueError(
                    f"bitmask sets {int(bits.sum())} bits, expected {entries} below {self.numel}"
                )
            return
        if self.kind != "rice":
            raise ValueError(f"unknown positions kind {self.kind!r}")
        planes = self.remainders
        if planes is None or planes.dtype != np.uint8 or planes.ndim != 2:
            raise ValueError("rice positions need uint8 remainder planes [k, ceil(entries / 8)]")
        if not 1 <= planes.shape[0] <= rice.MAX_K or planes.shape[1] != (entries + 7) // 8:
            raise ValueError(f"rice remainder planes {list(planes.shape)} for {entries} entries")
        terminators = int(np.unpackbits(self.positions, bitorder="little").sum())
        if terminators != entries:
            raise ValueError(f"rice stream codes {terminators} entries, expected {entries}")
        if entries and int(self.linear_indices()[-1]) >= self.numel:
            raise ValueError(f"rice gaps run past the end of {self.numel} elements")


Positions = MaskPositions | NMPositions


def smallest_positions(keep: np.ndarray, shape: tuple[int, ...], bits: int) -> Positions:
    """The exact position layout with the fewest bytes, values included."""
    best: Positions = MaskPositions.from_mask(keep)
    best_bytes = best.nbytes + (int(keep.sum()) * bits + 7) // 8
    nm = detect_nm(keep, shape)
    if nm is not None:
        n, m, axis = nm
        groups = keep.size // m
        nm_bytes = NMPositions.code_bytes(groups, n, m) + (groups * n * bits + 7) // 8
        if nm_bytes < best_bytes:
            best = NMPositions.from_mask(keep, shape, n, m, axis)
    return best


def position_streams(positions: Positions) -> dict[str, np.ndarray | torch.Tensor]:
    if isinstance(positions, NMPositions):
        return {"codes": positions.codes}
    streams: dict[str, np.ndarray | torch.Tensor] = {"positions": positions.positions}
    if positions.remainders is not None:
        streams["remainders"] = positions.remainders
    return streams
