"""Timing: the one way ticketc measures speed (planner tuning, the compile-time speed check,
benchmarks).

`time_interleaved` runs every variant once per round, rounds in shuffled order, after warm-up,
and reports the median and spread of the rounds: on a shared machine drift and other processes
hit all variants alike, so their ratio stays meaningful even when absolute times move. A time
budget bounds the rounds; `environment()` records what a figure needs beside it (threads,
versions, load average).
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one variant over the timed rounds."""

    median: float
    p10: float  # 10th percentile: the uncontended time on a loaded machine
    p90: float
    rounds: int
    samples: tuple[float, ...] = ()  # per round, in round order (paired with other variants)

    @property
    def median_us(self) -> float:
        return self.median * 1e6


def speedup(base: Timing, other: Timing) -> float:
    """How many times faster `other` ran than `base`: the median over rounds of the ratio of
    their times in the same round. Pairing by round cancels the machine's slow drifts (other
    processes, frequency), which a ratio of medians taken over different moments does not."""
    pairs = [b / o for b, o in zip(base.samples, other.samples, strict=True) if o > 0]
    return statistics.median(pairs) if pairs else base.median / other.median


@dataclass(frozen=True)
class TimingConfig:
    """How long to measure. budget_s: seconds of timed calls in all (warm-up excluded);
    rounds stay within [min_rounds, max_rounds] whatever the budget."""

    budget_s: float = 1.0
    min_rounds: int = 5
    max_rounds: int = 2000
    warmup: int = 2
    # Each timed sample repeats a variant's call until it lasts this long (the mean per call is
    # recorded): consecutive calls keep the variant's weights in cache, as a user's serving or
    # eval loop does, where one call between other variants' calls starts cold. 0: one call.
    min_sample_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.budget_s >= 0:
            raise ValueError(f"budget_s must be >= 0, got {self.budget_s!r}")
        if not 1 <= self.min_rounds <= self.max_rounds:
            raise ValueError(
                f"need 1 <= min_rounds <= max_rounds, got {self.min_rounds}, {self.max_rounds}"
            )
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        if not self.min_sample_s >= 0:
            raise ValueError(f"min_sample_s must be >= 0, got {self.min_sample_s!r}")


def time_interleaved(
    variants: Mapping[str, Callable[[], object]],
    config: TimingConfig | None = None,
    *,
    sync: Callable[[], None] | None = None,
    seed: int = 0,
) -> dict[str, Timing]:
    """Time each variant (a no-argument callable) in interleaved, shuffled rounds.

    The number of rounds is budget / (one round's time, from the warm-up), clamped to
    [min_rounds, max_rounds]. `sync` (e.g. torch.cuda.synchronize) runs after each call.
    Returns name -> Timing (seconds).
    """
    config = config or TimingConfig()
    sync = sync or (lambda: None)
    names = list(variants)
    last: dict[str, float] = {}  # seconds of one call in the last warm-up round
    for _ in range(max(1, config.warmup)):
        for name in names:
            start = time.perf_counter()
            variants[name]()
            sync()
            last[name] = time.perf_counter() - start
    calls = {n: max(1, math.ceil(config.min_sample_s / max(last[n], 1e-9))) for n in names}
    one_round = sum(last[n] * calls[n] for n in names)
    rounds = config.budget_s / max(one_round, 1e-9)
    rounds = int(min(config.max_rounds, max(config.min_rounds, rounds)))
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            start = time.perf_counter()
            for _ in range(calls[name]):
                variants[name]()
            sync()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: _timing(ts) for name, ts in samples.items()}


def _timing(samples: list[float]) -> Timing:
    ts = sorted(samples)
    n = len(ts)
    return Timing(
        statistics.median(ts), ts[n // 10], ts[min(n - 1, (9 * n) // 10)], n, tuple(samples)
    )


def time_one(fn: Callable[[], object], config: TimingConfig | None = None) -> Timing:
    """Time one callable (see time_interleaved)."""
    return time_interleaved({"fn": fn}, config)["fn"]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS does not tell)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def commit() -> str | None:
    """The git commit of the ticketc source measured ("+dirty" if tracked files changed), or
    None when ticketc is not run from a git checkout."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:

        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()  # fmt: skip

        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment() -> dict[str, object]:
    """What a timing depends on: machine, threads, library versions, the commit, load at this
    moment."""
    import numba

    import ticketc

    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "ticketc": ticketc.__version__,
        "commit": commit(),
        "onnxruntime": ort_version,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
        "load_average": load_average(),
    }
