"""What `ticketc bench` measures, as one frozen value; the CLI reads its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchConfig:
    """batch_sizes: dim 0 of every input tensor; threads: torch and onnxruntime intra-op
    threads (None: torch's current setting); budget_s: seconds of timed rounds per batch size
    (at least min_rounds rounds, cut to 3 where one round would take over 10 s, so that large
    batches of large models stay within minutes); sizes: also write the ticketc exports
    to measure bytes on disk."""

    batch_sizes: tuple[int, ...] = (1, 16, 64, 256)
    threads: int | None = None
    device: str = "cpu"
    budget_s: float = 2.0
    min_rounds: int = 5
    sizes: bool = True
