"""CSR (compressed sparse row) storage of a masked weight, the layout the sparse kernels run.

A weight of any rank is viewed as 2-D `(shape[0], -1)`: a conv weight `[out, in, kh, kw]`
becomes `[out, in * kh * kw]`, the matrix its im2col product multiplies. `shape` keeps the
original shape so `to_dense()` gives back exactly the tensor that went in.

Index dtypes are chosen for bandwidth: `col_indices` is int16 when every column index fits
(`cols <= 32768`), else int32; `crow_indices` is int32 unless nnz needs int64. Consumers that
need wider indices call `.int()` / `.long()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CSR", "col_index_dtype", "crow_index_dtype", "view_2d"]


def view_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D shape `(shape[0], prod(shape[1:]))` under which CSR/BSR store a weight."""
    if len(shape) == 0:
        raise ValueError("a 0-d tensor has no rows: sparse formats need at least 1 dimension")
    return shape[0], math.prod(shape[1:])


def col_index_dtype(cols: int) -> torch.dtype:
    """int16 when all column indices (< cols) fit, int32 otherwise."""
    return torch.int16 if cols <= 2**15 else torch.int32


def crow_index_dtype(nnz: int) -> torch.dtype:
    """int32 row pointers unless nnz itself overflows int32."""
    return torch.int32 if nnz < 2**31 else torch.int64


@dataclass(frozen=True, eq=False)
class CSR:
    """Nonzeros of a dense weight in CSR form over its 2-D view `(shape[0], -1)`.

    `crow_indices[r]:crow_indices[r + 1]` slices the columns and values of row r; columns are
    strictly increasing within a row. `values` keep the dense dtype.
    """

    shape: tuple[int, ...]
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> CSR:
        """Encode the nonzeros of `dense` (any rank >= 1; zeros are what the mask removed)."""
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"dense must be a torch.Tensor, got {type(dense).__name__}")
        rows, cols = view_2d(tuple(dense.shape))
        matrix = dense.detach().reshape(rows, cols)
        row, col = (matrix != 0).nonzero(as_tuple=True)  # row-major order: rows sorted, cols sorted
        nnz = row.numel()
        counts = torch.bincount(row, minlength=rows)
        crow = torch.zeros(rows + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=crow[1:])
        return cls(
            shape=tuple(dense.shape),
            crow_indices=crow.to(crow_index_dtype(nnz)),
            col_indices=col.to(col_index_dtype(cols)),
            values=matrix[row, col].clone(),
        )

    @property
    def rows(self) -> int:
        return view_2d(self.shape)[0]

    @property
    def cols(self) -> int:
        return view_2d(self.shape)[1]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        numel = math.prod(self.shape)
        return self.nnz / numel if numel else 0.0

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored arrays (row pointers, column indices, values)."""
        return sum(
            t.numel() * t.element_size() for t in (self.crow_indices, self.col_indices, self.values)
        )

    def to_dense(self) -> torch.Tensor:
        """The dense tensor of the original shape and the values' dtype."""
        rows, cols = self.rows, self.cols
        crow = self.crow_indices.long()
        row = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
        out = torch.zeros(rows, cols, dtype=self.values.dtype)
        out[row, self.col_indices.long()] = self.values
        return out.reshape(self.shape)

    def to_torch(self) -> torch.Tensor:
        """A `torch.sparse_csr_tensor` of the 2-D view (int64 indices, as torch expects)."""
        return torch.sparse_csr_tensor(
            self.crow_indices.long(),
            self.col_indices.long(),
            self.values,
            size=(self.rows, self.cols),
            check_invariants=True,
        )

    def check(self) -> None:
        """Raise ValueError naming the first broken invariant."""
        rows, cols = self.rows, self.cols
        crow, col, values = self.crow_indices, self.col_indices, self.values
        for name, t in (("crow_indices", crow), ("col_indices", col), ("values", values)):
            if t.dim() != 1:
                raise ValueError(f"CSR {name} must be 1-D, got shape {tuple(t.shape)}")
        if crow.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"CSR crow_indices dtype must be int32/int64, got {crow.dtype}")
        if col.dtype not in (torch.int16, torch.int32, torch.int64):
            raise ValueError(f"CSR col_indices dtype must be int16/int32/int64, got {col.dtype}")
        if col.dtype == torch.int16 and cols > 2**15:
            raise ValueError(f"CSR col_indices are int16 but there are {cols} columns (> 32768)")
        if crow.numel() != rows + 1:
            raise ValueError(
                f"CSR crow_indices has {crow.numel()} entries, expected rows + 1 = {rows + 1}"
            )
        if col.numel() != values.numel():
            raise ValueError(f"CSR has {col.numel()} col_indices but {values.numel()} values")
        crow64 = crow.long()
        if crow.numel() and int(crow64[0]) != 0:
            raise ValueError(f"CSR crow_indices[0] must be 0, got {int(crow64[0])}")
        if crow.numel() and int(crow64[-1]) != values.numel():
            raise ValueError(f"CSR crow_indices[-1] = {int(crow64[-1])} but nnz = {values.numel()}")
        if bool((crow64[1:] < crow64[:-1]).any()):
            raise ValueError("CSR crow_indices must be non-decreasing")
        col64 = col.long()
        if col64.numel() and (int(col64.min()) < 0 or int(col64.max()) >= cols):
            raise ValueError(f"CSR col_indices out of range [0, {cols})")
        # Within a row, columns strictly increase; a drop is only allowed where a new row starts.
        if col64.numel() > 1:
            starts = torch.zeros(col64.numel(), dtype=torch.bool)
            starts[crow64[:-1][crow64[:-1] < col64.numel()]] = True
            bad = (col64[1:] <= col64[:-1]) & ~starts[1:]
            if bool(bad.any()):
                raise ValueError("CSR col_indices must be strictly increasing within each row")
