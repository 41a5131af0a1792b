"""Compact: the file codec for pruned weights (positions as index gaps or a bitmask, small values).

Positions. The nonzeros' linear (row-major) indices p_0 < p_1 < ... are stored either as gaps
g_i = p_i - p_{i-1} (p_{-1} = -1, so g_i >= 1) written as g_i - 1 in uint8 ("gap8", gaps up to
256) or uint16 ("gap16", up to 65536), or as a bitmask of numel bits packed little-endian into
bytes. A gap too large for its type is bridged by *filler* entries: a maximal gap whose value
decodes to exactly 0, so decoding never needs to tell fillers apart. Or Golomb-Rice coded
gaps ("rice", see ticketc.formats.rice: a unary stream in `positions` plus k remainder bit
planes in `remainders`), which comes within a few percent of the mask's entropy and needs no
fillers.

Values. "fp32" (bit-exact), "fp16", "int8" (symmetric, zero point 0, one fp16 scale per row
shape[0]) or "int4" (a 16-entry fp16 codebook from 1-D k-means over the nonzeros, as in Deep
Compression; two codes per byte: with h = ceil(entries / 2), byte k holds entry k in its low
nibble and entry k + h in its high nibble, so the decoder unpacks with one Concat). When
fillers exist one int4 entry is reserved for 0.0; int8 zero is exact anyway.

The same arrays feed the in-graph ONNX decoder (ticketc.export.portable), so `to_dense()` here
and the ONNX decode compute the same floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ticketc.formats import rice
from ticketc.formats.quantize import assign_nearest, int8_rows, kmeans_1d

__all__ = [
    "POSITIONS_KINDS",
    "VALUES_KINDS",
    "Compact",
    "mask_entropy_bits",
]

POSITIONS_KINDS = ("gap8", "gap16", "bitmask", "rice")
VALUES_KINDS = ("fp32", "fp16", "int8", "int4")

_MAX_GAP = {"gap8": 2**8, "gap16": 2**16}
_GAP_DTYPE = {"gap8": np.uint8, "gap16": np.uint16}
_VALUE_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
_VALUE_DTYPE = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8, "int4": np.uint8}
_CODEBOOK_SIZE = 16


def mask_entropy_bits(numel: int, nnz: int) -> float:
    """numel * H(nnz / numel): the fewest bits any code can spend on a random mask's positions."""
    if numel < 0 or not 0 <= nnz <= numel:
        raise ValueError(f"need 0 <= nnz <= numel, got nnz={nnz}, numel={numel}")
    if nnz in (0, numel):
        return 0.0
    d = nnz / numel
    return numel * -(d * math.log2(d) + (1 - d) * math.log2(1 - d))


def _value_bytes(kind: str, entries: int) -> int:
    return (entries * _VALUE_BITS[kind] + 7) // 8


def _gaps(index: np.ndarray) -> np.ndarray:
    """Gaps g_i = p_i - p_{i-1} with p_{-1} = -1 (all >= 1 for strictly increasing p)."""
    return np.diff(index, prepend=-1)


