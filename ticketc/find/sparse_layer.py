"""The first Linear layer of an MLP ensemble trained in CSR form once its masks are sparse.

At batch 60 on a CPU the dense product does the same work whatever the density; in CSR form
the forward (CSR @ dense) and the weight gradient at the survivors only (sampled dense-dense
product) scale with the number of survivors, and Adam updates only the survivors. The input
layer needs no gradient with respect to its input, so those two products are all it takes.

Survivors are stored compactly: `values` holds every member's surviving weights one member
after the other, in row-major (CSR) order; the dense stacked weight is rewritten from them after
each step, so pruned entries are never written and stay exactly zero.
"""

from __future__ import annotations

import torch
from torch import nn


class SparseFirstLayer:
    def __init__(self, weight: torch.Tensor, masks: torch.Tensor) -> None:
        # weight, masks: [M, out, in]
        self.m, self.out_features, self.in_features = weight.shape
        numel = self.out_features * self.in_features
        self.crow: list[torch.Tensor] = []
        self.col: list[torch.Tensor] = []
        self.offsets = [0]
        positions = []
        for i in range(self.m):
            rows, cols = masks[i].nonzero(as_tuple=True)  # row-major order = CSR order
            counts = torch.bincount(rows, minlength=self.out_features)
            self.crow.append(torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
            self.col.append(cols)
            positions.append(i * numel + rows * self.in_features + cols)
            self.offsets.append(self.offsets[-1] + len(rows))
        self.positions = torch.cat(positions)  # into weight.view(-1)
        self.values = nn.Parameter(weight.detach().reshape(-1)[self.positions].clone())

    def _csr(self, i: int, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.crow[i], self.col[i], values[self.offsets[i] : self.offsets[i + 1]],
            size=(self.out_features, self.in_features),
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [M, B, in], bias [M, out] -> [M, B, out]."""
        outs = [self._csr(i, self.values) @ x[i].t() for i in range(self.m)]  # [out, B] each
        return torch.stack(outs).transpose(1, 2).add_(bias.unsqueeze(1))

    @torch.no_grad()
    def value_grads(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """d loss / d values from g = d loss / d output [M, B, out] and the input x [M, B, in]."""
        grads = []
        for i in range(self.m):
            pattern = self._csr(i, self.values.detach())
            sampled = torch.sparse.sampled_addmm(pattern, g[i].t(), x[i], beta=0.0)
            grads.append(sampled.values())
        return torch.cat(grads)

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
