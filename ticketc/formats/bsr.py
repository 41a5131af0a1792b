"""BSR (block sparse row) storage: CSR over square `b x b` blocks of the 2-D view.

Only blocks holding at least one nonzero are stored, each in full (zeros inside a block are
stored too). Shapes not divisible by b are padded with zeros internally; `to_dense()` crops
back to the original shape. Unstructured lottery tickets rarely fit this layout: use
`block_occupancy` to see how many blocks survive before choosing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ticketc.formats.csr import col_index_dtype, crow_index_dtype, view_2d

__all__ = ["BSR", "block_occupancy"]


def _check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")


def _blocks(dense: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[block rows, block cols, b, b] view of the zero-padded 2-D matrix."""
    rows, cols = view_2d(tuple(dense.shape))
    b = blocksize
    prows, pcols = -(-rows // b) * b, -(-cols // b) * b
    matrix = dense.detach().reshape(rows, cols)
    if (prows, pcols) != (rows, cols):
        matrix = torch.nn.functional.pad(matrix, (0, pcols - cols, 0, prows - rows))
    return matrix.reshape(prows // b, b, pcols // b, b).transpose(1, 2)


def block_occupancy(dense: torch.Tensor, blocksize: int) -> float:
    """Fraction of the `b x b` blocks (of the padded 2-D view) that hold at least one nonzero."""
    _check_blocksize(blocksize)
    blocks = _blocks(dense, blocksize)
    total = blocks.shape[0] * blocks.shape[1]
    if total == 0:
        return 0.0
    return float((blocks != 0).any(dim=(2, 3)).sum()) / total


@dataclass(frozen=True, eq=False)
class BSR:
    """Nonzero `b x b` blocks of a dense weight's 2-D view `(shape[0], -1)`.

    `crow_indices` / `col_indices` index block rows / block columns; `values` is
    `[nblocks, b, b]` in the dense dtype.
    """

    shape: tuple[int, ...]
    blocksize: int
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        _check_blocksize(self.blocksize)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, blocksize: int) -> BSR:
        """Encode every `blocksize x blocksize` block of `dense` that holds a nonzero."""
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"dense must be a torch.Tensor, got {type(dense).__name__}")
        _check_blocksize(blocksize)
        blocks = _blocks(dense, blocksize)
        block_rows, block_cols = blocks.shape[:2]
        row, col = blocks.ne(0).any(dim=(2, 3)).nonzero(as_tuple=True)
        nblocks = row.numel()
        crow = torch.zeros(block_rows + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(row, minlength=block_rows), 0, out=crow[1:])
        return cls(
            shape=tuple(dense.shape),
            blocksize=blocksize,
            crow_indices=crow.to(crow_index_dtype(nblocks)),
            col_indices=col.to(col_index_dtype(block_cols)),
            values=blocks[row, col].contiguous(),
        )

    @property
    def block_grid(self) -> tuple[int, int]:
        """(block rows, block cols) of the padded 2-D view."""
        rows, cols = view_2d(self.shape)
        return -(-rows // self.blocksize), -(-cols // self.blocksize)

    @property
    def nblocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def nnz(self) -> int:
        """Nonzero entries inside the stored blocks (stored zeros do not count)."""
        return int(self.values.count_nonzero())

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored arrays, zeros inside stored blocks included."""
        return sum(
            t.numel() * t.element_size() for t in (self.crow_indices, self.col_indices, self.values)
        )

    def to_dense(self) -> torch.Tensor:
        """The dense tensor of the original shape (padding cropped) and the values' dtype."""
        b = self.blocksize
        block_rows, block_cols = self.block_grid
        crow = self.crow_indices.long()
        row = torch.repeat_interleave(torch.arange(block_rows), crow[1:] - crow[:-1])
        grid = torch.zeros(block_rows, block_cols, b, b, dtype=self.values.dtype)
        grid[row, self.col_indices.long()] = self.values
        rows, cols = view_2d(self.shape)
        matrix = grid.transpose(1, 2).reshape(block_rows * b, block_cols * b)[:rows, :cols]
        return matrix.reshape(self.shape).clone()

    def check(self) -> None:
        """Raise ValueError naming the first broken invariant."""
        b = self.blocksize
        block_rows, block_cols = self.block_grid
        crow, col, values = self.crow_indices, self.col_indices, self.values
        if crow.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"BSR crow_indices dtype must be int32/int64, got {crow.dtype}")
        if col.dtype not in (torch.int16, torch.int32, torch.int64):
            raise ValueError(f"BSR col_indices dtype must be int16/int32/int64, got {col.dtype}")
        if crow.dim() != 1 or crow.numel() != block_rows + 1:
            raise ValueError(
                f"BSR crow_indices has shape {tuple(crow.shape)}, expected ({block_rows + 1},)"
            )
        if values.dim() != 3 or tuple(values.shape[1:]) != (b, b):
            raise ValueError(f"BSR values must be [nblocks, {b}, {b}], got {tuple(values.shape)}")
        if col.dim() != 1 or col.numel() != values.shape[0]:
            raise ValueError(f"BSR has {col.numel()} col_indices but {values.shape[0]} blocks")
        crow64, col64 = crow.long(), col.long()
        if int(crow64[0]) != 0 or int(crow64[-1]) != values.shape[0]:
            raise ValueError(
                f"BSR crow_indices must run from 0 to nblocks = {values.shape[0]}, "
                f"got {int(crow64[0])}..{int(crow64[-1])}"
            )
        if bool((crow64[1:] < crow64[:-1]).any()):
            raise ValueError("BSR crow_indices must be non-decreasing")
        if col64.numel() and (int(col64.min()) < 0 or int(col64.max()) >= block_cols):
            raise ValueError(f"BSR col_indices out of range [0, {block_cols})")
        if col64.numel() > 1:
            starts = torch.zeros(col64.numel(), dtype=torch.bool)
            starts[crow64[:-1][crow64[:-1] < col64.numel()]] = True
            if bool(((col64[1:] <= col64[:-1]) & ~starts[1:]).any()):
                raise ValueError(
                    "BSR col_indices must be strictly increasing within each block row"
                )
        # Padding lies outside the original shape: it must stay zero or to_dense would crop data.
        rows, cols = view_2d(self.shape)
        if values.numel() and (rows % b or cols % b):
            crow_rep = torch.repeat_interleave(torch.arange(block_rows), crow64[1:] - crow64[:-1])
            r = crow_rep[:, None] * b + torch.arange(b)[None, :]  # [nblocks, b] row of each entry
            c = col64[:, None] * b + torch.arange(b)[None, :]
            outside = (r[:, :, None] >= rows) | (c[:, None, :] >= cols)
            if bool((values.ne(0) & outside).any()):
                raise ValueError("BSR blocks hold nonzeros in the padding outside the shape")
        if math.prod(self.shape) == 0 and values.numel():
            raise ValueError("BSR of an empty shape cannot hold blocks")
