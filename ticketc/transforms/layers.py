"""The layer types ticketc makes sparse: one constant for every stage.

Linear and 1-d / 2-d convolutions are what the planner lowers to sparse kernels (CSR, BSR, the
tiled bitmap), what dead-unit elimination slices and what export stores sparse. Conv3d is left
out on purpose: no kernel of ticketc runs it, so counting its weights would promise speed and size
no stage delivers. (`ticketc.find.pruning` decides which parameters *training* prunes, a
different question: every Linear and Conv* weight, Conv3d included.)
"""

from __future__ import annotations

from torch import nn

SPARSE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
SparseLayer = nn.Linear | nn.Conv1d | nn.Conv2d
