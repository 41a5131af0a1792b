"""CPU kernels (Numba) for a dense Linear layer whose inputs mostly equal one background value.

Normalised MNIST digits are ~80 % background pixels, all equal to one value c. Writing
x = c + u, with u zero on the background, a stacked layer y = x·Wᵀ + bias becomes

    y[b, :] = (bias + c · Σ_k Wt[k, :]) + Σ_{k : x[b, k] != c} u[b, k] · Wt[k, :]
    dWt[k, :] = c · Σ_b g[b, :] + Σ_{b : x[b, k] != c} u[b, k] · g[b, :]

(Wt = Wᵀ, [in, out]; g = d loss / d y): the work scales with the foreground, not with the
input size. Each model of the stack (G models) is one parallel task; within it the loop runs
over input features k, so each row Wt[k, :] is read once per step and every update is a
contiguous vector FMA over `out`:

    for g in models (in parallel):
        common = bias[g];  y[g, b, :] = 0
        for k in inputs:
            common += c * Wt[g, k, :]
            for b with x[g, b, k] != c:  y[g, b, :] += (x[g, b, k] - c) * Wt[g, k, :]
        y[g, b, :] += common

Sums run in a fixed order whatever the thread count: results are reproducible run to run.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

_FLAGS = {"contract", "reassoc"}


@numba.njit(parallel=True, nogil=True, fastmath=_FLAGS, cache=True)
def _forward(x, background, wt, bias, out):  # type: ignore[no-untyped-def]
    models, batch, k_in = x.shape
    n_out = wt.shape[2]
    for g in numba.prange(models):
        common = bias[g].copy()
        y = out[g]
        y[:] = 0.0
        for k in range(k_in):
            row = wt[g, k]
            for o in range(n_out):
                common[o] += background * row[o]
            for b in range(batch):
                d = x[g, b, k] - background
                if d != 0.0:
                    yb = y[b]
                    for o in range(n_out):
                        yb[o] += d * row[o]
        for b in range(batch):
            yb = y[b]
            for o in range(n_out):
                yb[o] += common[o]


@numba.njit(parallel=True, nogil=True, fastmath=_FLAGS, cache=True)
def _weight_grad(x, background, grad_out, out):  # type: ignore[no-untyped-def]
    models, batch, k_in = x.shape
    n_out = grad_out.shape[2]
    for g in numba.prange(models):
        gsum = np.zeros(n_out, dtype=np.float32)
        for b in range(batch):
            gsum += grad_out[g, b]
        for k in range(k_in):
            row = out[g, k]
            for o in range(n_out):
                row[o] = background * gsum[o]
            for b in range(batch):
                d = x[g, b, k] - background
                if d != 0.0:
                    gb = grad_out[g, b]
                    for o in range(n_out):
                        row[o] += d * gb[o]


def background_linear(x: Tensor, background: float, wt: Tensor, bias: Tensor) -> Tensor:
    """y [G, B, out] = x [G, B, in] @ wt [G, in, out] + bias [G, out], all fp32."""
    out = torch.empty(x.shape[0], x.shape[1], wt.shape[2], dtype=torch.float32)
    _forward(x.detach().contiguous().numpy(), np.float32(background),
             wt.detach().contiguous().numpy(), bias.detach().contiguous().numpy(), out.numpy())
    return out


def background_weight_grad(x: Tensor, background: float, grad_out: Tensor) -> Tensor:
    """d loss / d wt [G, in, out] = x [G, B, in]ᵀ @ grad_out [G, B, out], all fp32."""
    out = torch.empty(x.shape[0], x.shape[2], grad_out.shape[2], dtype=torch.float32)
    _weight_grad(x.detach().contiguous().numpy(), np.float32(background),
                 grad_out.detach().contiguous().numpy(), out.numpy())
    return out


def background_of(x: Tensor, *, min_fraction: float = 0.5, sample: int = 1000) -> float | None:
    """The value most inputs share (that of the first input feature of the first sample),
    if at least `min_fraction` of the first `sample` samples' inputs equal it; else None."""
    flat = x[:sample].reshape(-1)
    if flat.numel() == 0 or not flat.is_floating_point():
        return None
    value = flat[0]
    share = float((flat == value).float().mean())
    return float(value) if share >= min_fraction else None
