"""The one configuration of `ticketc.compile`; its defaults are the CLI's defaults."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ticketc.formats import LAYOUTS

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DEVICES = ("cpu", "cuda")
BSR_BLOCKSIZES = (16, 32)  # the block sizes the planner tries; a plan file may name others

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class CompileConfig:
    """How to compile a masked model to sparse modules.

    device / dtype / batch_size: what the plan is for (the cost model, tuning and the check
      use them); batch_size None: the example input's batch size (1 without one).
    filter_fn(module, fqn): False keeps a layer dense whatever it costs.
    plan_path: a plan JSON (as written beside a compiled artifact) whose formats override the
      planner's choices, layer by layer.
    tune: time every candidate format of every layer (and every chain) on the device and keep
      the fastest, instead of trusting the cost model alone; the tuned plan is kept only if
      the whole model measures faster than with the untuned one.
    formats: the sparse formats the planner may choose from (dense is always a candidate).
    min_speedup: a sparse format must be predicted (measured, when tuning) at least this much
      faster than dense; >= 1 so that a format predicted slower than dense is never chosen.
    dead_units: run dead-unit elimination first (exact; shrinks real dimensions).
    calibrate: measure the CPU cost model's rates on this machine (about a second, once per
      process and thread count) instead of using the reference rates.
    check: run the compiled model against the masked dense model on the example input at
      the planned batch size: outputs must agree, and layers go back to dense until the
      compiled model measures at least min_model_speedup x dense (else it is all dense); a
      plan from plan_path is measured and reported but not changed.
    check_budget_s: seconds of timed runs per comparison in the check (at least 5 rounds).
    min_model_speedup: the whole compiled model must measure this much faster than dense to
      keep any sparse layer; a margin over 1 because timings on a shared machine are noisy.
    tune_budget_s / tune_reps: seconds of timed runs, and rounds at least, per tuned layer.
    """

    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int | None = None
    filter_fn: FilterFn | None = None
    plan_path: str | None = None
    tune: bool = False
    formats: tuple[str, ...] = tuple(LAYOUTS)
    min_speedup: float = 1.1
    dead_units: bool = True
    calibrate: bool = True
    check: bool = True
    check_budget_s: float = 1.0
    min_model_speedup: float = 1.02
    tune_budget_s: float = 0.2
    tune_reps: int = 5

    def __post_init__(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device {self.device!r} is not cpu, cuda or cuda:N")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn must be callable, got {type(self.filter_fn).__name__}")
        unknown = [f for f in self.formats if f not in LAYOUTS]
        if unknown:
            raise ValueError(f"unknown sparse format(s) {unknown}; known: {', '.join(LAYOUTS)}")
        if not self.min_speedup >= 1.0:
            raise ValueError(
                f"min_speedup must be >= 1 (never slower than dense), got {self.min_speedup!r}"
            )
        if not isinstance(self.tune_reps, int) or self.tune_reps < 1:
            raise ValueError(f"tune_reps must be a positive int, got {self.tune_reps!r}")
        if not self.min_model_speedup >= 1.0:
            raise ValueError(f"min_model_speedup must be >= 1, got {self.min_model_speedup!r}")
        for name in ("check_budget_s", "tune_budget_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def device_kind(self) -> str:
        """ "cpu" or "cuda": which cost model applies."""
        return "cuda" if self.device.startswith("cuda") else "cpu"
