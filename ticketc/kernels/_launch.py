"""Input checks and launch heuristics shared by the kernel wrappers.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter
(`TRITON_INTERPRET=1`, how CI tests them without a GPU).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(op: str, **tensors: Tensor | None) -> torch.device:
    """One device for all tensors: CUDA, or CPU when interpreting. Returns it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) != 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")
    (device,) = devices
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{op}: Triton kernels need CUDA tensors (CPU tensors only with TRITON_INTERPRET=1),"
            f" got {device}; use torch.ops.ticketc.{op} for the CPU path"
        )
    return device


def check_float(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def checked_output(op: str, x: Tensor, m: int, bias: Tensor | None, out: Tensor | None) -> Tensor:
    """The [N, M] output buffer (allocated, or the caller's `out` checked), after checking bias."""
    n = x.shape[0]
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"{op}: bias must have shape ({m},), got {tuple(bias.shape)}")
    if out is None:
        return torch.empty((n, m), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (n, m) or out.dtype != x.dtype:
        raise ValueError(
            f"{op}: out must be {x.dtype} {(n, m)}, got {out.dtype} {tuple(out.shape)}"
        )
    return out


def accumulation_buffer(out: Tensor, split: int) -> Tensor:
    """Where a launch writes: `out` itself, or with split-K a zeroed fp32 buffer, since the
    partial sums meet through atomics and there are no bf16 atomics (copy it back after)."""
    if split == 1:
        return out
    if out.dtype == torch.float32:
        return out.zero_()
    return torch.zeros(out.shape, dtype=torch.float32, device=out.device)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill (a nominal 8 under the interpreter keeps grids small)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_in_fp32(x: Tensor, values: Tensor) -> bool:
    """Feed tl.dot fp32 operands: for fp32 inputs (exact, no TF32), for mixed dtypes, and under
    the interpreter, whose tl.dot gives wrong results on bf16."""
    return x.dtype == torch.float32 or x.dtype != values.dtype or interpreting()


def split_k_for(tiles_per_row: float, programs: int, device: torch.device) -> int:
    """Split the reduction over K when the output grid alone cannot fill the GPU.

    Each split adds an fp32 atomic pass over the output, so only split rows long enough to
    amortise it (>= 4 tiles per split) and only up to ~2 programs per SM.
    """
    if device.type != "cuda":
        return 1
    want = -(-2 * sm_count(device) // max(programs, 1))
    return max(1, min(want, int(tiles_per_row // 4), 16))


def autotuning(device: torch.device) -> bool:
    """TICKETC_AUTOTUNE=1 on a CUDA device: time candidate launch configs once per shape.

    Off by default (results then depend only on the heuristic tables), and never under the
    interpreter, where @triton.autotune-style timing is meaningless. Tune before capturing a
    CUDA graph: the first call of each shape runs every candidate.
    """
    return device.type == "cuda" and os.environ.get("TICKETC_AUTOTUNE", "0") not in ("", "0")


_TUNED: dict[tuple, dict[str, int]] = {}


def pick_config(
    key: tuple,
    default: dict[str, int],
    candidates: list[dict[str, int]],
    launch: Callable[[dict[str, int]], object],
) -> dict[str, int]:
    """The fastest of `default` and `candidates` for `key`, timed once and cached.

    `launch(cfg)` must run the kernel into a scratch output. A candidate that fails to compile
    or launch on this GPU is skipped; with none left the default stands.
    """
    if key in _TUNED:
        return _TUNED[key]
    import triton.testing

    timed = []
    for cfg in [default, *candidates]:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - e.g. out of shared memory for this config
            continue
        timed.append((ms, cfg))
    best = min(timed, key=lambda t: t[0])[1] if timed else default
    _TUNED[key] = best
    return best


def dot_candidates(n: int) -> list[dict[str, int]]:
    """Launch configs for the tensor-core kernels (bsr, tiled) at batch n."""
    top = max(16, min(next_pow2(n), 128))
    return [
        {"BLOCK_N": bn, "SPLIT_K": sk, "num_warps": nw}
        for bn in (16, 32, 64, 128)
        if bn <= top
        for sk in (1, 2, 4, 8)
        for nw in (4, 8)
    ]


def launch_split_k(
    key: tuple,
    cfg: dict[str, int],
    tune: bool,
    out: Tensor,
    run: Callable[[dict[str, int], Tensor], object],
) -> Tensor:
    """Launch a block-sparse kernel into `out` and return it. `run(cfg, target)` launches it
    writing `target`: `out` itself, or with cfg["SPLIT_K"] > 1 the zeroed fp32 buffer the
    partial sums meet in (copied into `out` after). With `tune` (`autotuning(device)` and no
    config given by the caller) the fastest of `cfg` and `dot_candidates` is picked once for
    `key` on a scratch output."""

    def launch(c: dict[str, int], dest: Tensor) -> None:
        target = accumulation_buffer(dest, c["SPLIT_K"])
        run(c, target)
        if target is not dest:
            dest.copy_(target)

    if tune:
        scratch = torch.empty_like(out)
        n = out.shape[0]
        cfg = pick_config(key, cfg, dot_candidates(n), lambda c: launch(c, scratch))
    launch(cfg, out)
    return out


def launch_row_blocks(
    op: str,
    kernel: Any,
    x: Tensor,
    arrays: tuple[Tensor, ...],
    values: Tensor,
    bias: Tensor | None,
    out: Tensor | None,
    *,
    out_features: int,
    row_blocks: int,
    rows: int,
    what: str,
    meta: dict[str, int],
    config_of: Callable[[int], dict[str, int]],
    config: dict[str, int] | None,
    key: tuple,
) -> Tensor:
    """y [N, out_features] = x [N, K] @ W.T (+ bias) by a block-sparse `kernel` whose program
    (i, j, s) computes output rows i*rows.. of batch tile j over its s-th split of K.

    Checks that `row_blocks` blocks of `rows` output rows cover `out_features`, allocates or
    checks `out`, then launches `kernel(x, target, *arrays, values, bias, m, n, k, split,
    strides..., HAS_BIAS, BLOCK_N, DOT_FP32, ATOMIC, **meta)` with the configuration
    `config_of(n)` updated by the caller's `config` (autotuned per `key` when none is given).
    `what` names the blocks in the error ("block rows"). Raises ValueError on a mismatch."""
    n, k = x.shape
    m = out_features
    if not (row_blocks - 1) * rows < m <= row_blocks * rows:
        raise ValueError(f"{op}: out_features={m} does not match {row_blocks} {what} of {rows}")
    out = checked_output(op, x, m, bias, out)
    if n == 0 or m == 0:
        return out
    bias_arg = bias if bias is not None else values  # never read without HAS_BIAS

    def run(cfg: dict[str, int], target: Tensor) -> None:
        split = cfg["SPLIT_K"]
        grid = (row_blocks, -(-n // cfg["BLOCK_N"]), split)
        kernel[grid](
            x, target, *arrays, values, bias_arg,
            m, n, k, split,
            x.stride(0), x.stride(1), target.stride(0), target.stride(1),
            HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"],
            DOT_FP32=dot_in_fp32(x, values), ATOMIC=split > 1,
            num_warps=cfg.get("num_warps", 4), **meta,
        )  # fmt: skip

    cfg = {**config_of(n), **(config or {})}
    full_key = (*key, x.device, x.dtype, values.dtype, m, k, next_pow2(n), bias is not None)
    return launch_split_k(full_key, cfg, config is None and autotuning(x.device), out, run)
