"""CSR (compressed sparse row) storage of a masked weight, exactly as the runtime stores it.

The arrays are the buffers of a compiled csr layer and the arguments of
`torch.ops.ticketc.csr_linear` / `csr_chain` / `csr_conv2d`, in that order (`BUFFERS`):

    crow_indices  int32 [M + 1]   (int64 only past 2**31 - 1 nonzeros)
    col_indices   [nnz]           int32 for the CPU kernels (`index_dtype_for("cpu")`); int16
                                  by default when every column fits (K <= 32768: half the
                                  index traffic of the Triton kernel), else int32
    values        [nnz]           the weight's dtype, row-major
    row_order     int32 [M]       rows sorted by nnz, longest first (stable): the GPU kernel
                                  gives neighbouring programs rows of similar length (Sputnik)

over the weight's 2-D view [M, K] = (shape[0], prod(shape[1:])) (see `layout.view_2d`): a conv
weight [out, in/groups, kh, kw] is stored as CSR over [out, in/groups * kh * kw]. `shape` keeps
the original shape, so `to_dense()` gives back exactly the tensor that went in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ticketc.formats.layout import (
    INT16_MAX_COLS,
    StoredArrays,
    check_crow,
    crow_from_counts,
    masked_matrix,
    rows_of,
    view_2d,
)

__all__ = ["CSR", "index_dtype_for"]

_INDEX_DTYPES = (torch.int16, torch.int32)


def index_dtype_for(device: str | torch.device) -> torch.dtype | None:
    """The column-index dtype the runtime stores on `device`: int32 on CPU (the Numba kernels
    and torch's CSR take int32), None elsewhere (int16 when the columns fit)."""
    return torch.int32 if torch.device(device).type == "cpu" else None


def _row_order(crow: Tensor) -> Tensor:
    counts = crow[1:] - crow[:-1]
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


@dataclass(frozen=True, eq=False)
class CSR(StoredArrays):
    """The kept entries of a weight in CSR form over its 2-D view `(shape[0], -1)`.

    `crow_indices[r]:crow_indices[r + 1]` slices the columns and values of row r; columns are
    strictly increasing within a row. `row_order` may be left out: it is derived from
    `crow_indices`.
    """

    BUFFERS: ClassVar[tuple[str, ...]] = ("crow_indices", "col_indices", "values", "row_order")

    shape: tuple[int, ...]
    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    row_order: Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.row_order is None:
            object.__setattr__(self, "row_order", _row_order(self.crow_indices))

    @classmethod
    def from_dense(
        cls, weight: Tensor, mask: Tensor | None = None, *, index_dtype: torch.dtype | None = None
    ) -> CSR:
        """Store the kept entries of `weight` (any rank >= 1, floating point): its nonzeros, or
        exactly the entries `mask` keeps (explicit zeros included).

        `index_dtype`: torch.int16 or torch.int32 column indices; None: int16 when they fit
        (K <= 32768), else int32. TypeError / ValueError on a bad weight, mask or dtype.
        """
        matrix, keep = masked_matrix(weight, mask)
        cols = matrix.shape[1]
        if index_dtype is None:
            index_dtype = torch.int16 if cols <= INT16_MAX_COLS else torch.int32
        if index_dtype not in _INDEX_DTYPES:
            raise ValueError(f"index_dtype must be torch.int16 or torch.int32, got {index_dtype}")
        if index_dtype == torch.int16 and cols > INT16_MAX_COLS:
            raise ValueError(f"index_dtype torch.int16 holds columns < 32768, but K = {cols}")
        row, col = keep.nonzero(as_tuple=True)  # row-major: each row's columns sorted
        crow = crow_from_counts(keep.sum(dim=1))
        return cls(
            shape=tuple(weight.shape),
            crow_indices=crow,
            col_indices=col.to(index_dtype),
            values=matrix[row, col].contiguous(),
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
        numel = self.rows * self.cols
        return self.nnz / numel if numel else 0.0

    def to_dense(self) -> Tensor:
        """The dense tensor of the original shape, the values' dtype and device."""
        out = self.values.new_zeros(self.rows, self.cols)
        out[rows_of(self.crow_indices), self.col_indices.long()] = self.values
        return out.reshape(self.shape)

    def to_torch(self) -> Tensor:
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
        if not isinstance(self.values, Tensor) or self.values.dim() != 1:
            raise ValueError("CSR values must be a 1-D tensor")
        check_crow("CSR", self.crow_indices, self.col_indices, self.rows, self.cols, self.nnz)
        order = self.row_order
        if not isinstance(order, Tensor) or order.dtype not in (torch.int32, torch.int64):
            raise ValueError("CSR row_order must be an int32/int64 tensor")
        every_row = torch.arange(self.rows, device=order.device)
        if not torch.equal(order.long().sort().values, every_row):
            raise ValueError(f"CSR row_order must be a permutation of the {self.rows} rows")
