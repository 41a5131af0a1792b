"""The sparsity pattern of a tensor, read from its exact zeros: what the sparsity cards
(ticketc.card) report per layer — "dense", "N:M", "block(BxB)" or "unstructured"."""

from __future__ import annotations

import torch

from ticketc.formats.layout import nonempty_blocks
from ticketc.pack.codec import SPARSE_DTYPES
from ticketc.pack.nm import detect_nm

__all__ = ["sparsity_pattern"]

_BLOCK_SIZES = (32, 16, 8, 4)


def sparsity_pattern(tensor: torch.Tensor) -> str:
    """ "dense", "N:M", "block(BxB)" or "unstructured", from the tensor's exact zeros.

    N:M: every group of M consecutive weights along the last dim (or the first dim of a matrix)
    keeps at most N <= M / 2 (ticketc.pack.nm.detect_nm). Block: the 2-D view (shape[0], -1)
    has empty b x b blocks and its occupied blocks are at least 90 % full, for the largest such
    b of 4 / 8 / 16 / 32 (a mask blocky at b is blocky at every divisor of b, so the search
    stops at the first b that is not).
    """
    if tensor.ndim == 0 or tensor.dtype not in SPARSE_DTYPES:
        return "dense"
    keep = (tensor.detach().reshape(-1) != 0).numpy()
    nnz = int(keep.sum())
    if nnz == keep.size:
        return "dense"
    nm = detect_nm(keep, tuple(tensor.shape))
    if nm is not None:
        return f"{nm[0]}:{nm[1]}" + (" (along dim 0)" if nm[2] == 0 else "")
    pattern = "unstructured"
    if tensor.ndim >= 2 and nnz:
        matrix = keep.reshape(tensor.shape[0], -1)
        density = nnz / keep.size
        for b in sorted(_BLOCK_SIZES):
            if matrix.shape[0] < 2 * b or matrix.shape[1] < 2 * b:
                break
            occupancy = float(nonempty_blocks(torch.from_numpy(matrix), b, b).float().mean())
            if occupancy >= 0.9 or density < 0.9 * occupancy:
                break
            pattern = f"block({b}x{b})"
    return pattern
