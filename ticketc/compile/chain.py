"""Runs of consecutive csr SparseLinear layers executed as one kernel call (`CsrSequential`),
and the two rewrites that set them up: `fuse_relu_` (a ReLU after a sparse layer moves into it)
and `chain_csr` (a Sequential with such a run becomes a CsrSequential). Used by `lower` when it
applies a plan and by `planner` when it times a chain against its layers."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, cast

import torch
from torch import Tensor, nn

import ticketc.ops as ops  # registers torch.ops.ticketc.*
from ticketc.compile.modules import _CSR, SparseConv, SparseLinear
from ticketc.compile.prepared import eager_cpu_fp32, prepared_kernel


class CsrSequential(nn.Sequential):
    """nn.Sequential whose runs of consecutive csr SparseLinear layers (ReLUs fused into them)
    run as one kernel call: ticketc.kernels.csr_chain_cpu.CsrChain in eager CPU fp32 mode, the
    op `torch.ops.ticketc.csr_chain` otherwise (one graph node per run under torch.export).

    Same children, names and state dict as the nn.Sequential it replaces. An nn.Flatten right
    before a run is applied inline. At batch 1 a run is one call of the chain's kernel with the
    input's and output's addresses: no module call, tensor view or NumPy array per layer (the
    Lenet ticket, 1 thread, on a loaded 2-core machine: 16 us per call where the chain's
    Python wrapping made it 23 us; the kernel itself ~9 us). Layers run in a chain are not
    called as modules: their forward hooks do not fire there.
    """

    def forward(self, input: Tensor) -> Tensor:  # nn.Sequential's name: callers may pass it
        x = input
        steps = self.__dict__.get("_steps")
        if steps is None:
            steps = self.__dict__["_steps"] = _steps(list(self._modules.values()))
        eager = eager_cpu_fp32(x, x)
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
        self.in_features = layers[0].in_features
        # A Flatten of every dim after the batch: one sample is any tensor of in_features
        # values, read in place by the batch-1 path.
        self.flat_rows = flatten is None or (flatten.start_dim == 1 and flatten.end_dim == -1)
        self.slots = [(m._buffers, name) for m in layers for name in _CSR]
        self.kernel: dict[str, Any] = {}

    def __call__(self, x: Tensor, eager: bool) -> Tensor:
        if eager:
            chain = prepared_kernel(self.kernel, self.slots, self.relus, self._build)
            n = x.shape[0]
            rows = self.flat_rows and (x.dim() == 2 or (x.dim() > 2 and self.flatten is not None))
            if rows and x.numel() == n * self.in_features:
                return chain.run(x, n)  # the hot path: no view made, one kernel call
        if self.flatten is not None:
            x = x.flatten(self.flatten.start_dim, self.flatten.end_dim)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if eager and x2.shape[1] == self.in_features:
            y = chain(x2)
        else:
            tensors = [m.csr_tensors() for m in self.layers]
            y = torch.ops.ticketc.csr_chain(
                x2,
                [t[0] for t in tensors],
                [t[1] for t in tensors],
                [t[2] for t in tensors],
                [t[3] for t in tensors],
                self.relus,
            )
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    def _build(self, tensors: list[Tensor | None]) -> Any:
        t = cast(list[Tensor], tensors)  # crow, col, values, bias (None or a tensor) per layer
        layers = [
            (t[4 * i], t[4 * i + 1], t[4 * i + 2], tensors[4 * i + 3], m.in_features)
            for i, m in enumerate(self.layers)
        ]
        return ops.cpu_chain(layers, self.relus)


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


def fuse_relu_(model: nn.Module) -> None:
    """In every nn.Sequential, a ReLU right after a SparseLinear / SparseConv moves into it: the
    CPU kernels apply it to each output row while the row is in cache. The ReLU leaves the
    Sequential (the other children keep their names, so state dict keys and plan names do not
    change): one module call and one pass over the activations fewer per layer."""
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        fused = []
        for (_, layer), (name, act) in zip(children, children[1:], strict=False):
            if (
                isinstance(layer, SparseLinear | SparseConv)
                and type(act) is nn.ReLU
                and not layer.relu
            ):
                layer.relu = True
                fused.append(name)
        for name in fused:
            delattr(seq, name)


def chain_csr(model: nn.Module) -> nn.Module:
    """Every nn.Sequential holding two csr SparseLinear layers in a row is replaced by a
    CsrSequential with the same children, names and hooks, which runs such runs as one kernel
    call. Returns the model (the new root if the root itself was such a Sequential)."""
    swaps: list[tuple[str, nn.Sequential]] = []
    for name, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq.children())
        pairs = zip(children, children[1:], strict=False)
        if any(is_csr_linear(a) and is_csr_linear(b) for a, b in pairs):
            swaps.append((name, seq))
    for name, seq in swaps:
        new = CsrSequential(OrderedDict(seq.named_children()))
        new.train(seq.training)
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            getattr(new, hooks).update(getattr(seq, hooks))
        for key, value in vars(seq).items():  # plain attributes the user set
            if not key.startswith("_") and key != "training":
                setattr(new, key, value)
        if not name:
            model = new
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model
