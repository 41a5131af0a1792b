"""The eager entry points `csr_linear`, `bsr_linear`, `tiled_linear`: the ops without the
dispatcher's per-call cost (benchmarks/kernels_bench.py times the kernels through them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ticketc.ops.cpu import bsr_linear_cpu, csr_linear_cpu
from ticketc.ops.cuda import bsr_linear_cuda, csr_linear_cuda, tiled_linear_cuda
from ticketc.ops.registration import _tiled_linear_default  # registers the ops

_Impl = Callable[..., Tensor]

# torch.ops.ticketc.* reaches the Python kernels (ticketc.ops.cpu / cuda) through the C++
# dispatcher, which costs ~10 us per call (measured): as much as MKL's whole product for a Lenet
# layer, or twice a batch-1 GPU kernel. On plain tensors outside torch.compile / torch.export
# tracing, these functions call the same kernels directly; anything else (fake tensors, tracing,
# tensor subclasses, devices other than CPU / CUDA) goes through the registered op, so graphs
# still hold torch.ops.ticketc.* nodes.


def _plain_eager(x: Tensor) -> bool:
    """Whether x is a plain tensor outside tracing, torch function modes and torch.compile."""
    return (
        type(x) is Tensor
        and not torch._C._is_torch_function_mode_enabled()
        and not torch.compiler.is_compiling()
    )


def _entry(op: str, impls: dict[str, _Impl]) -> _Impl:
    registered = getattr(torch.ops.ticketc, op)

    def call(x: Tensor, *args: Any) -> Tensor:
        impl = impls.get(x.device.type) if _plain_eager(x) else None
        return (impl or registered)(x, *args)

    call.__name__ = call.__qualname__ = op
    call.__doc__ = (
        f"torch.ops.ticketc.{op}(x, ...) (same arguments, see ticketc.ops) without the "
        "dispatcher's per-call cost in eager mode on CPU / CUDA."
    )
    return call


csr_linear = _entry("csr_linear", {"cpu": csr_linear_cpu, "cuda": csr_linear_cuda})
bsr_linear = _entry("bsr_linear", {"cpu": bsr_linear_cpu, "cuda": bsr_linear_cuda})
tiled_linear = _entry("tiled_linear", {"cpu": _tiled_linear_default, "cuda": tiled_linear_cuda})