def _entries(gaps: np.ndarray, max_gap: int) -> int:
    """Stored entries (nonzeros plus fillers) when gaps above max_gap are bridged."""
    return int(gaps.size + ((gaps - 1) // max_gap).sum())


def _bridge(gaps: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """(stored gaps, slot of each real nonzero), with max_gap fillers bridging long gaps."""
    fillers = (gaps - 1) // max_gap
    slot = np.cumsum(fillers + 1) - 1  # the last entry of each group is the real nonzero
    stored = np.full(int(slot[-1]) + 1 if slot.size else 0, max_gap, dtype=np.int64)
    stored[slot] = gaps - fillers * max_gap
    return stored, slot


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    codes = np.concatenate([packed & 0x0F, packed >> 4])
    return codes[:count]


@dataclass(frozen=True, eq=False)
class Compact:
    """A pruned weight in compact form; see the module docstring for the encoding.

    `positions`: uint8/uint16 gaps minus one (gap kinds), packed mask bits (bitmask) or the
    unary stream (rice, whose `remainders` holds uint8 bit planes [k, ceil(entries / 8)]).
    `values`: one entry per stored position (fillers included) as float32 / float16 / int8, or
    for int4 the uint8 bytes of two packed codes. `scale` (int8 only): fp16 [shape[0]].
    `codebook` (int4 only): fp16 [16], sorted. `nnz`: real nonzeros of the source, fillers not
    counted.
    """

    shape: tuple[int, ...]
    positions_kind: str
    positions: np.ndarray
    values_kind: str
    values: np.ndarray
    nnz: int
    scale: np.ndarray | None = None
    codebook: np.ndarray | None = None
    remainders: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.positions_kind not in POSITIONS_KINDS:
            raise ValueError(
                f"positions kind {self.positions_kind!r} is not one of {POSITIONS_KINDS}"
            )
        if self.values_kind not in VALUES_KINDS:
            raise ValueError(f"values kind {self.values_kind!r} is not one of {VALUES_KINDS}")

    # ----------------------------------------------------------------------------- encode
    @classmethod
    def from_dense(
        cls, dense: torch.Tensor | np.ndarray, values: str = "fp32", positions: str = "auto"
    ) -> Compact:
        """Encode the nonzeros of `dense` (rank >= 1).

        values: "fp32" | "fp16" | "int8" | "int4". positions: "gap8" | "gap16" | "bitmask" |
        "rice", or "auto" for whichever of them stores this tensor in the fewest total bytes.
        """
        if values not in VALUES_KINDS:
            raise ValueError(f"values={values!r} is not one of {VALUES_KINDS}")
        if positions != "auto" and positions not in POSITIONS_KINDS:
            raise ValueError(f"positions={positions!r} is not one of {POSITIONS_KINDS} or 'auto'")
        if isinstance(dense, torch.Tensor):
            array = dense.detach().to("cpu", torch.float32).numpy()
        elif isinstance(dense, np.ndarray):
            array = dense.astype(np.float32, copy=False)
        else:
            raise TypeError(
                f"dense must be a torch.Tensor or numpy array, got {type(dense).__name__}"
            )
        if array.ndim == 0:
            raise ValueError("Compact needs a tensor of rank >= 1, got a 0-d tensor")
        shape = tuple(array.shape)
        flat = array.reshape(-1)
        index = np.flatnonzero(flat)
        nnz = int(index.size)
        gaps = _gaps(index)

        entries = {kind: _entries(gaps, _MAX_GAP[kind]) for kind in ("gap8", "gap16")}
        if positions == "auto":
            sizes = {
                "gap8": entries["gap8"] + _value_bytes(values, entries["gap8"]),
                "gap16": 2 * entries["gap16"] + _value_bytes(values, entries["gap16"]),
                "bitmask": (flat.size + 7) // 8 + _value_bytes(values, nnz),
                "rice": rice.nbytes(gaps, rice.best_k(gaps)) + _value_bytes(values, nnz),
            }
            positions = min(sizes, key=sizes.__getitem__)  # ties: the first kind listed

        remainders = None
        if positions == "bitmask":
            mask = np.zeros(flat.size, dtype=bool)
            mask[index] = True
            position_data = np.packbits(mask, bitorder="little")
            slot, n_entries = np.arange(nnz), nnz
        elif positions == "rice":
            position_data, remainders = rice.encode(gaps, rice.best_k(gaps))
            slot, n_entries = np.arange(nnz), nnz
        else:
            stored, slot = _bridge(gaps, _MAX_GAP[positions])
            position_data = (stored - 1).astype(_GAP_DTYPE[positions])
            n_entries = int(stored.size)
        has_fillers = n_entries > nnz

        nonzeros = flat[index]
        scale = codebook = None
        if values in ("fp32", "fp16"):
            value_data = np.zeros(n_entries, dtype=_VALUE_DTYPE[values])
            value_data[slot] = nonzeros
        elif values == "int8":
            rows = shape[0]
            absmax = np.abs(flat.reshape(rows, -1)).max(axis=1) if flat.size else np.zeros(rows)
            row_of = index // max(1, math.prod(shape[1:]))
            codes, scale = int8_rows(nonzeros, row_of, absmax)
            value_data = np.zeros(n_entries, dtype=np.int8)
            value_data[slot] = codes
        else:
            centroids = kmeans_1d(nonzeros, _CODEBOOK_SIZE - 1 if has_fillers else _CODEBOOK_SIZE)
            if has_fillers:
                centroids = np.append(centroids, 0.0)
            codebook = np.sort(centroids.astype(np.float16))
            if codebook.size == 0:
                codebook = np.zeros(_CODEBOOK_SIZE, dtype=np.float16)
            elif codebook.size < _CODEBOOK_SIZE:  # few distinct values: pad with unused copies
                codebook = np.pad(codebook, (0, _CODEBOOK_SIZE - codebook.size), mode="edge")
            book = codebook.astype(np.float64)
            codes = np.full(n_entries + (n_entries & 1), 0, dtype=np.uint8)
            if has_fillers:
                codes[:n_entries] = int(np.flatnonzero(book == 0.0)[0])
            codes[slot] = assign_nearest(nonzeros, book)
            half = codes.size // 2
            value_data = (codes[:half] | (codes[half:] << 4)).astype(np.uint8)
        return cls(
            shape, positions, position_data, values, value_data, nnz, scale, codebook, remainders
        )

    # ----------------------------------------------------------------------------- decode
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def entries(self) -> int:
        """Stored entries: nonzeros plus gap fillers."""
        if self.positions_kind in ("bitmask", "rice"):  # one set bit per entry
            return int(np.unpackbits(self.positions, bitorder="little").sum())
        return int(self.positions.size)

    def linear_indices(self) -> np.ndarray:
        """Row-major linear index of every stored entry (fillers included), int64."""
        if self.positions_kind == "bitmask":
            bits = np.unpackbits(self.positions, bitorder="little")[: self.numel]
            return np.flatnonzero(bits).astype(np.int64)
        if self.positions_kind == "rice":
            assert self.remainders is not None
            return rice.decode(self.positions, self.remainders)
        return np.cumsum(self.positions.astype(np.int64) + 1) - 1

    def entry_values(self) -> np.ndarray:
        """float32 value of every stored entry, dequantised the way the ONNX decoder does it."""
        count = self.entries
        if self.values_kind in ("fp32", "fp16"):
            return self.values.astype(np.float32)
        if self.values_kind == "int8":
            assert self.scale is not None
            row_len = max(1, math.prod(self.shape[1:]))
            rows = self.linear_indices() // row_len
            return self.values.astype(np.float32) * self.scale.astype(np.float32)[rows]
        assert self.codebook is not None
        return self.codebook.astype(np.float32)[_unpack_nibbles(self.values, count)]

    def to_dense(self) -> torch.Tensor:
        """The float32 dense tensor of the original shape (dequantised for int8/int4)."""
        flat = np.zeros(self.numel, dtype=np.float32)
        flat[self.linear_indices()] = self.entry_values()
        return torch.from_numpy(flat.reshape(self.shape))

    # ----------------------------------------------------------------------------- sizes
    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def side_nbytes(self) -> int:
        """Bytes of side information: the int8 scales or the int4 codebook."""
        return sum(a.nbytes for a in (self.scale, self.codebook) if a is not None)

    @property
    def nbytes(self) -> int:
        """Exact bytes of all stored arrays: positions (+ remainders) + values + side info."""
        positions = self.positions.nbytes
        if self.remainders is not None:
            positions += self.remainders.nbytes
        return int(positions + self.values.nbytes + self.side_nbytes)

    @property
    def entropy_bound_bytes(self) -> float:
        """The size floor for this value kind: mask entropy + nnz * value bits + side info."""
        value_bits = self.nnz * _VALUE_BITS[self.values_kind]
        return (mask_entropy_bits(self.numel, self.nnz) + value_bits) / 8 + self.side_nbytes

    # ----------------------------------------------------------------------------- check
    def check(self) -> None:
        """Raise ValueError naming the first broken invariant."""
        kind, numel = self.positions_kind, self.numel
        if len(self.shape) == 0 or any(s < 0 for s in self.shape):
            raise ValueError(
                f"Compact shape must have rank >= 1 and no negative dims, got {self.shape}"
            )
        if self.positions.ndim != 1 or self.values.ndim != 1:
            raise ValueError("Compact positions and values must be 1-D arrays")
        if kind == "bitmask":
            if self.positions.dtype != np.uint8 or self.positions.size != (numel + 7) // 8:
                raise ValueError(
                    f"bitmask positions must be uint8 of {(numel + 7) // 8} bytes, "
                    f"got {self.positions.dtype} of {self.positions.size}"
                )
            bits = np.unpackbits(self.positions, bitorder="little")
            if bits[numel:].any():
                raise ValueError("bitmask has bits set past numel")
        elif kind == "rice":
            self._check_rice()
        else:
            if self.positions.dtype != _GAP_DTYPE[kind]:
                raise ValueError(
                    f"{kind} positions must be {np.dtype(_GAP_DTYPE[kind])}, "
                    f"got {self.positions.dtype}"
                )
            if (
                self.positions.size
                and int(self.positions.astype(np.int64).sum()) + self.positions.size > numel
            ):
                raise ValueError(f"{kind} gaps run past the end of a tensor of {numel} elements")
        if kind != "rice" and self.remainders is not None:
            raise ValueError(f"remainders are only stored for rice positions, not {kind}")
        count = self.entries
        if not 0 <= self.nnz <= count:
            raise ValueError(f"nnz = {self.nnz} but only {count} entries are stored")
        if kind in ("bitmask", "rice") and self.nnz != count:
            raise ValueError(
                f"bitmask stores {count} entries but nnz = {self.nnz} (no fillers allowed)"
            )
        expected_dtype = np.dtype(_VALUE_DTYPE[self.values_kind])
        expected_size = (count + 1) // 2 if self.values_kind == "int4" else count
        if self.values.dtype != expected_dtype or self.values.size != expected_size:
            raise ValueError(
                f"{self.values_kind} values must be {expected_dtype} of {expected_size} entries, "
                f"got {self.values.dtype} of {self.values.size}"
            )
        want_scale = self.values_kind == "int8"
        if want_scale != (self.scale is not None):
            raise ValueError(f"scale must be present exactly for int8 values ({self.values_kind})")
        if self.scale is not None and (
            self.scale.dtype != np.float16 or self.scale.shape != (self.shape[0],)
        ):
            raise ValueError(
                f"int8 scale must be float16 [{self.shape[0]}], "
                f"got {self.scale.dtype} {self.scale.shape}"
            )
        want_codebook = self.values_kind == "int4"
        if want_codebook != (self.codebook is not None):
            raise ValueError(
                f"codebook must be present exactly for int4 values ({self.values_kind})"
            )
        if self.codebook is not None:
            if self.codebook.dtype != np.float16 or self.codebook.shape != (_CODEBOOK_SIZE,):
                raise ValueError(
                    f"int4 codebook must be float16 [16], "
                    f"got {self.codebook.dtype} {self.codebook.shape}"
                )
            if count & 1 and self.values[-1] >> 4:
                raise ValueError("int4 padding nibble of the last byte must be zero")
        if count > self.nnz and not bool((self.entry_values() == 0).sum() >= count - self.nnz):
            raise ValueError("gap fillers must decode to exactly 0")

    def _check_rice(self) -> None:
        unary, planes = self.positions, self.remainders
        if unary.dtype != np.uint8:
            raise ValueError(f"rice unary stream must be uint8, got {unary.dtype}")
        if planes is None or planes.dtype != np.uint8 or planes.ndim != 2:
            raise ValueError("rice positions need uint8 remainder planes [k, ceil(entries / 8)]")
        count = self.entries
        if not 1 <= planes.shape[0] <= rice.MAX_K or planes.shape[1] != (count + 7) // 8:
            raise ValueError(
                f"rice remainder planes must be [1 <= k <= {rice.MAX_K}, {(count + 7) // 8}], "
                f"got {list(planes.shape)}"
            )
        if np.unpackbits(planes, axis=1, bitorder="little")[:, count:].any():
            raise ValueError("rice remainder planes have bits set past the last entry")
        if count and int(rice.decode(unary, planes)[-1]) >= self.numel:
            raise ValueError(f"rice gaps run past the end of a tensor of {self.numel} elements")
