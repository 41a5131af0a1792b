"""The first Linear layer of an MLP ensemble trained in CSR form once its masks are sparse.

At batch 60 on a CPU the dense product does the same work whatever the density; in CSR form
the forward and the weight gradient at the survivors only (a sampled dense-dense product)
scale with the number of survivors, and Adam updates only the survivors. The input layer needs
no gradient with respect to its input, so those two products are all it takes. Both run as
one call over every member (`ticketc.kernels.csr_cpu`), on inputs held feature-major
(xt [M, in, B], the batch zero-padded to whole vectors).

Survivors are stored compactly: `values` holds every member's surviving weights one member
after the other, in row-major (CSR) order: one CSR matrix of M * out rows. The dense stacked
weight is rewritten from them when read, so pruned entries are never written and stay zero.
"""

from __future__ import annotations

import torch
from torch import nn

from ticketc.kernels import csr_cpu


class SparseFirstLayer:
    def __init__(self, weight: torch.Tensor, masks: torch.Tensor) -> None:
        # weight, masks: [M, out, in]
        self.m, self.out_features, self.in_features = weight.shape
        flat = masks.reshape(self.m * self.out_features, self.in_features)
        rows, cols = flat.nonzero(as_tuple=True)  # row-major order = CSR order
        counts = torch.bincount(rows, minlength=flat.shape[0])
        self.crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        self.col = cols.to(torch.int32)
        self.positions = rows * self.in_features + cols  # into weight.view(-1)
        self.values = nn.Parameter(weight.detach().reshape(-1)[self.positions].clone())

    @torch.no_grad()
    def forward(self, xt: torch.Tensor, bias: torch.Tensor, batch: int) -> torch.Tensor:
        """xt [M or 1, in, B'] (1: shared by every member; B' >= batch, zero padded),
        bias [M, out] -> [M, batch, out]."""
        out = csr_cpu.csr_matmul_t(self.crow, self.col, self.values.detach(), xt, bias,
                                   groups=self.m)
        return out.view(self.m, self.out_features, -1)[:, :, :batch].transpose(1, 2)

    @torch.no_grad()
    def value_grads(self, g: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """d loss / d values from g = d loss / d output [M, B, out] and xt [M, in, B'] (the
        forward's input)."""
        g_t = g.new_zeros(self.m, self.out_features, xt.shape[-1])
        g_t[:, :, : g.shape[1]] = g.transpose(1, 2)
        return csr_cpu.csr_sampled_grad(self.crow, self.col, g_t.view(-1, xt.shape[-1]), xt,
                                        groups=self.m)

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
