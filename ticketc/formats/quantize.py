"""Value quantisers used by the compact codec: per-row symmetric int8 and a 16-entry codebook."""

from __future__ import annotations

import numpy as np

__all__ = ["FP16_MAX", "assign_nearest", "int8_rows", "kmeans_1d"]

FP16_MAX = float(np.finfo(np.float16).max)


def int8_rows(
    values: np.ndarray, rows: np.ndarray, absmax: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes (zero point 0) with one fp16 scale per row.

    `values[i]` lives in row `rows[i]`; `absmax[r]` is the largest |value| of row r. The scale is
    rounded to fp16 *before* quantising, so dequantising with the stored scale reproduces exactly
    what the codes were computed against. Rows whose scale underflows fp16 decode to zero.
    Returns (codes int8 [len(values)], scale fp16 [len(absmax)]).
    """
    scale = np.minimum(absmax.astype(np.float64) / 127.0, FP16_MAX).astype(np.float16)
    s = scale.astype(np.float32)[rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(values / np.where(s > 0, s, 1.0)), 0.0)
    return np.clip(q, -127, 127).astype(np.int8), scale


def assign_nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of sorted `centroids` for every value (ties go low)."""
    if centroids.size == 1:
        return np.zeros(values.shape, dtype=np.int64)
    bounds = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(bounds, values, side="left").astype(np.int64)


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 30) -> np.ndarray:
    """Sorted float64 centroids of a 1-D k-means (Lloyd) over `values`, at most k of them.

    Initialised on evenly spaced quantiles, as Deep Compression's linear initialisation keeps
    the large, rare weights represented better than random init. With k or fewer distinct
    values the distinct values themselves are returned (exact).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = np.asarray(values, dtype=np.float64).ravel()
    distinct = np.unique(x)
    if distinct.size <= k:
        return distinct
    centroids = np.unique(np.quantile(x, (np.arange(k) + 0.5) / k))
    for _ in range(iterations):
        assign = assign_nearest(x, centroids)
        counts = np.bincount(assign, minlength=centroids.size)
        sums = np.bincount(assign, weights=x, minlength=centroids.size)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        updated = np.unique(updated)
        if updated.size == centroids.size and np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids
