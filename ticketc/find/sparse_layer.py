"""A Linear layer of an MLP ensemble trained in CSR form once its masks are sparse.

At batch 60 on a CPU the dense products do the same work whatever the density; in CSR form
the forward, the gradient with respect to the input (a product with the transposed CSR) and
the weight gradient at the survivors only (a sampled dense-dense product) scale with the
number of survivors, and Adam updates only the survivors. Each runs as one call over every
member (`ticketc.kernels.csr_cpu`), on activations held feature-major ([M, features, B'], the
batch zero-padded to whole vectors).

Survivors are stored compactly: `values` holds every member's surviving weights one member
after the other, in row-major (CSR) order: one CSR matrix of M * out rows. The dense stacked
weight is rewritten from them when read, so pruned entries are never written and stay zero.
"""

from __future__ import annotations

import torch
from torch import nn

from ticketc.formats.csr import CSR
from ticketc.formats.layout import rows_of
from ticketc.kernels import csr_cpu


def _csr(weight: torch.Tensor, masks: torch.Tensor) -> CSR:
    """The survivors of weight / masks [M, out, in] as one CSR matrix of M * out rows, with
    the int32 indices the kernels take."""
    flat = weight.detach().reshape(-1, weight.shape[-1])
    return CSR.from_dense(flat, masks.reshape(flat.shape), index_dtype=torch.int32)


class StackedCsrLinear:
    """The Linear layer of every member of an ensemble, its survivors trained in CSR form (not
    an nn.Module: `ticketc.find.stacked` calls its products and gradients)."""

    def __init__(self, weight: torch.Tensor, masks: torch.Tensor) -> None:
        # weight, masks: [M, out, in]
        self.m, self.out_features, self.in_features = weight.shape
        csr = _csr(weight, masks)
        self.crow, self.col = csr.crow_indices, csr.col_indices
        rows = rows_of(self.crow)
        self.positions = rows * self.in_features + self.col.long()  # into weight.view(-1)
        self.values = nn.Parameter(csr.values.clone())
        # Wᵀ of every member ([M * in, out] CSR) and where each of its entries sits in `values`
        order = torch.full(masks.shape, -1, dtype=torch.int64)
        order[masks] = torch.arange(len(self.values))
        transposed = _csr(weight.transpose(1, 2), masks.transpose(1, 2))
        self.crow_t, self.col_t = transposed.crow_indices, transposed.col_indices
        self.to_transposed = order.transpose(1, 2)[masks.transpose(1, 2)]

    @torch.no_grad()
    def forward(self, xt: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """xt [M or 1, in, B'] (1: shared by every member), bias [M, out] -> [M, out, B']."""
        out = csr_cpu.csr_matmul_t(
            self.crow, self.col, self.values.detach(), xt, bias, groups=self.m
        )
        return out.view(self.m, self.out_features, -1)

    @torch.no_grad()
    def input_grads(self, g_t: torch.Tensor) -> torch.Tensor:
        """d loss / d input [M, in, B'] from g_t = d loss / d output [M, out, B']."""
        values_t = self.values.detach()[self.to_transposed]
        out = csr_cpu.csr_matmul_t(self.crow_t, self.col_t, values_t, g_t, groups=self.m)
        return out.view(self.m, self.in_features, -1)

    @torch.no_grad()
    def value_grads(self, g_t: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """d loss / d values from g_t = d loss / d output [M, out, B'] and the forward's input
        xt [M, in, B']."""
        return csr_cpu.csr_sampled_grad(
            self.crow, self.col, g_t.reshape(-1, g_t.shape[-1]), xt, groups=self.m
        )

    @torch.no_grad()
    def write_dense_(self, weight: torch.Tensor) -> None:
        """Copy the survivors into the dense stacked weight (pruned entries untouched)."""
        weight.view(-1).index_copy_(0, self.positions, self.values.detach())

    def to_dense(self, compact: torch.Tensor) -> torch.Tensor:
        """A compact tensor (e.g. Adam's moments) as [M, out, in], zeros where pruned."""
        dense = torch.zeros(self.m * self.out_features * self.in_features, dtype=compact.dtype)
        dense.index_copy_(0, self.positions, compact)
        return dense.view(self.m, self.out_features, self.in_features)

    def to_compact(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.reshape(-1)[self.positions].clone()
