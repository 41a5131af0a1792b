"""What CSR, BSR and the tiled bitmap share: the 2-D view of a weight, the kept entries under a
mask, index dtypes, zero-padded block grids and compressed-row (crow) indices.

A weight of any rank is viewed as 2-D `(shape[0], prod(shape[1:]))`: a conv weight
`[out, in, kh, kw]` becomes `[out, in * kh * kw]`, the matrix its im2col product multiplies.
"""

from __future__ import annotations

import math
from typing import ClassVar, Self

import torch
from torch import Tensor

__all__ = [
    "INT16_MAX_COLS",
    "StoredArrays",
    "block_grid",
    "blocks_of",
    "check_crow",
    "crow_from_counts",
    "crow_from_grid",
    "crow_index_dtype",
    "masked_matrix",
    "nonempty_blocks",
    "rows_of",
    "view_2d",
]

INT16_MAX_COLS = 2**15  # column indices 0..32767 fit int16


class StoredArrays:
    """What CSR, BSR and Tiled do alike with the arrays they store: name them in the order the
    ops take them (`BUFFERS`, the buffer names of a compiled layer) and count their bytes."""

    BUFFERS: ClassVar[tuple[str, ...]]

    @classmethod
    def from_buffers(cls, shape: tuple[int, ...], buffers: dict[str, Tensor]) -> Self:
        """The weight of `shape` held in a compiled layer's buffers (named as in `BUFFERS`)."""
        return cls(shape, *(buffers[name] for name in cls.BUFFERS))  # type: ignore[call-arg]

    def buffers(self) -> dict[str, Tensor]:
        """The stored arrays by name, in the order the ops take them (`BUFFERS`)."""
        return {name: getattr(self, name) for name in self.BUFFERS}

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored arrays."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values())


def view_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D shape `(shape[0], prod(shape[1:]))` under which the formats store a weight."""
    if len(shape) == 0:
        raise ValueError("a 0-d tensor has no rows: sparse formats need at least 1 dimension")
    return shape[0], math.prod(shape[1:])


def masked_matrix(weight: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(matrix, keep): the 2-D view of `weight` and the bool matrix of the entries to store.

    Without a mask an entry is kept when it is nonzero; with `mask` (bool-like, the weight's
    shape) exactly the masked-in entries are kept, explicit zeros included. TypeError for a
    non-tensor or non-float weight, ValueError for a 0-d one or a mask of another shape.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got dtype {weight.dtype}")
    rows, cols = view_2d(tuple(weight.shape))
    matrix = weight.detach().reshape(rows, cols)
    if mask is None:
        return matrix, matrix != 0
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match weight {tuple(weight.shape)}"
        )
    return matrix, mask.detach().reshape(rows, cols).to(device=matrix.device, dtype=torch.bool)


def crow_index_dtype(nnz: int) -> torch.dtype:
    """int32 row pointers unless the count of stored entries itself overflows int32."""
    return torch.int32 if nnz < 2**31 else torch.int64


def crow_from_counts(counts: Tensor) -> Tensor:
    """Row pointers [len(counts) + 1] (0, then the running sum of `counts`) in the narrowest
    dtype that holds them (`crow_index_dtype`)."""
    crow = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow.to(crow_index_dtype(int(crow[-1])))


def rows_of(crow: Tensor) -> Tensor:
    """The row (int64) of each stored entry, from row pointers: [crow[-1]]."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), counts)


def block_grid(rows: int, cols: int, bm: int, bk: int) -> tuple[int, int]:
    """(block rows, block cols) of a rows x cols matrix zero-padded to whole bm x bk blocks."""
    return -(-rows // bm), -(-cols // bk)


def blocks_of(matrix: Tensor, bm: int, bk: int) -> Tensor:
    """[block rows, block cols, bm, bk] view of the 2-D `matrix` zero-padded to whole blocks."""
    rows, cols = matrix.shape
    mb, kb = block_grid(rows, cols, bm, bk)
    if (mb * bm, kb * bk) != (rows, cols):
        matrix = torch.nn.functional.pad(matrix, (0, kb * bk - cols, 0, mb * bm - rows))
    return matrix.reshape(mb, bm, kb, bk).transpose(1, 2)


def nonempty_blocks(keep: Tensor, bm: int, bk: int) -> Tensor:
    """[block rows, block cols] bool: which bm x bk blocks of the bool matrix `keep` (padded
    with False) hold a kept entry. The one block-occupancy count of the package: BSR and the
    tiled bitmap store these blocks, the cost model and `inspect` count them."""
    return blocks_of(keep.to(torch.uint8), bm, bk).amax(dim=(2, 3)).bool()


def crow_from_grid(nonempty: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(crow, block row, block col) of the True cells of `nonempty` [rows, cols], row-major."""
    brow, bcol = nonempty.nonzero(as_tuple=True)
    return crow_from_counts(nonempty.sum(dim=1)), brow, bcol


def check_crow(what: str, crow: Tensor, col: Tensor, rows: int, cols: int, count: int) -> None:
    """ValueError naming the first broken invariant of compressed-row indices: `crow` int32/64
    [rows + 1] running from 0 to `count` without decreasing; `col` int16/32/64 [count] in
    [0, cols), strictly increasing within a row. `what` names the format in the message."""
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what} {name} must be a 1-D tensor, got {shape}")
    if crow.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what} crow_indices dtype must be int32/int64, got {crow.dtype}")
    if col.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"{what} col_indices dtype must be int16/int32/int64, got {col.dtype}")
    if col.dtype == torch.int16 and cols > INT16_MAX_COLS:
        raise ValueError(f"{what} col_indices are int16 but there are {cols} columns (> 32768)")
    if crow.numel() != rows + 1:
        raise ValueError(
            f"{what} crow_indices has {crow.numel()} entries, expected rows + 1 = {rows + 1}"
        )
    if col.numel() != count:
        raise ValueError(f"{what} has {col.numel()} col_indices but {count} stored entries")
    crow64, col64 = crow.long(), col.long()
    if int(crow64[0]) != 0:
        raise ValueError(f"{what} crow_indices[0] must be 0, got {int(crow64[0])}")
    if int(crow64[-1]) != count:
        raise ValueError(f"{what} crow_indices[-1] = {int(crow64[-1])} but it stores {count}")
    if bool((crow64[1:] < crow64[:-1]).any()):
        raise ValueError(f"{what} crow_indices must be non-decreasing")
    if count and (int(col64.min()) < 0 or int(col64.max()) >= cols):
        raise ValueError(f"{what} col_indices out of range [0, {cols})")
    if count > 1:  # a drop in column is only allowed where a new row starts
        starts = torch.zeros(count, dtype=torch.bool, device=col.device)
        starts[crow64[:-1][crow64[:-1] < count]] = True
        if bool(((col64[1:] <= col64[:-1]) & ~starts[1:]).any()):
            raise ValueError(f"{what} col_indices must be strictly increasing within each row")
