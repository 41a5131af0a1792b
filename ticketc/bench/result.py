"""What `ticketc bench` measured, as data: a `Cell` per runtime and batch size, a `SizeRow` per
artifact, the `BenchResult` holding them, and `verdicts`, the sentences read off a result.
`core` fills a result; `report` shows it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ticketc.bench import runtimes as rt


@dataclass
class Cell:
    """One runtime at one batch size: timed (median_us set), or `why` it is not."""

    runtime: str
    batch: int
    median_us: float | None = None
    p10_us: float | None = None
    speedup: float | None = None  # vs torch dense, median of per-round ratios
    max_rel_error: float | None = None
    note: str = ""
    why: str | None = None  # set when not timed


@dataclass
class SizeRow:
    """Bytes on disk of one artifact, or why it was not written."""

    name: str
    bytes: int | None
    why: str | None = None


@dataclass
class BenchResult:
    model: str
    device: str
    threads: int
    batch_sizes: list[int]
    cells: list[Cell]
    sizes: list[SizeRow]
    density: float  # nonzero fraction of the prunable weights
    params: int
    environment: dict[str, Any]
    seconds: float = 0.0
    verdicts: list[str] = field(default_factory=list)

    def cell(self, runtime: str, batch: int) -> Cell:
        return next(c for c in self.cells if c.runtime == runtime and c.batch == batch)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def verdicts(result: BenchResult) -> list[str]:
    """One sentence per batch size: the fastest runtime, and ticketc against the fastest
    runtime that is not ticketc's (saying so plainly where ticketc loses)."""
    lines = []
    for batch in result.batch_sizes:
        timed = [c for c in result.cells if c.batch == batch and c.speedup is not None]
        if not timed:
            lines.append(f"batch {batch}: nothing could be timed")
            continue
        timed.sort(key=lambda c: -(c.speedup or 0))
        best = timed[0]
        ours = next((c for c in timed if c.runtime == rt.COMPILED), None)
        rival = next((c for c in timed if c.runtime not in (rt.COMPILED, rt.PT2)), None)
        if ours is None:
            why = result.cell(rt.COMPILED, batch).why
            lines.append(
                f"batch {batch}: {best.runtime} is fastest ({best.speedup:.2f}x torch dense); "
                f"ticketc compiled was not timed ({why})"
            )
            continue
        assert rival is not None and ours.speedup is not None and rival.speedup is not None
        ratio = ours.speedup / rival.speedup
        if ratio >= 1:
            text = (
                f"batch {batch}: ticketc compiled is {ratio:.2f}x the fastest alternative "
                f"({rival.runtime})"
            )
        else:
            text = (
                f"batch {batch}: {rival.runtime} is fastest; ticketc compiled runs at "
                f"{ratio:.2f}x its speed (sparse LOSES here)"
            )
        text += f", {ours.speedup:.2f}x torch dense"
        if best.runtime == rt.PT2:
            text += (
                f"; its .pt2 export ran {(best.speedup or 0) / ours.speedup:.2f}x the eager module"
            )
        lines.append(text)
    return lines
