"""Threads for the CPU inference kernels: the calling thread plus helpers that join when they can.

A kernel is a `nogil` Numba function `kernel(state, slot, *args)` whose work is cut into chunks,
in one or more phases (e.g. "fill the input planes", then "compute the output rows"). Each
participant claims chunks with an atomic counter until none is left, marks each chunk done, and
at the end of a phase waits until every chunk of that phase is done:

    for phase in range(phases):
        while (c := claim(state, phase)) < chunks[phase]:
            run chunk c of this phase
            finish(state, phase)
        wait_done(state, phase, chunks[phase])

`run(kernel, args, helpers)` posts the task to up to `helpers` helper threads and then runs the
kernel on the calling thread, which on its own completes every chunk: a helper that wakes late
(its core busy with another process) finds nothing left and returns, so the call never waits
for a thread that is not running. (A barrier-based pool such as OpenMP, Numba's default, waits
for every thread at the end of each parallel region: on this 2-core machine with another process
busy, a 2-thread Numba kernel took 5.4 ms instead of 0.69 ms at 1 thread, measured.) Idle
helpers sleep on a lock, never spin, so they take no CPU from torch's own threads.

The number of threads follows `torch.get_num_threads()` (see `num_threads`); helpers are started
on first use, never at import.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# ------------------------------------------------------------------------ atomics (Numba side)


@intrinsic
def _atomic_add(typingctx, array, index, value):  # type: ignore[no-untyped-def]
    """Old value of array[index], which becomes old + value (sequentially consistent)."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None
    sig = types.int64(array, index, value)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        arr_t, _, _ = signature.args
        arr, idx, val = args
        ary = context.make_array(arr_t)(context, builder, arr)
        ptr = cgutils.get_item_pointer(context, builder, arr_t, ary, [idx])
        val = context.cast(builder, val, signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, val, "seq_cst")

    return sig, codegen


@intrinsic
def _atomic_load(typingctx, array, index):  # type: ignore[no-untyped-def]
    """array[index], read atomically (so a wait loop re-reads memory every time)."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None
    sig = types.int64(array, index)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        arr_t, _ = signature.args
        arr, idx = args
        ary = context.make_array(arr_t)(context, builder, arr)
        ptr = cgutils.get_item_pointer(context, builder, arr_t, ary, [idx])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def _pause(typingctx):  # type: ignore[no-untyped-def]
    """The x86 `pause` hint inside a spin-wait (elsewhere: nothing)."""
    sig = types.void()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        if "86" in builder.module.triple:  # an LLVM intrinsic (Numba cannot emit inline asm)
            fnty = ir.FunctionType(ir.VoidType(), [])
            pause = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always", nogil=True)
def claim(state, phase):  # type: ignore[no-untyped-def]
    """The next unclaimed chunk of `phase` (>= its chunk count when none is left)."""
    return _atomic_add(state, 2 * phase, 1)


@numba.njit(inline="always", nogil=True)
def finish(state, phase):  # type: ignore[no-untyped-def]
    """Mark one claimed chunk of `phase` done."""
    _atomic_add(state, 2 * phase + 1, 1)


@numba.njit(inline="always", nogil=True)
def wait_done(state, phase, chunks):  # type: ignore[no-untyped-def]
    """Wait until all `chunks` chunks of `phase` are done (only chunks claimed and running are
    waited for: every chunk is claimed by the time a participant gets here)."""
    while _atomic_load(state, 2 * phase + 1) < chunks:
        _pause()


def new_state(phases: int) -> np.ndarray:
    """The counters of one task: claimed and done chunks per phase."""
    return np.zeros(2 * phases, dtype=np.int64)


# ------------------------------------------------------------------------- helpers (Python)


_CPUS = os.cpu_count() or 1


def num_threads() -> int:
    """Threads a CPU kernel may use: torch's setting (`torch.set_num_threads`), at most the
    machine's CPUs."""
    threads = torch.get_num_threads()
    return threads if threads <= _CPUS else _CPUS


class _Helper(threading.Thread):
    def __init__(self, pool: _Pool, slot: int) -> None:
        super().__init__(name=f"ticketc-cpu-{slot}", daemon=True)
        self.pool, self.slot = pool, slot
        self.go = threading.Lock()
        self.go.acquire()

    def run(self) -> None:
        while True:
            self.go.acquire()  # sleeps until a task is posted
            task = self.pool.task
            if task is None:
                continue
            kernel, state, args = task
            # Should a kernel fail here, the calling thread still does every chunk itself.
            with contextlib.suppress(Exception):
                kernel(state, self.slot, *args)


class _Pool:
    def __init__(self) -> None:
        self.helpers: list[_Helper] = []
        self.task: tuple[Callable[..., Any], np.ndarray, tuple] | None = None
        self.busy = threading.Lock()  # one task at a time owns the helpers

    def reset(self) -> None:  # in a forked child: the helper threads do not exist there
        self.helpers, self.task, self.busy = [], None, threading.Lock()

    def post(self, kernel: Callable[..., Any], state: np.ndarray, args: tuple, n: int) -> None:
        while len(self.helpers) < n:
            helper = _Helper(self, len(self.helpers) + 1)
            helper.start()
            self.helpers.append(helper)
        self.task = (kernel, state, args)
        for helper in self.helpers[:n]:
            with contextlib.suppress(RuntimeError):  # already released: a wake-up is pending
                helper.go.release()


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.reset)


def run(kernel: Callable[..., Any], args: tuple, *, phases: int, threads: int) -> None:
    """Run `kernel(state, slot, *args)` on the calling thread (slot 0) and up to `threads - 1`
    helpers (slots 1..threads-1); returns when every chunk of every phase is done.

    Scratch buffers indexed by `slot` must have `threads` rows. With threads == 1, or while
    another call holds the helpers, the calling thread runs everything alone.
    """
    state = new_state(phases)
    if threads > 1 and _POOL.busy.acquire(blocking=False):
        try:
            _POOL.post(kernel, state, args, threads - 1)
            kernel(state, 0, *args)
        finally:
            _POOL.task = None
            _POOL.busy.release()
    else:
        kernel(state, 0, *args)


class Scratch:
    """fp32 work buffers kept per calling thread and reused across calls.

    A fresh buffer is fresh pages from the OS on every call (glibc maps blocks over 128 KB),
    which cost as much as a small layer's product; one per calling thread keeps concurrent
    callers apart. torch allocates 64-byte aligned: rows of whole cache lines.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A [shape] view of this thread's buffer `name` (contents undefined)."""
        views: dict[Any, Any] = self._local.__dict__
        view = views.get((name, shape))
        if view is None:
            size = int(np.prod(shape))
            buffer = views.get(name)
            if buffer is None or buffer.shape[0] < size:
                for key in [k for k in views if isinstance(k, tuple) and k[0] == name]:
                    del views[key]  # views of the smaller buffer
                buffer = views[name] = torch.empty(size, dtype=torch.float32).numpy()
            view = views[(name, shape)] = buffer[:size].reshape(shape)
        return view


# One set of buffers per calling thread, shared by every kernel: calls on a thread run one after
# another, so the largest layer's needs bound the memory, not the sum over layers.
SCRATCH = Scratch()
