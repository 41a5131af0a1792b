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


class _Prepared:
    """A prepared CPU kernel object with the fingerprint of the buffers it was made from: valid
    while the module's buffers are the same tensors, unchanged in place (version counters).
    The tensors are kept referenced so that their ids cannot be reused by others."""

    __slots__ = ("extra", "fingerprint", "tensors", "value")

    def __init__(self, tensors: tuple[Tensor | None, ...], extra: object, value: Any) -> None:
        self.tensors, self.extra, self.value = tensors, extra, value
        self.fingerprint = _fingerprint(tensors)

    def valid(self, tensors: tuple[Tensor | None, ...], extra: object) -> bool:
        return self.extra == extra and self.fingerprint == _fingerprint(tensors)


def _fingerprint(tensors: tuple[Tensor | None, ...]) -> list[int]:
    out: list[int] = []
    for t in tensors:
        if t is None:
            out += (0, -1)
        else:
            out += (id(t), t._version)
    return out


def _prepared(
    owner: dict[str, Any], tensors: tuple[Tensor | None, ...], extra: object, build: Any
) -> Any:
    """owner["_cpu"].value if still valid for these tensors and `extra`, else build() (kept)."""
    prepared = owner.get("_cpu")
    if prepared is None or not prepared.valid(tensors, extra):
        prepared = owner["_cpu"] = _Prepared(tensors, extra, build())
    return prepared.value


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
        if self.layout == "csr" and _eager_cpu_fp32(x2, self._buffers["values"]):
            y = self.cpu_chain()(x2)  # the common CPU case, with the least Python per call
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
        crow, col, values, bias = tensors = self.csr_tensors()
        return _prepared(
            self.__dict__,
            tensors,
            self.relu,
            lambda: ops.cpu_chain([(crow, col, values, bias, self.in_features)], [self.relu]),
        )

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return f"{self.in_features}, {self.out_features}, format={self.format}{relu}"


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
        if _eager_cpu_fp32(x, b["values"]) and x.dim() == 4:
            tensors = (b["crow_indices"], b["col_indices"], b["values"], b.get("bias"))
            conv = _prepared(
                self.__dict__,
                tensors,
                pads,
                lambda: ops.cpu_conv(*tensors, self.weight_shape2, self.stride2, pads,
                                     self.dilation2, self.groups),
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


class CsrSequential(nn.Sequential):
    """nn.Sequential whose runs of consecutive csr SparseLinear layers (ReLUs fused into them)
    run as one kernel call: ticketc.kernels.csr_chain_cpu.CsrChain in eager CPU fp32 mode, the
    op `torch.ops.ticketc.csr_chain` otherwise (one graph node per run under torch.export).

    Same children, names and state dict as the nn.Sequential it replaces. An nn.Flatten right
    before a run is applied inline. Called per layer, a small model pays Python and a kernel
    call per layer (Lenet-300-100 at 3.6 %, batch 1: ~4 us per module call against ~9 us for
    the whole chain's products). Layers run in a chain are not called as modules: their
    forward hooks do not fire there.
    """

    def forward(self, x: Tensor) -> Tensor:
        steps = self.__dict__.get("_steps")
        if steps is None:
            steps = self.__dict__["_steps"] = _steps(list(self._modules.values()))
        eager = _eager_cpu_fp32(x, x)
        for step in steps:
            x = step(x, eager) if type(step) is _Run else step(x)
        return x

    def _apply(self, fn: Any, recurse: bool = True) -> CsrSequential:
        self.__dict__.pop("_steps", None)  # .to() / .float(): buffers are new tensors
        return cast(CsrSequential, super()._apply(fn, recurse))


class _Run:
    """Consecutive csr SparseLinear layers of a CsrSequential (after an optional Flatten)."""

    def __init__(self, flatten: nn.Flatten | None, layers: list[SparseLinear]) -> None:
        self.flatten, self.layers = flatten, layers
        self.relus = [m.relu for m in layers]
        self.prepared: dict[str, Any] = {}

    def __call__(self, x: Tensor, eager: bool) -> Tensor:
        if self.flatten is not None:
            x = x.flatten(self.flatten.start_dim, self.flatten.end_dim)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.layers[0].in_features)
        tensors = [m.csr_tensors() for m in self.layers]
        if eager and x2.shape[1] == self.layers[0].in_features:
            layers = [(*ts, m.in_features) for ts, m in zip(tensors, self.layers, strict=True)]
            flat = tuple(t for ts in tensors for t in ts)
            chain = _prepared(self.prepared, flat, self.relus,
                              lambda: ops.cpu_chain(layers, self.relus))  # fmt: skip
            y = chain(x2)
        else:
            y = torch.ops.ticketc.csr_chain(
                x2,
                [t[0] for t in tensors],
                [t[1] for t in tensors],
                [t[2] for t in tensors],
                [t[3] for t in tensors],
                self.relus,
            )
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _steps(children: list[nn.Module]) -> list[Any]:
    """The children of a CsrSequential with runs of >= 2 csr layers grouped into _Run."""
    steps: list[Any] = []
    i = 0
    while i < len(children):
        j = i + (type(children[i]) is nn.Flatten)
        run: list[SparseLinear] = []
        while j < len(children) and is_csr_linear(children[j]):
            if run and run[-1].out_features != children[j].in_features:  # type: ignore[union-attr]
                break
            run.append(cast(SparseLinear, children[j]))
            j += 1
        if len(run) >= 2:
            flatten = cast(nn.Flatten, children[i]) if j - len(run) > i else None
            steps.append(_Run(flatten, run))
            i = j
        else:
            steps.append(children[i])
            i += 1
    return steps


def is_csr_linear(module: nn.Module) -> bool:
    return type(module) is SparseLinear and module.layout == "csr"


def _eager_cpu_fp32(x: Tensor, values: Tensor | None) -> bool:
    """True for plain eager CPU fp32 calls: not under torch.compile, torch.export or tracing,
    where the custom op (with its fake kernel) must appear in the graph."""
    return (
        type(x) is Tensor
        and values is not None
        and x.dtype == torch.float32
        and values.dtype == torch.float32
        and x.is_cpu
        and values.is_cpu
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch._C._is_torch_function_mode_enabled()
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
    """Whether `layer` is a Linear / Conv1d / Conv2d whose computation is the plain one: its
    class (nn.Linear or a subclass such as MultiheadAttention's out_proj) does not override
    forward (a subclass that standardises or pads its weight in forward must keep it)."""
    if isinstance(layer, nn.Linear):
        return type(layer).forward is nn.Linear.forward
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        base = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        return (
            type(layer).forward is base.forward
            and type(layer)._conv_forward is base._conv_forward
            and not layer.transposed
        )
    return False


def sparse_module(layer: nn.Module, fmt: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """The sparse replacement of a Linear / Conv1d / Conv2d in format `fmt`."""
    if isinstance(layer, nn.Linear):
        return SparseLinear.from_dense(layer.weight, layer.bias, fmt, device=device)
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        return SparseConv(layer, fmt, device=device)
    raise TypeError(f"cannot make {type(layer).__name__} sparse; expected Linear, Conv1d, Conv2d")
