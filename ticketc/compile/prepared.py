"""Prepared CPU kernels cached on the modules that own their buffers, and the test for the
eager path that calls them directly.

A compiled layer's CPU kernel (Numba arrays, a chain's packed layers) is built once from the
module's buffers and reused while those buffers are unchanged: same tensor objects, same version
counters (an in-place update or a `.to()` makes a new one).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor


class _Kernel:
    """A prepared CPU kernel object and the module buffers it was made from: valid while each
    buffer slot (a module's `_buffers` dict and a name) holds the same tensor, unchanged in
    place. The check runs on every call, so it is a few C-level loops: tensor identity, and
    the sum of the version counters (each only grows, so an unchanged sum means no tensor
    changed). The tensors are kept referenced so that their ids cannot be reused by others."""

    __slots__ = ("dicts", "extra", "names", "tensors", "value", "version")

    def __init__(self, slots: list[tuple[dict[str, Any], str]], extra: object, build: Any) -> None:
        self.dicts = [d for d, _ in slots]
        self.names = [n for _, n in slots]
        self.tensors: list[Tensor | None] = list(map(dict.get, self.dicts, self.names))
        self.extra = extra
        self.version = _version_sum(self.tensors)
        self.value = build(self.tensors)

    def valid(self, extra: object) -> bool:
        current = map(dict.get, self.dicts, self.names)
        return (
            all(map(operator.is_, current, self.tensors))
            and _version_sum(self.tensors) == self.version
            and self.extra == extra
        )


_VERSION = operator.attrgetter("_version")


def _version_sum(tensors: list[Tensor | None]) -> int:
    return sum(map(_VERSION, [t for t in tensors if t is not None]))


def prepared_kernel(
    owner: dict[str, Any], slots: Any, extra: object, build: Any, key: str = "_cpu"
) -> Any:
    """owner[key].value if still valid, else build(tensors) on the tensors now in `slots`
    (a list of (module._buffers, name), or a callable returning it), kept in owner[key]."""
    kernel = owner.get(key)
    if kernel is None or not kernel.valid(extra):
        kernel = owner[key] = _Kernel(slots() if callable(slots) else slots, extra, build)
    return kernel.value


def eager_cpu_fp32(x: Tensor, values: Tensor | None) -> bool:
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
