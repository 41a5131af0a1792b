"""Sparse replacements for Linear and Conv1d/Conv2d that hold only the packed sparse data.

Buffers are exactly the arrays of a ticketc.formats layout (CSR, BSR, Tiled) plus the bias, so a
compiled model's state dict, `torch.export` program and memory hold no dense-size copy of a
pruned weight. They keep the interface code reads from the layers they replace: `weight` (a
dense tensor built on each access: reading it costs a full unpack, so the planner keeps dense
any layer whose weight the model itself reads while running), `bias`, `in_features` /
`out_features`, `in_channels` / `out_channels`, `kernel_size` / `stride` / `padding` /
`dilation` as tuples of the layer's own length (1 for Conv1d), `groups`, `padding_mode`.

The forward calls ticketc's kernels: in eager CPU fp32 mode the Numba kernels directly (no
dispatcher), otherwise the `torch.ops.ticketc.*` custom ops (CPU, CUDA, and fake kernels for
torch.compile / torch.export).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ticketc.ops as ops  # registers torch.ops.ticketc.*
from ticketc.compile.costs import parse_format
from ticketc.compile.prepared import eager_cpu_fp32, prepared_kernel
from ticketc.formats import BSR, CSR, LAYOUTS, Tiled
from ticketc.formats.csr import index_dtype_for


def pack(weight: Tensor, fmt: str, *, device: str | torch.device = "cpu") -> CSR | BSR | Tiled:
    """The weight (zeros = pruned) in sparse format `fmt`, with the index dtypes the runtime
    uses on `device`."""
    layout, blocksize = parse_format(fmt)
    if layout == "csr":
        return CSR.from_dense(weight, index_dtype=index_dtype_for(device))
    if layout == "bsr":
        assert blocksize is not None
        return BSR.from_dense(weight, blocksize)
    if layout == "tiled":
        return Tiled.from_dense(weight)
    raise ValueError(f"format {fmt!r} is not sparse; dense layers keep their nn module")


_CSR = ("crow_indices", "col_indices", "values", "bias")


class SparseLinear(nn.Module):
    """y = x @ W.T + b with W stored in one sparse format (csr, bsr(B) or tiled)."""

    # Buffers (those of the chosen format's `BUFFERS` are registered).
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
        layout, _ = parse_format(fmt)
        if layout not in LAYOUTS:
            raise ValueError(f"format {fmt!r} is not sparse; known: csr, bsr(B), tiled")
        missing = set(LAYOUTS[layout].BUFFERS) - set(buffers)
        if missing:
            raise ValueError(f"{fmt} buffers lack {sorted(missing)}")
        self.in_features, self.out_features = in_features, out_features
        self.format, self.layout = fmt, layout
        for name in LAYOUTS[layout].BUFFERS:
            self.register_buffer(name, buffers[name])
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.relu = False  # a ReLU fused after the product (see ticketc.compile.lower)
        self.weight_reads = 0  # how often `weight` was built (the planner reads this)

    @classmethod
    def from_dense(
        cls, weight: Tensor, bias: Tensor | None, fmt: str, *, device: str | torch.device = "cpu"
    ) -> SparseLinear:
        """Pack `weight` [out, in] (pruned entries are zeros)."""
        weight = weight.detach()
        buffers = pack(weight, fmt, device=device).buffers()
        return cls(weight.shape[1], weight.shape[0], fmt, buffers, bias)

    @property
    def weight(self) -> Tensor:
        """The dense weight [out_features, in_features], built from the sparse buffers on each
        access (not a parameter: changing it changes nothing)."""
        self.weight_reads += 1
        b = cast(dict[str, Tensor], self._buffers)
        shape = (self.out_features, self.in_features)
        return LAYOUTS[self.layout].from_buffers(shape, b).to_dense()

    @property
    def nnz(self) -> int:
        return int(self.values.count_nonzero()) if self.layout == "bsr" else self.values.numel()

    def forward(self, x: Tensor) -> Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.layout == "csr" and eager_cpu_fp32(x2, self._buffers["values"]):
            chain = self.cpu_chain()  # the common CPU case, with the least Python per call
            one = x2.shape[0] == 1 and x2.shape[1] == self.in_features
            y = chain.one(x2) if one else chain(x2)
        else:
            y = self._op(x2)
            y = torch.relu(y) if self.relu else y
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _op(self, x: Tensor) -> Tensor:
        if self.layout == "csr":
            return torch.ops.ticketc.csr_linear(
                x, self.crow_indices, self.col_indices, self.values, self.row_order, self.bias
            )
        if self.layout == "bsr":
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

    def csr_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(crow_indices, col_indices, values, bias) of a csr layer."""
        b = cast(dict[str, Tensor], self._buffers)  # not nn.Module's ~0.4 us __getattr__
        return b["crow_indices"], b["col_indices"], b["values"], b.get("bias")

    def cpu_chain(self) -> Any:
        """This layer (ReLU fused if set) as a ticketc.kernels.csr_chain_cpu.CsrChain, made
        once and again only when a buffer is replaced or changed in place."""
        b = self._buffers
        return prepared_kernel(
            self.__dict__,
            lambda: [(b, name) for name in _CSR],
            self.relu,
            lambda ts: ops.cpu_chain([(*ts, self.in_features)], [self.relu]),
        )

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return f"{self.in_features}, {self.out_features}, format={self.format}{relu}"


