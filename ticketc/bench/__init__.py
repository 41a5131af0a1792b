"""`ticketc bench`: a user's own model measured against what they would otherwise run.

    result = bench_model(model, ExampleInputs.of(x), BenchConfig(batch_sizes=(1, 64)))

See `ticketc.bench.core` (what is measured and how), `ticketc.bench.result` (the measured
data and its verdicts) and `ticketc.bench.report` (table, plot, JSON). benchmarks/e2e_bench.py
runs the same code on the project's own models. `ExampleInputs` is `ticketc.inputs.ExampleInputs`.
"""

from ticketc.bench.config import BenchConfig
from ticketc.bench.core import bench_model
from ticketc.bench.result import BenchResult, Cell, SizeRow
from ticketc.bench.runtimes import RUNTIMES

__all__ = ["RUNTIMES", "BenchConfig", "BenchResult", "Cell", "SizeRow", "bench_model"]
