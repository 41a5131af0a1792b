"""Sparse replacements for Linear and Conv1d/Conv2d that hold only the packed sparse data.

Buffers are exactly what `ticketc.ops.pack_*` returns (plus the bias), so a compiled model's
state dict, `torch.export` program and memory hold no dense-size copy of a pruned weight. The
forward calls the `torch.ops.ticketc.*` custom ops: CPU (Numba, MKL) and CUDA (Triton)
kernels, and fake kernels for torch.compile / torch.export.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ticketc.ops as ops  # registers torch.ops.ticketc.*
from ticketc.compile.costs import parse_format

# Buffer names per format, in the order the op takes them.
BUFFERS = {
    "csr": ("crow_indices", "col_indices", "values", "row_order"),
    "bsr": ("crow_indices", "col_indices", "values"),
    "tiled": ("tile_crow", "tile_col", "tile_offsets", "row_offsets", "bitmaps", "values"),
}


def pack(weight: Tensor, fmt: str, *, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Pack a 2-D weight (zeros = pruned) into the buffers of sparse format `fmt`."""
    kind, blocksize = parse_format(fmt)
    if kind == "csr":
        # torch's CPU CSR kernels want int32 indices; the Triton kernels prefer int16.
        index_dtype = torch.int32 if torch.device(device).type == "cpu" else None
        return ops.pack_csr(weight, index_dtype=index_dtype)
    if kind == "bsr":
        assert blocksize is not None
        return ops.pack_bsr(weight, blocksize)
    if kind == "tiled":
        return ops.pack_tiled(weight)
    raise ValueError(f"format {fmt!r} is not sparse; dense layers keep their nn module")


class SparseLinear(nn.Module):
    """y = x @ W.T + b with W stored in one sparse format (csr, bsr(B) or tiled)."""

    # Buffers (those of the chosen format are registered; see BUFFERS).
    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    row_order: Tensor
    tile_crow: Tensor
    tile_col: Tensor
    tile_offsets: Tensor
    row_offsets: Tensor
    bitmaps: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str,
        buffers: dict[str, Tensor],
        bias: Tensor | None,
    ) -> None:
        super().__init__()
        kind, _ = parse_format(fmt)
        if kind not in BUFFERS:
            raise ValueError(f"format {fmt!r} is not sparse; known: csr, bsr(B), tiled")
        missing = set(BUFFERS[kind]) - set(buffers)
        if missing:
            raise ValueError(f"{fmt} buffers lack {sorted(missing)}")
        self.in_features, self.out_features, self.format, self.kind = (
            in_features,
            out_features,
            fmt,
            kind,
        )
        for name in BUFFERS[kind]:
            self.register_buffer(name, buffers[name])
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.relu = False  # a ReLU fused after the product (see ticketc.compile.lower)

    @classmethod
    def from_dense(
        cls, weight: Tensor, bias: Tensor | None, fmt: str, *, device: str | torch.device = "cpu"
    ) -> SparseLinear:
        """Pack `weight` [out, in] (pruned entries are zeros)."""
        weight = weight.detach()
        return cls(weight.shape[1], weight.shape[0], fmt, pack(weight, fmt, device=device), bias)

    @property
    def nnz(self) -> int:
        return int(self.values.count_nonzero()) if self.kind == "bsr" else self.values.numel()

    def forward(self, x: Tensor) -> Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # 2-D: no reshape per call
        if self.kind == "csr" and _eager_cpu(x2, self._buffers["values"]):
            y = self._csr_cpu_eager(x2)  # the common CPU case, with the least Python per call
        else:
            y = self._matmul(x2)
            y = torch.relu(y) if self.relu else y
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, x: Tensor) -> Tensor:
        if self.kind == "csr":
            return torch.ops.ticketc.csr_linear(
                x, self.crow_indices, self.col_indices, self.values, self.row_order, self.bias
            )
        if self.kind == "bsr":
            return torch.ops.ticketc.bsr_linear(
                x, self.crow_indices, self.col_indices, self.values, self.bias, self.out_features
            )
        return torch.ops.ticketc.tiled_linear(
            x,
            self.tile_crow,
            self.tile_col,
            self.tile_offsets,
            self.row_offsets,
            self.bitmaps,
            self.values,
            self.bias,
            self.out_features,
        )

    def _csr_cpu_eager(self, x: Tensor) -> Tensor:
        return self.cpu_csr()(x, relu=self.relu)

    def cpu_csr(self) -> ops.CpuCsr:
        """The weight made ready for the CPU kernels (ticketc.ops.CpuCsr; csr layers only).

        Skips ~15 us per call of custom-op dispatch, argument checks and preparing the weight
        (NumPy views, sparse tensor): prepared once, and again only when a buffer is replaced
        (.to(), assignment); in-place updates show through the views."""
        # self._buffers, not attributes: nn.Module's __getattr__ costs ~0.4 us per buffer.
        b = cast(dict[str, Tensor], self._buffers)
        cached = self.__dict__.get("_cpu_csr")
        if (
            cached is None
            or cached.values is not b["values"]
            or cached.crow_indices is not b["crow_indices"]
            or cached.col_indices is not b["col_indices"]
            or cached.bias is not b["bias"]
        ):
            cached = ops.CpuCsr(
                b["crow_indices"], b["col_indices"], b["values"], b["bias"], self.in_features
            )
            self.__dict__["_cpu_csr"] = cached
        return cached

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return f"{self.in_features}, {self.out_features}, format={self.format}{relu}"


