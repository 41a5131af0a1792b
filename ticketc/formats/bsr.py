"""BSR (block sparse row) storage: CSR over square `b x b` blocks of a weight's 2-D view,
exactly as the runtime stores it.

The arrays are the buffers of a compiled bsr(b) layer and the arguments of
`torch.ops.ticketc.bsr_linear`, in that order (`BUFFERS`):

    crow_indices  int32 [ceil(M / b) + 1]   block rows
    col_indices   int32 [nblocks]           block columns
    values        [nblocks, b, b]           the weight's dtype

A block is stored when it holds a kept entry, in full: entries not kept inside it are stored as
zeros. Edge blocks are zero-padded to b x b; the op crops them (it knows M and K), `to_dense()`
crops back to the original shape. Unstructured lottery tickets rarely fit this layout: see
`block_occupancy` before choosing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ticketc.formats.layout import (
    StoredArrays,
    block_grid,
    blocks_of,
    check_crow,
    crow_from_grid,
    masked_matrix,
    nonempty_blocks,
    rows_of,
    view_2d,
)

__all__ = ["BSR", "block_occupancy", "check_blocksize"]


def check_blocksize(blocksize: int) -> None:
    """ValueError unless `blocksize` is a positive int."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")


def block_occupancy(weight: Tensor, blocksize: int) -> float:
    """Fraction of the `b x b` blocks of the weight's zero-padded 2-D view that hold a nonzero
    (the share of blocks BSR stores)."""
    check_blocksize(blocksize)
    _, keep = masked_matrix(weight, None)
    nonempty = nonempty_blocks(keep, blocksize, blocksize)
    return float(nonempty.sum()) / nonempty.numel() if nonempty.numel() else 0.0


@dataclass(frozen=True, eq=False)
class BSR(StoredArrays):
    """The blocks of a weight's 2-D view `(shape[0], -1)` that hold a kept entry.

    `crow_indices` / `col_indices` index block rows / block columns; `values` is
    `[nblocks, b, b]` in the weight's dtype.
    """

    BUFFERS: ClassVar[tuple[str, ...]] = ("crow_indices", "col_indices", "values")

    shape: tuple[int, ...]
    blocksize: int
    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        check_blocksize(self.blocksize)

    @classmethod
    def from_dense(cls, weight: Tensor, blocksize: int, *, mask: Tensor | None = None) -> BSR:
        """Store every `blocksize x blocksize` block of `weight` (rank >= 1, floating point)
        holding a kept entry: a nonzero, or an entry `mask` keeps."""
        check_blocksize(blocksize)
        matrix, keep = masked_matrix(weight, mask)
        b = blocksize
        crow, brow, bcol = crow_from_grid(nonempty_blocks(keep, b, b))
        blocks = blocks_of(matrix if mask is None else matrix * keep, b, b)
        return cls(
            shape=tuple(weight.shape),
            blocksize=b,
            crow_indices=crow,
            col_indices=bcol.to(torch.int32),
            values=blocks[brow, bcol].contiguous(),
        )

    @classmethod
    def from_buffers(cls, shape: tuple[int, ...], buffers: dict[str, Tensor]) -> BSR:
        """The BSR held in a compiled layer's buffers (named as in `BUFFERS`)."""
        values = buffers["values"]
        return cls(shape, int(values.shape[-1]), *(buffers[name] for name in cls.BUFFERS))

    @property
    def block_grid(self) -> tuple[int, int]:
        """(block rows, block cols) of the padded 2-D view."""
        return block_grid(*view_2d(self.shape), self.blocksize, self.blocksize)

    @property
    def nblocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def nnz(self) -> int:
        """Nonzero entries inside the stored blocks (stored zeros do not count)."""
        return int(self.values.count_nonzero())

    def to_dense(self) -> Tensor:
        """The dense tensor of the original shape (padding cropped), the values' dtype."""
        b = self.blocksize
        block_rows, block_cols = self.block_grid
        grid = self.values.new_zeros(block_rows, block_cols, b, b)
        grid[rows_of(self.crow_indices), self.col_indices.long()] = self.values
        rows, cols = view_2d(self.shape)
        matrix = grid.transpose(1, 2).reshape(block_rows * b, block_cols * b)[:rows, :cols]
        return matrix.reshape(self.shape).clone()

    def check(self) -> None:
        """Raise ValueError naming the first broken invariant."""
        b = self.blocksize
        block_rows, block_cols = self.block_grid
        values = self.values
        if not isinstance(values, Tensor) or values.dim() != 3 or values.shape[1:] != (b, b):
            shape = tuple(values.shape) if isinstance(values, Tensor) else None
            raise ValueError(f"BSR values must be [nblocks, {b}, {b}], got {shape}")
        crow, col = self.crow_indices, self.col_indices
        check_crow("BSR", crow, col, block_rows, block_cols, self.nblocks)
        if math.prod(self.shape) == 0 and values.numel():
            raise ValueError("BSR of an empty shape cannot hold blocks")
        # Padding lies outside the original shape: it must stay zero or to_dense would crop data.
        rows, cols = view_2d(self.shape)
        if values.numel() and (rows % b or cols % b):
            steps = torch.arange(b, device=values.device)
            r = rows_of(crow)[:, None] * b + steps[None, :]  # [nblocks, b] row of each entry
            c = col.long()[:, None] * b + steps[None, :]
            outside = (r[:, :, None] >= rows) | (c[:, None, :] >= cols)
            if bool((values.ne(0) & outside).any()):
                raise ValueError("BSR blocks hold nonzeros in the padding outside the shape")
