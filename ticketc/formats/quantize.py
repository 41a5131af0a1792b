"""Value quantisers used by the compact codec: symmetric int8 scales and a 1-D k-means codebook.

Each quantiser has an error bound that the exporter checks every decoded weight against
(`error_bound`): fp16 rounds to nearest (half a unit in the last place), int8 is within half its
scale, int4 is the nearest codebook entry.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FP16_MAX", "assign_nearest", "int8_scales", "kmeans_1d"]

FP16_MAX = float(np.finfo(np.float16).max)


def int8_scales(absmax: np.ndarray) -> np.ndarray:
    """fp16 scales for symmetric int8 codes (zero point 0), one per entry of `absmax`.

    Each scale is absmax / 127 rounded *up* to the next fp16 value, so no value's code exceeds
    127: quantising x to rint(x / s) with the stored scale is then within s / 2 of x. A zero
    absmax gives scale 0 (all codes 0). Raises ValueError when absmax / 127 exceeds fp16.
    Returns float16, the shape of `absmax`.
    """
    exact = np.asarray(absmax, dtype=np.float64) / 127.0
    if exact.size and float(exact.max()) > FP16_MAX:
        raise ValueError(
            f"int8 scale {float(exact.max()):.4g} does not fit fp16 (max {FP16_MAX:g})"
        )
    scale = exact.astype(np.float16)
    low = scale.astype(np.float64) < exact
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    return scale


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


def is_vector_like(shape: tuple[int, ...]) -> bool:
    """A bias-like tensor: at most two elements per entry of its longest axis ([C], [1, C],
    [2, 8h], [1, C, 1, 1]). The integer value types (int8, int4) leave such a tensor exact, as
    quantizers in the field do: its few bytes decide much of the output (a running variance
    off by half is off by half in every output of its channel)."""
    return math.prod(shape) <= 2 * max(shape, default=1)
