"""N:M positions: at most N nonzeros in every group of M consecutive weights, one code per group.

A weight with N:M semi-structured sparsity (2:4 is what NVIDIA's sparse tensor cores run; Mishra
et al., "Accelerating Sparse Deep Neural Networks", 2021) is viewed as G = numel / M groups of M
consecutive elements along its last dimension, row-major ("N:M"), or, for a matrix stored
[in, out] such as transformers' Conv1D, along its first dimension, i.e. the last dimension of
its transpose ("N:M@0", groups in the transpose's row-major order). Every group keeps exactly N
*slots*:
its nonzeros, topped up with its lowest-index zeros when it has fewer than N (those slots then
store an exact 0, so decoding never has to tell them apart).

The slots of a group are one of the C = binom(M, N) N-subsets of range(M); the code of a group is
that subset's rank in lexicographic order. Codes are packed base C into little-endian words of
W = 1, 2, 4 or 8 bytes, P = floor(log_C(2^(8W))) codes per word (word j holds groups jP ..
jP + P - 1 as sum_i code_i * C^i), with the W that spends the fewest bits per group (the
smallest on ties). 2:4: C = 6, one byte holds 3 groups: 2.67 bits per group, against 4 for a
bitmask and log2(6) = 2.58 for the entropy of an arbitrary 2:4 pattern. 2:8: C = 28, 13 groups
per 8-byte word: 4.92 bits per group (entropy 4.81). The stream is the words' bytes (uint8).

Values are stored beside the codes in the order of `linear_indices()`: group by group (row-major
for "N:M", so increasing; column by column for "N:M@0").
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = ["NMPositions", "detect_nm", "parse_layout"]

GROUP_SIZES = (4, 8, 16)  # M values tried by detect_nm, most common first


@cache
def _subsets(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(slot table [C, n] int64 in rank order, rank of each m-bit pattern [2^m] int64; -1 if
    the pattern does not have exactly n bits set)."""
    table = np.array(list(itertools.combinations(range(m), n)), dtype=np.int64).reshape(-1, n)
    rank = np.full(1 << m, -1, dtype=np.int64)
    rank[(1 << table).sum(axis=1)] = np.arange(table.shape[0])
    return table, rank


@cache
def _word(n: int, m: int) -> tuple[int, int]:
    """(bytes per word W, codes per word P) for binom(m, n) codes; see the module docstring."""
    count = math.comb(m, n)
    best: tuple[float, int, int] | None = None
    for width in (1, 2, 4, 8):
        per = 0
        while count ** (per + 1) <= 2 ** (8 * width):
            per += 1
        if per and (best is None or 8 * width / per < best[0]):
            best = (8 * width / per, width, per)
    assert best is not None  # count <= binom(16, 8) fits a 2-byte word
    return best[1], best[2]


def _groups(keep: np.ndarray, shape: tuple[int, ...], m: int, axis: int) -> np.ndarray | None:
    """The flat mask as [groups, m] along `axis` (-1, or 0 for a matrix); None if it does not
    divide into groups of m."""
    if axis == -1:
        return keep.reshape(-1, m) if shape and shape[-1] % m == 0 else None
    if len(shape) != 2 or shape[0] % m:
        return None
    return keep.reshape(shape).T.reshape(-1, m)


