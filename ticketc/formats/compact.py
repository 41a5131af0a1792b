"""Compact: the file codec for pruned weights (the nonzeros of one or several tensors, one stream).

Layout. K tensors (shapes S_t, n_t elements) are laid end to end in one flat space of
N = sum n_t elements; tensor t starts at O_t = sum_{u<t} n_u. The stored *entries* are the
tensors' nonzeros in order of their linear (row-major) index p in that space, so one stream,
and one decoder in the ONNX graph, serves all K tensors (ticketc.export.portable).

Positions of the entries:
- "rice": the gaps g_i = p_i - p_{i-1} (p_{-1} = -1) Golomb-Rice coded with one parameter k
  (ticketc.formats.rice): a unary stream in `positions`, k remainder bit planes in
  `remainders`. Within a few percent of the mask's entropy at the densities pruning gives.
- "bitmask": N bits packed little-endian into bytes (the choice from ~30 % density up).
Both bit streams end in at least one clear bit (a zero byte is appended when every stored
bit is set): the in-graph decoder sends clear bits past the last entry.
- "dense": no positions: every element is an entry, zeros included (they decode to exactly 0).
A "rice" or "bitmask" stream may end in a *dense tail*: its last `dense_tail` tensors store no
positions (every element an entry, as "dense"), and the positions cover the elements before
them only, so a fully dense bias in a group of sparse matrices costs its values alone.

Values, one per entry:
- "fp64", "fp32", "bf16", "fp16": the numbers themselves in that type (exact when the type
  holds them; fp16 rounds to nearest otherwise);
- "int8": symmetric codes (zero point 0, so 0 is exact) times an fp16 scale, one per row
  (S_t[0] rows) or one per tensor (`scale_rows[t]`), rounded *up* so no code clips: every
  decoded value is within scale / 2 of the original;
- "int4": 4-bit codes into a per-tensor fp16 codebook of at most 16 entries (1-D k-means over
  the tensor's nonzeros, as in Deep Compression, Han et al. 2016; a tensor with at most 16
  distinct values keeps them). Two codes per byte: with h = ceil(m / 2), byte j holds entry j
  in its low nibble and entry j + h in its high nibble. With "dense" positions a tensor that
  has zeros gets an exact 0.0 entry that only its zeros take.

Per tensor: `numel` and `entries` (int64 [K]), and `scale_rows` (int8) or `codebook_sizes`
(int4) (int64 [K]), so a decoder finds each entry's tensor, scale and codebook.

`to_dense()` here and the ONNX decoder compute the same floats: values widen to float32
(float64 for fp64) and int8 multiplies code by scale once, in float32.

This file holds the `Compact` value (from_dense / to_dense / check / nbytes); the position
streams are coded and checked in `compact_positions.py`, the values and their side arrays in
`compact_values.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

from ticketc.formats.compact_positions import (
    POSITIONS_KINDS,
    check_positions,
    decode_positions,
    encode_positions,
    mask_entropy_bits,
    positions_nbytes,
)
from ticketc.formats.compact_values import (
    FLOAT_KINDS,
    VALUE_BITS,
    VALUES_KINDS,
    check_values,
    encode_values,
    int4_codes,
    values_nbytes,
)

__all__ = ["Compact"]


def _as_array(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: go through its bits
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    if isinstance(tensor, np.ndarray):
        return tensor
    raise TypeError(f"expected a torch.Tensor or numpy array, got {type(tensor).__name__}")


@dataclass(frozen=True, eq=False)
class Compact:
    """The entries of K tensors in one stream; see the module docstring for the encoding.

    `positions`: uint8, the rice unary stream or the bitmask (empty for "dense").
    `remainders`: rice only, uint8 bit planes [k, ceil(m / 8)] for m entries.
    `values`: one per entry in the kind's dtype; int4: uint8 bytes of two packed codes.
    `numel`, `entries`: int64 [K]. `scale` (int8): fp16, `scale_rows[t]` per tensor, in tensor
    order. `codebook` (int4): fp16, `codebook_sizes[t]` entries per tensor, each part sorted.
    """

    shapes: tuple[tuple[int, ...], ...]
    positions_kind: str
    positions: np.ndarray
    values_kind: str
    values: np.ndarray
    entries: np.ndarray
    remainders: np.ndarray | None = None
    scale: np.ndarray | None = None
    scale_rows: np.ndarray | None = None
    codebook: np.ndarray | None = None
    codebook_sizes: np.ndarray | None = None
    dense_tail: int = 0  # the last tensors, every element an entry, positions not stored

    def __post_init__(self) -> None:
        shapes = tuple(tuple(int(s) for s in shape) for shape in self.shapes)
        object.__setattr__(self, "shapes", shapes)
        if self.positions_kind not in POSITIONS_KINDS:
            raise ValueError(
                f"positions kind {self.positions_kind!r} is not one of {POSITIONS_KINDS}"
            )
        if self.values_kind not in VALUES_KINDS:
            raise ValueError(f"values kind {self.values_kind!r} is not one of {VALUES_KINDS}")
        if self.dense_tail and (
            self.positions_kind == "dense" or not 0 < self.dense_tail < len(shapes)
        ):
            raise ValueError(
                f"dense_tail={self.dense_tail} needs rice or bitmask positions and fewer than "
                f"{len(shapes)} tensors"
            )

    # ----------------------------------------------------------------------------- encode
    @classmethod
    def from_dense(
        cls,
        tensors: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray,
        values: str = "fp32",
        positions: str = "auto",
        rice_k: int | None = None,
        dense_tail: int = 0,
    ) -> Compact:
        """Encode the nonzeros of one tensor or a sequence of tensors (each of rank >= 1).

        values: one of VALUES_KINDS. positions: one of POSITIONS_KINDS, or "auto" for the
        fewest bytes. rice_k: the Rice parameter (default: the best for these gaps).
        dense_tail: how many of the last tensors store every element and no positions (with
        "rice" or "bitmask" positions; "auto" then picks between those two).
        Raises ValueError when a value does not fit the kind (|x| above fp16's 65504 for fp16,
        int8 scales or int4 codebooks), when a tensor has rank 0, or on an unknown kind.
        """
        if values not in VALUES_KINDS:
            raise ValueError(f"values={values!r} is not one of {VALUES_KINDS}")
        if positions != "auto" and positions not in POSITIONS_KINDS:
            raise ValueError(f"positions={positions!r} is not one of {POSITIONS_KINDS} or 'auto'")
        if isinstance(tensors, torch.Tensor | np.ndarray):
            tensors = [tensors]
        arrays = [_as_array(t) for t in tensors]
        if not arrays:
            raise ValueError("Compact needs at least one tensor")
        if any(a.ndim == 0 for a in arrays):
            raise ValueError("Compact needs tensors of rank >= 1, got a 0-d tensor")
        shapes = tuple(tuple(a.shape) for a in arrays)
        numel = np.array([a.size for a in arrays], dtype=np.int64)
        flats = [a.reshape(-1) for a in arrays]
        if dense_tail and not 0 < dense_tail < len(arrays):
            raise ValueError(f"dense_tail={dense_tail} must lie in [0, {len(arrays)})")
        head = len(arrays) - dense_tail
        local = [np.flatnonzero(f != 0) for f in flats[:head]]
        local += [np.arange(f.size) for f in flats[head:]]
        offsets = np.concatenate([[0], np.cumsum(numel)[:-1]]).astype(np.int64)
        index = np.concatenate([i + o for i, o in zip(local[:head], offsets[:head], strict=True)])
        total = int(numel[:head].sum())  # the elements the positions cover

        if positions == "auto":
            positions = min(
                POSITIONS_KINDS[:2] if dense_tail else POSITIONS_KINDS,
                key=lambda kind: (
                    positions_nbytes(kind, index, total, rice_k)
                    + values_nbytes(values, total if kind == "dense" else index.size)
                ),
            )
        if positions == "dense":
            if dense_tail:
                raise ValueError("dense_tail needs rice or bitmask positions")
            local = [np.arange(f.size) for f in flats]
            index = np.arange(total, dtype=np.int64)
        entries = np.array([i.size for i in local], dtype=np.int64)
        position_data, remainders = encode_positions(positions, index, total, rice_k)

        picked = [f[i] for f, i in zip(flats, local, strict=True)]
        with_zero = [positions == "dense" or t >= head for t in range(len(arrays))]
        value_data, scale, scale_rows, codebook, codebook_sizes = encode_values(
            values, picked, local, shapes, with_zero
        )
        return cls(
            shapes,
            positions,
            position_data,
            values,
            value_data,
            entries,
            remainders,
            scale,
            scale_rows,
            codebook,
            codebook_sizes,
            dense_tail,
        )

    # ----------------------------------------------------------------------------- decode
    @property
    def numel(self) -> np.ndarray:
        """Elements per tensor, int64 [K]."""
        return np.array([math.prod(s) for s in self.shapes], dtype=np.int64)

    @property
    def total(self) -> int:
        """Elements of all tensors: N."""
        return int(self.numel.sum())

    @property
    def offsets(self) -> np.ndarray:
        """Start of each tensor in the flat space, int64 [K]."""
        return np.concatenate([[0], np.cumsum(self.numel)[:-1]]).astype(np.int64)

    @property
    def work_dtype(self) -> np.dtype:
        """The float type entries decode to: float64 for fp64 values, float32 otherwise."""
        return np.dtype(np.float64 if self.values_kind == "fp64" else np.float32)

    @property
    def head_total(self) -> int:
        """Elements the positions cover: all but the dense tail's."""
        return int(self.numel[: len(self.shapes) - self.dense_tail].sum())

    @property
    def rice_k(self) -> int | None:
        return None if self.remainders is None else int(self.remainders.shape[0])

    def linear_indices(self) -> np.ndarray:
        """Index of every entry in the flat space of all tensors, int64 [m]."""
        return decode_positions(
            self.positions_kind, self.positions, self.remainders, self.head_total, self.total
        )

    def tensor_of_entries(self) -> np.ndarray:
        """The tensor (0..K-1) each entry belongs to, int64 [m]."""
        return np.repeat(np.arange(len(self.shapes), dtype=np.int64), self.entries)

    def entry_values(self) -> np.ndarray:
        """Every entry's value in `work_dtype`, dequantised the way the ONNX decoder does it."""
        if self.values_kind in FLOAT_KINDS:
            return self.values.astype(self.work_dtype)
        tensor = self.tensor_of_entries()
        if self.values_kind == "int8":
            assert self.scale is not None and self.scale_rows is not None
            local = self.linear_indices() - self.offsets[tensor]
            row_length = self.numel // np.maximum(self.scale_rows, 1)
            first_scale = np.concatenate([[0], np.cumsum(self.scale_rows)[:-1]])
            row = first_scale[tensor] + local // np.maximum(row_length[tensor], 1)
            return self.values.astype(np.float32) * self.scale.astype(np.float32)[row]
        assert self.codebook is not None and self.codebook_sizes is not None
        first_code = np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]])
        codes = self.codes()
        return self.codebook.astype(np.float32)[first_code[tensor] + codes]

    def codes(self) -> np.ndarray:
        """int4 only: the code of every entry, int64 [m]."""
        return int4_codes(self.values, int(self.entries.sum()))

    def to_dense(self) -> list[np.ndarray]:
        """Every tensor, dense and in its shape, in `work_dtype` (dequantised for int8/int4)."""
        flat = np.zeros(self.total, dtype=self.work_dtype)
        flat[self.linear_indices()] = self.entry_values()
        bounds = np.cumsum(self.numel)[:-1]
        return [
            part.reshape(s) for part, s in zip(np.split(flat, bounds), self.shapes, strict=True)
        ]

    def nnz(self) -> np.ndarray:
        """Nonzeros per tensor, int64 [K], read from the stored positions and codes.

        For "rice" and "bitmask" every entry is a nonzero of the source. For "dense" an entry
        counts unless its stored value is zero: a 0 value, int8 code 0 or int4 code of a 0.0
        codebook entry (a source value that quantises to 0 is not counted).
        """
        if self.positions_kind != "dense" and not self.dense_tail:
            return self.entries.copy()
        tensor = self.tensor_of_entries()
        if self.values_kind == "int4":
            assert self.codebook is not None and self.codebook_sizes is not None
            first_code = np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]])
            zero = self.codebook[first_code[tensor] + self.codes()] == 0
        else:
            zero = self.values == 0
        # a sparse tensor's entries are its nonzeros: only the dense ones' stored zeros count
        zero &= tensor >= len(self.shapes) - self.dense_tail if self.dense_tail else True
        return np.bincount(tensor[~zero], minlength=len(self.shapes)).astype(np.int64)

    # ----------------------------------------------------------------------------- sizes
    @property
    def side_nbytes(self) -> int:
        """Bytes of the int8 scales or the int4 codebooks."""
        return sum(a.nbytes for a in (self.scale, self.codebook) if a is not None)

    @property
    def table_nbytes(self) -> int:
        """Bytes of the per-tensor tables a decoder reads (numel, entries, scale rows, ...)."""
        tables = 2 + (self.scale_rows is not None) + (self.codebook_sizes is not None)
        return 8 * len(self.shapes) * tables

    @property
    def nbytes(self) -> int:
        """Exact bytes of every stored array: positions (+ remainders), values, side info and
        the per-tensor tables."""
        positions = self.positions.nbytes
        if self.remainders is not None:
            positions += self.remainders.nbytes
        return int(positions + self.values.nbytes + self.side_nbytes + self.table_nbytes)

    def nbytes_per_tensor(self) -> np.ndarray:
        """Each tensor's share of `nbytes` (float64 [K]): its positions, values, side info and
        table rows. Rice bits are attributed exactly; byte padding is spread by size."""
        k = len(self.shapes)
        share = np.zeros(k, dtype=np.float64)
        tensor = self.tensor_of_entries()
        head = k - self.dense_tail
        if self.positions_kind == "bitmask":
            share[:head] += self.numel[:head] / 8
        elif self.positions_kind == "rice":
            assert self.remainders is not None
            coded = int(self.entries[:head].sum())
            index = self.linear_indices()[:coded]
            gaps = np.diff(index, prepend=-1)
            bits = 1 + ((gaps - 1) >> self.remainders.shape[0]) + self.remainders.shape[0]
            share += np.bincount(tensor[:coded], weights=bits, minlength=k) / 8
        share += self.entries * VALUE_BITS[self.values_kind] / 8
        if self.scale_rows is not None:
            share += 2 * self.scale_rows
        if self.codebook_sizes is not None:
            share += 2 * self.codebook_sizes
        share += self.table_nbytes / k
        return share * (self.nbytes / share.sum()) if share.sum() else share

    def entropy_bound_bits(self) -> float:
        """The size floor for this value kind, in bits: per tensor numel * H(density) for the
        positions plus value bits per nonzero (side info not counted)."""
        bits = 0.0
        for n, z in zip(self.numel, self.nnz(), strict=True):
            bits += mask_entropy_bits(int(n), int(z)) + int(z) * VALUE_BITS[self.values_kind]
        return bits

    # ----------------------------------------------------------------------------- check
    def check(self) -> None:
        """Raise ValueError naming the first broken invariant."""
        k = len(self.shapes)
        if k == 0 or any(len(s) == 0 or min(s) < 0 for s in self.shapes):
            raise ValueError(f"Compact shapes must be non-empty, of rank >= 1, got {self.shapes}")
        if self.entries.shape != (k,) or self.entries.dtype != np.int64:
            raise ValueError(f"entries must be int64 [{k}], got {self.entries.dtype}")
        if (self.entries < 0).any() or (self.entries > self.numel).any():
            raise ValueError("entries per tensor must lie in [0, numel]")
        count = int(self.entries.sum())
        head = k - self.dense_tail
        if not np.array_equal(self.entries[head:], self.numel[head:]):
            raise ValueError("every element of a dense-tail tensor must be an entry")
        check_positions(
            self.positions_kind,
            self.positions,
            self.remainders,
            self.head_total,
            int(self.entries[:head].sum()),
        )
        index = self.linear_indices()
        if index.size != count:
            raise ValueError(f"positions hold {index.size} entries, the tables say {count}")
        if count and (np.diff(index) <= 0).any():
            raise ValueError("positions must be strictly increasing")
        if count and int(index[-1]) >= self.total:
            raise ValueError(f"positions run past the end of {self.total} elements")
        ends = np.cumsum(self.numel)
        per_tensor = np.searchsorted(ends, index, side="right")
        if not np.array_equal(np.bincount(per_tensor, minlength=k), self.entries):
            raise ValueError("entries per tensor disagree with the positions")
        check_values(
            self.values_kind,
            self.values,
            self.shapes,
            self.entries,
            scale=self.scale,
            scale_rows=self.scale_rows,
            codebook=self.codebook,
            codebook_sizes=self.codebook_sizes,
        )