class SparseConv1D(SparseLinear):
    """transformers' Conv1D (GPT-2's attention and MLP projections: y = x @ W + b with W
    stored [in, out]) with a sparse weight, run as a SparseLinear on W.T. Keeps what code
    reads from a Conv1D: `weight` [nx, nf] (built on each access), `bias`, `nf` (out
    features), `nx` (in features)."""

    nf: int
    nx: int

    @classmethod
    def from_conv1d(
        cls, layer: nn.Module, fmt: str, *, device: str | torch.device = "cpu"
    ) -> SparseConv1D:
        weight = cast(Tensor, layer.weight).detach().t()  # [out, in]
        bias = cast(Tensor | None, layer.bias)
        buffers = pack(weight, fmt, device=device).buffers()
        sparse = cls(weight.shape[1], weight.shape[0], fmt, buffers, bias)
        sparse.nf, sparse.nx = sparse.out_features, sparse.in_features
        return sparse

    @property
    def weight(self) -> Tensor:
        """The dense weight [nx, nf] (in, out), as Conv1D stores it."""
        return SparseLinear.weight.fget(self).t()  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return f"nf={self.out_features}, nx={self.in_features}, format={self.format}"


def is_conv1d(layer: nn.Module) -> bool:
    """Whether `layer` is transformers' Conv1D (weight [in, out], plain forward), found by
    its class's name and module so that transformers need not be imported."""
    cls = type(layer)
    weight = getattr(layer, "weight", None)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers.")
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and isinstance(getattr(layer, "nf", None), int)
    )


def linear_weight(layer: nn.Module) -> Tensor:
    """The weight [out, in] of a Linear or a transformers Conv1D (its [in, out] transposed)."""
    weight = cast(Tensor, layer.weight)
    return weight.t() if is_conv1d(layer) else weight


