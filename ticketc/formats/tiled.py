"""The tiled bitmap format: tile_m x 32 tiles holding the kept values and one bit per weight,
exactly as the runtime stores it (the Flash-LLM / SpInfer idea: tiles are decoded in registers
and fed to tensor cores).

The arrays are the buffers of a compiled tiled layer and the arguments of
`torch.ops.ticketc.tiled_linear`, in that order (`BUFFERS`):

    tile_crow     int32 [ceil(M / tile_m) + 1]  nonempty tiles of each tile row
    tile_col      int32 [ntiles]                tile column (units of 32 input features)
    tile_offsets  int32 [ntiles]                start of the tile's values in `values`
    row_offsets   int16 [ntiles, tile_m]        start of each tile row's values in its tile
    bitmaps       int32 [ntiles, tile_m]        bit j of row i set <=> W[i, 32*col + j] kept
    values        [nnz]                         tile by tile, row-major inside a tile

Storage per weight: 1 bit of bitmap + 1/16 B of row offsets + the kept values, so at 10 %
density with fp16 values a tile costs ~0.39 B per weight against 2 B dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ticketc.formats import layout
from ticketc.formats.layout import StoredArrays

__all__ = ["TILE_K", "TILE_MS", "Tiled"]

TILE_K = 32  # input features per tile: one int32 bitmap word per tile row
TILE_MS = (16, 32, 64)  # the tile heights the kernel is built for


def _bits(bitmaps: Tensor) -> Tensor:
    """[ntiles, tile_m] int32 words -> [ntiles, tile_m, 32] bool."""
    shifts = torch.arange(TILE_K, device=bitmaps.device, dtype=torch.int32)
    return (torch.bitwise_right_shift(bitmaps[..., None], shifts) & 1).bool()


def _words(kept: Tensor) -> Tensor:
    """[ntiles, tile_m, 32] bool -> [ntiles, tile_m] int32 words (bit j = column j)."""
    one = torch.ones((), dtype=torch.int64, device=kept.device)
    bit = torch.bitwise_left_shift(one, torch.arange(TILE_K, device=kept.device))
    words = (kept.to(torch.int64) * bit).sum(dim=2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as int32


@dataclass(frozen=True, eq=False)
class Tiled(StoredArrays):
    """The nonempty tile_m x 32 tiles of a weight's 2-D view `(shape[0], -1)`."""

    BUFFERS: ClassVar[tuple[str, ...]] = (
        "tile_crow", "tile_col", "tile_offsets", "row_offsets", "bitmaps", "values",
    )  # fmt: skip

    shape: tuple[int, ...]
    tile_crow: Tensor
    tile_col: Tensor
    tile_offsets: Tensor
    row_offsets: Tensor
    bitmaps: Tensor
    values: Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None, *, tile_m: int = 32) -> Tiled:
        """Store the tiles of `weight` (rank >= 1, floating point) holding a kept entry: a
        nonzero, or an entry `mask` keeps (explicit zeros included). `tile_m` in TILE_MS."""
        if tile_m not in TILE_MS:
            raise ValueError(f"tile_m must be one of {TILE_MS}, got {tile_m!r}")
        matrix, keep = layout.masked_matrix(weight, mask)
        tile_crow, trow, tcol = layout.crow_from_grid(layout.nonempty_blocks(keep, tile_m, TILE_K))
        kept = layout.blocks_of(keep, tile_m, TILE_K)[trow, tcol]  # [ntiles, tile_m, 32]
        values = layout.blocks_of(matrix, tile_m, TILE_K)[trow, tcol][kept]  # row-major per tile
        if values.numel() >= 2**31:
            raise ValueError(f"{values.numel()} nonzeros do not fit int32 tile offsets")
        row_counts = kept.sum(dim=2)  # [ntiles, tile_m]
        tile_counts = row_counts.sum(dim=1)
        return cls(
            shape=tuple(weight.shape),
            tile_crow=tile_crow.to(torch.int32),
            tile_col=tcol.to(torch.int32),
            tile_offsets=(torch.cumsum(tile_counts, 0) - tile_counts).to(torch.int32),
            row_offsets=(torch.cumsum(row_counts, 1) - row_counts).to(torch.int16),
            bitmaps=_words(kept),
            values=values.contiguous(),
        )

    @property
    def tile_m(self) -> int:
        return int(self.bitmaps.shape[1])

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(tile rows, tile cols) of the padded 2-D view."""
        return layout.block_grid(*layout.view_2d(self.shape), self.tile_m, TILE_K)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def to_dense(self) -> Tensor:
        """The dense tensor of the original shape (padding cropped), the values' dtype.
        Decodes from the bitmaps and values only; the offsets serve the kernel."""
        bits = _bits(self.bitmaps)
        tiles = self.values.new_zeros(bits.shape)
        tiles[bits] = self.values
        mt, kt = self.tile_grid
        grid = self.values.new_zeros(mt, kt, self.tile_m, TILE_K)
        grid[layout.rows_of(self.tile_crow), self.tile_col.long()] = tiles
        rows, cols = layout.view_2d(self.shape)
        matrix = grid.transpose(1, 2).reshape(mt * self.tile_m, kt * TILE_K)[:rows, :cols]
        return matrix.reshape(self.shape)

    def check(self) -> None:
        """Raise ValueError naming the first broken invariant."""
        bitmaps, row_offsets = self.bitmaps, self.row_offsets
        if bitmaps.dtype != torch.int32 or bitmaps.dim() != 2 or bitmaps.shape[1] not in TILE_MS:
            raise ValueError(
                f"tiled bitmaps must be int32 [ntiles, tile_m] with tile_m in {TILE_MS}, "
                f"got {bitmaps.dtype} {tuple(bitmaps.shape)}"
            )
        if row_offsets.dtype != torch.int16 or row_offsets.shape != bitmaps.shape:
            raise ValueError(f"tiled row_offsets must be int16 {tuple(bitmaps.shape)}")
        for name in ("tile_crow", "tile_col", "tile_offsets"):
            if getattr(self, name).dtype != torch.int32:
                raise ValueError(f"tiled {name} must be int32")
        ntiles = bitmaps.shape[0]
        layout.check_crow("tiled", self.tile_crow, self.tile_col, *self.tile_grid, ntiles)
        counts = _bits(bitmaps).sum(dim=2)  # [ntiles, tile_m] values of each tile row
        if int(counts.sum()) != self.values.numel() or self.values.dim() != 1:
            raise ValueError(
                f"tiled bitmaps mark {int(counts.sum())} entries but values is "
                f"{tuple(self.values.shape)}"
            )
        tile_counts = counts.sum(dim=1)
        if not torch.equal(self.tile_offsets.long(), torch.cumsum(tile_counts, 0) - tile_counts):
            raise ValueError("tiled tile_offsets do not match the bitmaps' counts")
        if not torch.equal(row_offsets.long(), torch.cumsum(counts, 1) - counts):
            raise ValueError("tiled row_offsets do not match the bitmaps' counts")
        rows, cols = layout.view_2d(self.shape)
        if ntiles and (rows % self.tile_m or cols % TILE_K):
            dense = self.to_dense()  # would crop kept entries in the padding: compare counts
            if int(dense.count_nonzero()) != int(self.values.count_nonzero()):
                raise ValueError("tiled bitmaps mark entries in the padding outside the shape")