class SparseConv(nn.Module):
    """Conv1d/Conv2d as unfold + a sparse GEMM over the [out, in*kh*kw] weight.

    Groups become a block-diagonal GEMM weight: row o only has columns of its group's input
    channels, so the sparse formats store no entry for the other groups. Conv1d runs as a
    Conv2d over a height of 1.
    """

    def __init__(
        self, conv: nn.Conv1d | nn.Conv2d, fmt: str, *, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__()
        self.dims = 1 if isinstance(conv, nn.Conv1d) else 2
        two = (lambda t: (1, *t)) if self.dims == 1 else (lambda t: tuple(t))
        self.in_channels, self.out_channels, self.groups = (
            conv.in_channels,
            conv.out_channels,
            conv.groups,
        )
        self.kernel_size = two(conv.kernel_size)
        self.stride = two(conv.stride)
        self.dilation = two(conv.dilation)
        self.padding_mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        # F.pad order: (left, right, top, bottom); 'same' may be asymmetric, as in torch.
        pads = []
        for i in (1, 0):
            if conv.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                pads += [total // 2, total - total // 2]
            elif conv.padding == "valid":
                pads += [0, 0]
            else:
                p = ((0, *conv.padding) if self.dims == 1 else conv.padding)[i]
                pads += [p, p]
        self.pad = tuple(pads)
        self.gemm = SparseLinear.from_dense(
            _block_diagonal(conv.weight.detach(), conv.groups), conv.bias, fmt, device=device
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.dims == 1:
            x = x.unsqueeze(2)  # [N, C, L] -> [N, C, 1, L]
        if any(self.pad):
            x = F.pad(x, self.pad, mode=self.padding_mode)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        oh = (h - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
        # [N, C*kh*kw, L] -> [N*L, C*kh*kw] -> GEMM -> [N, L, out] -> [N, out, oh, ow]
        y = self.gemm(cols.transpose(1, 2))
        y = y.transpose(1, 2).reshape(n, self.out_channels, oh, ow)
        return y.squeeze(2) if self.dims == 1 else y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, pad={self.pad}, dilation={self.dilation}, "
            f"groups={self.groups}, format={self.gemm.format}"
        )


class DenseLinear(nn.Linear):
    """nn.Linear that also takes its input feature-major, as a CPU csr layer outputs it.

    torch's linear on an input with strides (1, N) runs 2-3x slower than on a row-major one
    (MKL, 64 x 99 -> 10: 23 us vs 8 us, measured); the same product as W @ x.T runs at full
    speed and returns [N, M] feature-major for the next layer. Same parameters and state dict
    as nn.Linear; a compiled model's dense Linear layers are swapped for it.
    """

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> DenseLinear:
        """The same layer (its parameters, not copies) as a DenseLinear."""
        has_bias = layer.bias is not None
        new = cls(layer.in_features, layer.out_features, bias=has_bias, device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        return new.train(layer.training)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and x.stride(0) == 1 and x.shape[0] > 1 and not x.is_contiguous():
            xt = x.t()  # [K, N], contiguous when x is feature-major
            if self.bias is None:
                return torch.mm(self.weight, xt).t()
            return torch.addmm(self.bias[:, None], self.weight, xt).t()
        return super().forward(x)


class CsrSequential(nn.Sequential):
    """nn.Sequential whose runs of consecutive csr SparseLinear layers run as one CPU kernel
    call (ticketc.kernels.csr_cpu.CsrChain) in eager fp32 mode.

    Same children, names and state dict as the nn.Sequential it replaces. Called per layer, a
    small model pays Python, allocation and a thread wake-up per layer: Lenet-300-100 at 3.6 %,
    batch 64, 2 threads, ~100 us per layer-by-layer pass against ~50 us as one chain. Chains
    of at least NUMBA_MIN_BATCH rows, or of little work (where overhead dominates), run so;
    others layer by layer (MKL's small-batch products win on large layers). Under
    torch.compile, torch.export or on other devices and dtypes: plain nn.Sequential. Layers
    run in a chain are not called as modules: their forward hooks do not fire there.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not _eager_cpu(x, x) or x.dtype != torch.float32:
            return super().forward(x)
        run: list[SparseLinear] = []
        for i, module in enumerate(self._modules.values()):
            if type(module) is SparseLinear and module.kind == "csr":
                run.append(module)
                continue
            if run:
                x, run = self._run(i - len(run), run, x), []
            x = module(x)
        return self._run(len(self) - len(run), run, x) if run else x

    def _run(self, start: int, run: list[SparseLinear], x: Tensor) -> Tensor:
        n = x.shape[0] if x.dim() == 2 else 0
        layers = [m.cpu_csr() for m in run]
        if (
            n == 0
            or len(run) == 1
            or x.shape[1] != run[0].in_features
            or layers[0].values.dtype != torch.float32
            or not ops.runs_as_chain(n, sum(c.nnz for c in layers))
        ):
            for m in run:
                x = m(x)
            return x
        relus = [m.relu for m in run]
        chains = self.__dict__.setdefault("_csr_chains", {})
        cached = chains.get(start)
        if (
            cached is None
            or cached[2] != relus
            or len(cached[1]) != len(layers)
            or any(a is not b for a, b in zip(cached[1], layers, strict=True))
        ):
            chain = ops.cpu_csr_chain(layers, relus)
            chains[start] = cached = (chain, layers, relus)
        return cached[0](x)


def _eager_cpu(x: Tensor, values: Tensor | None) -> bool:
    """True for plain eager CPU fp32/fp64 calls: not under torch.compile, torch.export or
    tracing, where the custom op (with its fake kernel) must appear in the graph."""
    return (
        type(x) is Tensor
        and values is not None
        and x.is_cpu
        and x.dtype == values.dtype
        and x.dtype in (torch.float32, torch.float64)
        and values.is_cpu
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def _block_diagonal(weight: Tensor, groups: int) -> Tensor:
    """[out, in/groups, *k] -> [out, in*prod(k)]: each group's rows see only its channels."""
    out = weight.shape[0]
    w2 = weight.reshape(out, -1)  # [out, in/groups * kk], channel-major like unfold
    if groups == 1:
        return w2
    og, width = out // groups, w2.shape[1]
    full = w2.new_zeros(out, width * groups)
    for g in range(groups):
        full[g * og : (g + 1) * og, g * width : (g + 1) * width] = w2[g * og : (g + 1) * og]
    return full


def sparse_module(layer: nn.Module, fmt: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """The sparse replacement of a Linear / Conv1d / Conv2d in format `fmt`."""
    if isinstance(layer, nn.Linear):
        return SparseLinear.from_dense(layer.weight, layer.bias, fmt, device=device)
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        return SparseConv(layer, fmt, device=device)
    raise TypeError(f"cannot make {type(layer).__name__} sparse; expected Linear, Conv1d, Conv2d")