def _pads(conv: nn.Conv1d | nn.Conv2d) -> tuple[int, int, int, int]:
    """The conv's zero padding as (top, bottom, left, right) of a 2-D conv ('same' may be
    asymmetric, as in torch: the extra pixel goes bottom / right)."""
    dims = 1 if isinstance(conv, nn.Conv1d) else 2
    kernel = (1, *conv.kernel_size) if dims == 1 else tuple(conv.kernel_size)
    dilation = (1, *conv.dilation) if dims == 1 else tuple(conv.dilation)
    pads: list[int] = []
    for i in (0, 1):
        if conv.padding == "same":
            total = dilation[i] * (kernel[i] - 1)
            pads += [total // 2, total - total // 2]
        elif conv.padding == "valid":
            pads += [0, 0]
        else:
            p = cast(tuple[int, ...], (0, *conv.padding) if dims == 1 else tuple(conv.padding))
            pads += [int(p[i]), int(p[i])]
    return pads[0], pads[1], pads[2], pads[3]


class SparseConv(nn.Module):
    """Conv1d / Conv2d with a sparse weight.

    csr: the weight [out, in/groups, *k] stored as CSR over its rows flattened to
    [out, in/groups * prod(k)], run by direct sparse convolution (ticketc.kernels.csr_conv_cpu
    on CPU; the op `torch.ops.ticketc.csr_conv2d` elsewhere and under torch.export). bsr / tiled
    (GPU formats): unfold + a sparse GEMM over a block-diagonal weight (`gemm`). A Conv1d runs
    as a Conv2d over a height of 1 and reports 1-tuples, as nn.Conv1d does.
    """

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    row_order: Tensor
    bias: Tensor | None

    def __init__(
        self, conv: nn.Conv1d | nn.Conv2d, fmt: str, *, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__()
        self.dims = 1 if isinstance(conv, nn.Conv1d) else 2
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self.output_padding = tuple(conv.output_padding)
        self.transposed = False
        self.relu = False
        self.weight_reads = 0
        # 2-D geometry of the kernels
        self.pads = _pads(conv)
        self.stride2 = (1, *self.stride) if self.dims == 1 else self.stride
        self.dilation2 = (1, *self.dilation) if self.dims == 1 else self.dilation
        self.weight_shape = tuple(conv.weight.shape)
        self.weight_shape2 = (
            (self.weight_shape[0], self.weight_shape[1], 1, self.weight_shape[2])
            if self.dims == 1
            else self.weight_shape
        )
        self.layout, _ = parse_format(fmt)
        self.format = fmt
        weight = conv.weight.detach()
        if self.layout == "csr":
            for name, t in pack(weight, "csr", device=device).buffers().items():
                self.register_buffer(name, t)
            self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        else:
            self.gemm = SparseLinear.from_dense(
                _block_diagonal(weight, conv.groups), conv.bias, fmt, device=device
            )

    @property
    def weight(self) -> Tensor:
        """The dense weight [out, in/groups, *kernel_size], built on each access."""
        self.weight_reads += 1
        if self.layout != "csr":
            full = self.gemm.weight.reshape(self.out_channels, self.in_channels, -1)
            og, cg = self.out_channels // self.groups, self.in_channels // self.groups
            parts = [full[g * og : (g + 1) * og, g * cg : (g + 1) * cg] for g in range(self.groups)]
            return torch.cat(parts).reshape(self.weight_shape)
        b = cast(dict[str, Tensor], self._buffers)
        return CSR.from_buffers(self.weight_shape, b).to_dense()

    def forward(self, x: Tensor) -> Tensor:
        if self.dims == 1:
            x = x.unsqueeze(2)  # [N, C, L] -> [N, C, 1, L]
        if self.padding_mode != "zeros":
            pt, pb, pl, pr = self.pads
            x = F.pad(x, (pl, pr, pt, pb), mode=self.padding_mode)
            pads: tuple[int, int, int, int] = (0, 0, 0, 0)
        else:
            pads = self.pads
        if self.layout == "csr":
            y = self._csr(x, pads)
        else:
            y = self._gemm(x, pads)
            y = torch.relu(y) if self.relu else y
        return y.squeeze(2) if self.dims == 1 else y

    def _csr(self, x: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
        b = cast(dict[str, Tensor], self._buffers)
        if eager_cpu_fp32(x, b["values"]) and x.dim() == 4:
            conv = prepared_kernel(
                self.__dict__,
                lambda: [(b, name) for name in _CSR],
                pads,
                lambda ts: ops.cpu_conv(ts[0], ts[1], ts[2], ts[3], self.weight_shape2,
                                        self.stride2, pads, self.dilation2, self.groups),
            )  # fmt: skip
            return conv(x, relu=self.relu)
        return torch.ops.ticketc.csr_conv2d(
            x, b["crow_indices"], b["col_indices"], b["values"], b.get("bias"),
            list(self.weight_shape2), list(self.stride2), list(pads), list(self.dilation2),
            self.groups, self.relu,
        )  # fmt: skip

    def _gemm(self, x: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
        pt, pb, pl, pr = pads
        if any(pads):
            x = F.pad(x, (pl, pr, pt, pb))
        n, _, h, w = x.shape
        kernel = self.weight_shape2[2:]
        oh, ow = ops.conv_output_size(h, w, list(kernel), list(self.stride2), [0, 0, 0, 0],
                                      list(self.dilation2))  # fmt: skip
        cols = F.unfold(x, kernel, dilation=self.dilation2, stride=self.stride2)
        # [N, C*kh*kw, L] -> [N*L, C*kh*kw] -> GEMM -> [N, L, out] -> [N, out, oh, ow]
        y = self.gemm(cols.transpose(1, 2))
        return y.transpose(1, 2).reshape(n, self.out_channels, oh, ow)

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, format={self.format}{relu}"
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


def replaceable(layer: nn.Module) -> bool:
    """Whether `layer` is a Linear / Conv1d / Conv2d (or transformers' Conv1D, a Linear with
    its weight stored transposed) whose computation is the plain one: its
    class (nn.Linear or a subclass such as MultiheadAttention's out_proj) does not override
    forward (a subclass that standardises or pads its weight in forward must keep it)."""
    if isinstance(layer, nn.Linear):
        return type(layer).forward is nn.Linear.forward
    if is_conv1d(layer):
        return True
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        base = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        return (
            type(layer).forward is base.forward
            and type(layer)._conv_forward is base._conv_forward
            and not layer.transposed
        )
    return False


def sparse_module(layer: nn.Module, fmt: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """The sparse replacement of a Linear / Conv1d / Conv2d / transformers Conv1D in format
    `fmt`."""
    if isinstance(layer, nn.Linear):
        return SparseLinear.from_dense(layer.weight, layer.bias, fmt, device=device)
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        return SparseConv(layer, fmt, device=device)
    if is_conv1d(layer):
        return SparseConv1D.from_conv1d(layer, fmt, device=device)
    raise TypeError(f"cannot make {type(layer).__name__} sparse; expected Linear, Conv1d, Conv2d")