def detect_nm(keep: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(N, M, axis) when the mask is N:M pruned along `axis` (-1, else 0 for a matrix): every
    group of M keeps at most N <= M / 2 entries, and the groups are nearly full (density
    >= 0.9 N / M).

    The fill rule keeps a sparse random mask (at 10 %, every group of 16 may well keep <= 8)
    from passing as 8:16. `keep` is the flat bool mask of a tensor of `shape`. The smallest M of
    GROUP_SIZES wins (2:4 before 4:8), the last dimension before the first.
    """
    if keep.size == 0:
        return None
    density = float(keep.sum()) / keep.size
    for axis in (-1, 0):
        for m in GROUP_SIZES:
            if density * m / 0.9 < 1 or density > 0.5:  # no N >= 1 could be that full
                continue
            groups = _groups(keep, shape, m, axis)
            if groups is None:
                continue
            n = int(groups.sum(axis=1).max())
            if 1 <= n <= m // 2 and density >= 0.9 * n / m:
                return n, m, axis
    return None


def parse_layout(layout: str) -> tuple[int, int, int] | None:
    """ "2:4" -> (2, 4, -1), "2:4@0" -> (2, 4, 0); None for other layouts."""
    body, _, axis = layout.partition("@")
    n, colon, m = body.partition(":")
    if not colon or not n.isdigit() or not m.isdigit() or axis not in ("", "0"):
        return None
    return int(n), int(m), 0 if axis else -1


@dataclass(frozen=True, eq=False)
class NMPositions:
    """Kept slots of an N:M tensor; see the module docstring for the layout.

    `codes`: the bytes of the packed base-binom(M, N) code words. `shape`: the
    dense shape (its dimension `axis` is a multiple of M). `axis`: -1, or 0 for a matrix.
    """

    shape: tuple[int, ...]
    n: int
    m: int
    codes: np.ndarray
    axis: int = -1

    @property
    def kind(self) -> str:
        return f"{self.n}:{self.m}" + ("@0" if self.axis == 0 else "")

    @property
    def groups(self) -> int:
        return math.prod(self.shape) // self.m

    @property
    def entries(self) -> int:
        """Stored slots: N per group."""
        return self.groups * self.n

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes)

    @staticmethod
    def code_bytes(groups: int, n: int, m: int) -> int:
        """Bytes of the codes for `groups` groups, without building them."""
        width, per = _word(n, m)
        return -(-groups // per) * width

    @classmethod
    def from_mask(
        cls, keep: np.ndarray, shape: tuple[int, ...], n: int, m: int, axis: int = -1
    ) -> NMPositions:
        """Codes for the flat bool mask `keep` of a tensor of `shape`; every group of M along
        `axis` must keep at most N (ValueError otherwise)."""
        if not 1 <= n < m or m > 16:
            raise ValueError(f"N:M needs 1 <= N < M <= 16, got {n}:{m}")
        groups = _groups(keep, shape, m, axis)
        if groups is None:
            raise ValueError(f"{shape} does not divide into groups of {m} along axis {axis}")
        if groups.size and int(groups.sum(axis=1).max()) > n:
            raise ValueError(f"a group keeps more than {n} of {m} entries")
        # Kept slots first, then the lowest-index zeros: a stable sort on "not kept".
        chosen = np.sort(np.argsort(~groups, axis=1, kind="stable")[:, :n], axis=1)
        table, rank = _subsets(n, m)
        code = rank[(1 << chosen).sum(axis=1)].astype(np.uint64)
        width, per = _word(n, m)
        padded = np.zeros(-(-code.size // per) * per, dtype=np.uint64)
        padded[: code.size] = code
        powers = np.uint64(table.shape[0]) ** np.arange(per, dtype=np.uint64)
        words = (padded.reshape(-1, per) * powers).sum(axis=1, dtype=np.uint64)
        little = words.astype(f"<u{width}")
        return cls(shape, n, m, little.view(np.uint8).copy(), axis)

    def group_codes(self) -> np.ndarray:
        """Rank of every group's slot subset, int64 [groups]."""
        count = np.uint64(math.comb(self.m, self.n))
        width, per = _word(self.n, self.m)
        words = self.codes.view(f"<u{width}").astype(np.uint64)
        powers = count ** np.arange(per, dtype=np.uint64)
        digits = (words[:, None] // powers) % count
        return digits.reshape(-1)[: self.groups].astype(np.int64)

    def linear_indices(self) -> np.ndarray:
        """Row-major linear index (in `shape`) of every kept slot, int64 [entries], in group
        order."""
        table, _ = _subsets(self.n, self.m)
        base = np.arange(self.groups, dtype=np.int64)[:, None] * self.m
        index = (base + table[self.group_codes()]).reshape(-1)
        if self.axis == -1:
            return index
        rows, cols = self.shape  # index is row-major in the transpose [cols, rows]
        return (index % rows) * cols + index // rows

    def check(self) -> None:
        """Raise ValueError naming the first broken invariant."""
        if not 1 <= self.n < self.m or self.m > 16:
            raise ValueError(f"N:M needs 1 <= N < M <= 16, got {self.n}:{self.m}")
        dims = self.shape[-1:] if self.axis == -1 else self.shape[:1]
        if self.axis not in (-1, 0) or (self.axis == 0 and len(self.shape) != 2):
            raise ValueError(f"{self.kind}: axis {self.axis} of a tensor of shape {self.shape}")
        if not dims or dims[0] % self.m:
            raise ValueError(f"{self.shape} does not divide into groups of {self.m}")
        size = self.code_bytes(self.groups, self.n, self.m)
        if self.codes.dtype != np.uint8 or self.codes.shape != (size,):
            raise ValueError(
                f"{self.kind} codes must be uint8 [{size}], "
                f"got {self.codes.dtype} {list(self.codes.shape)}"
            )
        count = math.comb(self.m, self.n)
        width, per = _word(self.n, self.m)
        words = self.codes.view(f"<u{width}").astype(np.uint64)
        if words.size and int(words.max()) >= count**per:
            raise ValueError(f"{self.kind} code word out of range (>= {count}^{per})")
