"""Positions of the compact codec's entries: how `Compact` stores where its nonzeros are.

Three kinds (the layouts are described in ticketc.formats.compact):
- "rice": the gaps between linear indices, Golomb-Rice coded (ticketc.formats.rice): a unary
  stream plus k remainder bit planes;
- "bitmask": one bit per covered element, packed little-endian;
- "dense": nothing stored, every element is an entry.
The rice and bitmask streams end in at least one clear bit, which the in-graph decoder
(ticketc.export.portable) needs. Positions cover the `head` elements before a dense tail only.
"""

from __future__ import annotations

import math

import numpy as np

from ticketc.formats import rice

__all__ = [
    "POSITIONS_KINDS",
    "check_positions",
    "decode_positions",
    "encode_positions",
    "mask_entropy_bits",
    "positions_nbytes",
]

POSITIONS_KINDS = ("rice", "bitmask", "dense")


def mask_entropy_bits(numel: int, nnz: int) -> float:
    """numel * H(nnz / numel): the fewest bits any code can spend on a random mask's positions."""
    if numel < 0 or not 0 <= nnz <= numel:
        raise ValueError(f"need 0 <= nnz <= numel, got nnz={nnz}, numel={numel}")
    if nnz in (0, numel):
        return 0.0
    d = nnz / numel
    return numel * -(d * math.log2(d) + (1 - d) * math.log2(1 - d))


def positions_nbytes(kind: str, index: np.ndarray, total: int, rice_k: int | None) -> int:
    """Bytes `kind` spends on the sorted linear indices `index` (int64) of `total` elements,
    before the terminating clear byte; rice_k None: the best k for these gaps."""
    if kind == "dense":
        return 0
    if kind == "bitmask":
        return (total + 7) // 8
    gaps = np.diff(index, prepend=-1)
    return rice.nbytes(gaps, rice_k or rice.best_k(gaps))


def encode_positions(
    kind: str, index: np.ndarray, total: int, rice_k: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(positions uint8 [bytes], rice remainder planes uint8 [k, ceil(m / 8)] or None) for the
    sorted linear indices `index` (int64 [m]) among the first `total` elements."""
    remainders = None
    if kind == "rice":
        gaps = np.diff(index, prepend=-1)
        data, remainders = rice.encode(gaps, rice_k or rice.best_k(gaps))
    elif kind == "bitmask":
        bits = np.zeros(total, dtype=bool)
        bits[index] = True
        data = np.packbits(bits, bitorder="little")
    else:
        data = np.zeros(0, dtype=np.uint8)
    if kind != "dense" and 8 * data.size == index.size:
        # every stored bit is set: one clear byte after them, which the in-graph decoder
        # needs (ticketc.export.portable)
        data = np.append(data, np.uint8(0))
    return data, remainders


def decode_positions(
    kind: str, positions: np.ndarray, remainders: np.ndarray | None, head: int, total: int
) -> np.ndarray:
    """Linear index of every entry, int64 [m]: the stored positions of the first `head`
    elements, then every element of the dense tail up to `total`."""
    if kind == "dense":
        return np.arange(total, dtype=np.int64)
    tail = np.arange(head, total, dtype=np.int64)
    if kind == "bitmask":
        bits = np.unpackbits(positions, bitorder="little")[:head]
        return np.concatenate([np.flatnonzero(bits).astype(np.int64), tail])
    assert remainders is not None
    return np.concatenate([rice.decode(positions, remainders), tail])


def check_positions(
    kind: str, positions: np.ndarray, remainders: np.ndarray | None, head: int, count: int
) -> None:
    """Raise ValueError naming the first broken invariant of `count` coded entries among the
    first `head` elements (the sizes, padding bits and terminators of the streams)."""
    if positions.dtype != np.uint8 or positions.ndim != 1:
        raise ValueError(f"{kind} positions must be a 1-D uint8 array")
    if kind != "rice" and remainders is not None:
        raise ValueError(f"remainders are only stored for rice positions, not {kind}")
    if kind == "dense" and positions.size:
        raise ValueError("dense positions store no bytes")
    if kind == "bitmask":
        size = (head + 7) // 8
        if positions.size != size + (8 * size == count):
            raise ValueError(f"bitmask must be {size} bytes (+1 when every bit is set)")
        if np.unpackbits(positions, bitorder="little")[head:].any():
            raise ValueError("bitmask has bits set past the last element")
    if kind == "rice":
        planes = remainders
        if planes is None or planes.dtype != np.uint8 or planes.ndim != 2:
            raise ValueError("rice positions need uint8 remainder planes [k, ceil(m / 8)]")
        if not 1 <= planes.shape[0] <= rice.MAX_K or planes.shape[1] != (count + 7) // 8:
            raise ValueError(
                f"rice remainder planes must be [1 <= k <= {rice.MAX_K}, {(count + 7) // 8}],"
                f" got {list(planes.shape)}"
            )
        if np.unpackbits(planes, axis=1, bitorder="little")[:, count:].any():
            raise ValueError("rice remainder planes have bits set past the last entry")
        if int(np.unpackbits(positions, bitorder="little").sum()) != count:
            raise ValueError("rice unary stream must hold one terminator per entry")
