"""Measure one model in every runtime a user could pick, batch size by batch size.

Per batch size: each runtime is prepared (ticketc compiles for that batch), its outputs are
checked against the masked dense model before anything is timed, then all runtimes that run
are timed together by `ticketc.compile.measure.time_interleaved` (the one timing loop of the
project: warm-up, interleaved shuffled rounds, median and 10th percentile), and speed-ups are
paired per round against torch dense.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ticketc.bench import runtimes as rt
from ticketc.bench.config import BenchConfig
from ticketc.bench.result import BenchResult, Cell, SizeRow, verdicts
from ticketc.compile.check import output_error
from ticketc.compile.measure import TimingConfig, environment, speedup, time_interleaved
from ticketc.errors import first_line
from ticketc.export.trace import quiet
from ticketc.inputs import ExampleInputs
from ticketc.masks import apply_masks_
from ticketc.transforms.layers import SPARSE_LAYERS

TOLERANCE = 1e-4  # max relative error of a runtime's outputs against torch dense (fp32)


def bench_model(
    model: nn.Module,
    example: ExampleInputs,
    config: BenchConfig | None = None,
    *,
    name: str = "model",
    masks: dict[str, Tensor] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> BenchResult:
    """Time `model` (masks already applied, or given in `masks`) in every runtime at every
    batch size of `config`, on `example` (an ExampleInputs whose tensors have the batch in dim 0)
    repeated to each batch size. Returns every cell, timed or with the reason it is not.
    Raises ValueError on a bad config; a runtime that fails is a cell with `why`, never an
    exception. torch's thread setting is restored on return."""

    config = config or BenchConfig()
    if not config.batch_sizes or any(b < 1 for b in config.batch_sizes):
        raise ValueError(f"batch sizes must be positive, got {config.batch_sizes}")
    before = torch.get_num_threads()
    threads = config.threads or before
    torch.set_num_threads(threads)
    try:
        return _bench(model, example, config, name, masks, log, threads)
    finally:
        torch.set_num_threads(before)


def _bench(
    model: nn.Module,
    example: ExampleInputs,
    config: BenchConfig,
    name: str,
    masks: dict[str, Tensor] | None,
    log: Callable[[str], None],
    threads: int,
) -> BenchResult:

    started = time.perf_counter()
    device = torch.device(config.device)
    dense = copy.deepcopy(model).eval()
    if masks:
        apply_masks_(dense, masks)
    dense = dense.to(device)
    cells: list[Cell] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="ticketc-bench-") as tmp:
        onnx = rt.OnnxDense(dense.cpu(), Path(tmp), threads) if device.type == "cpu" else None
        dense = dense.to(device)
        for batch in config.batch_sizes:
            inputs = example.at_batch(batch).to(device)
            log(f"batch {batch}: preparing")
            prepared, row = _prepare_all(dense, inputs, batch, config, onnx, Path(tmp), log)
            if prepared:
                log(f"batch {batch}: timing {', '.join(prepared)}")
                one_round = sum(p.seconds for p in prepared.values())
                rounds = config.min_rounds if one_round < 10 else min(3, config.min_rounds)
                timings = time_interleaved(
                    {k: p.run for k, p in prepared.items()},
                    TimingConfig(budget_s=config.budget_s, min_rounds=rounds, min_sample_s=2e-3),
                    sync=sync,
                )
                base = timings[rt.TORCH_DENSE]
                for c in row:
                    t = timings.get(c.runtime)
                    if t is not None:
                        c.median_us, c.p10_us = t.median * 1e6, t.p10 * 1e6
                        c.speedup = speedup(base, t)
            cells += row
        sizes = _sizes(dense.cpu(), example, onnx, Path(tmp)) if config.sizes else []
    result = BenchResult(
        model=name,
        device=str(device),
        threads=threads,
        batch_sizes=list(config.batch_sizes),
        cells=cells,
        sizes=sizes,
        density=_density(dense),
        params=sum(p.numel() for p in dense.parameters()),
        environment={**environment(), "device": str(device), "cpu_model": cpu_model()},
    )
    result.seconds = round(time.perf_counter() - started, 1)
    result.verdicts = verdicts(result)
    return result


def _prepare_all(
    dense: nn.Module,
    inputs: ExampleInputs,
    batch: int,
    config: BenchConfig,
    onnx: rt.OnnxDense | None,
    tmp: Path,
    log: Callable[[str], None],
) -> tuple[dict[str, rt.Prepared], list[Cell]]:
    """Prepare every runtime at this batch and check its outputs against torch dense."""
    with torch.no_grad():
        reference = inputs(dense)
    prepared: dict[str, rt.Prepared] = {}
    row: list[Cell] = []
    compiled_box: list[nn.Module] = []

    def make(name: str) -> rt.Prepared:
        if name == rt.TORCH_DENSE:
            return rt.Prepared(_no_grad(lambda: inputs(dense)), "the masked model as given")
        if name == rt.COMPILED:
            return _compiled(dense, inputs, batch, config, compiled_box)
        if name == rt.PT2:
            if not compiled_box:
                raise rt.NotRunnable("ticketc compiled did not run, so there is nothing to export")
            return _pt2(compiled_box[0], inputs, tmp / f"compiled_b{batch}.pt2")
        if name == rt.ORT:
            if onnx is None:
                raise rt.NotRunnable(f"onnxruntime's CPU provider does not run on {config.device}")
            return onnx.prepare(inputs.to("cpu"))
        if name == rt.TORCH_CSR:
            csr, n, total = rt.torch_csr(dense)
            return rt.Prepared(_no_grad(lambda: inputs(csr)), f"{n} of {total} Linear layers")
        raise AssertionError(name)

    for name in rt.RUNTIMES:
        cell = Cell(name, batch)
        row.append(cell)
        try:
            p = make(name)
            started = time.perf_counter()  # one untimed call (the output check) sizes the rounds
            out = p.run()
            p.seconds = time.perf_counter() - started
            if name == rt.ORT:
                out = _like(reference, rt.onnx_outputs(out))
            _, rel = output_error(reference, out)
        except rt.NotRunnable as e:
            cell.why = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - a runtime's failure is a result, not a crash
            cell.why = f"failed: {type(e).__name__}: {first_line(e, 200)}"
            continue
        cell.max_rel_error, cell.note = rel, p.note
        if not rel <= TOLERANCE:
            cell.why = f"outputs differ from torch dense (max rel error {rel:.2e}): not timed"
            continue
        prepared[name] = p
        log(f"batch {batch}: {name} ready ({p.note})" if p.note else f"batch {batch}: {name}")
    return prepared, row


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def _compiled(
    dense: nn.Module, inputs: ExampleInputs, batch: int, config: BenchConfig, box: list[nn.Module]
) -> rt.Prepared:
    import ticketc.compile as tc
    from ticketc.compile import CompileConfig

    if not any(isinstance(m, SPARSE_LAYERS) for m in dense.modules()):
        raise rt.NotRunnable(
            "no nn.Linear / nn.Conv module to compile (a torch.export program is already "
            "lowered: bench the model it was exported from)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = tc.compile_model(
            dense, CompileConfig(device=config.device, batch_size=batch), example_input=inputs
        )
    box.append(compiled)
    return rt.Prepared(_no_grad(lambda: inputs(compiled)), plan_summary(tc.plan_of(compiled)))


def plan_summary(plan: Any) -> str:
    """'3 csr, 2 dense (chains: 1)' from a Plan."""
    if plan is None:
        return "no plan"
    counts: dict[str, int] = {}
    for layer in plan.layers:
        counts[layer.format] = counts.get(layer.format, 0) + 1
    text = ", ".join(f"{n} {f}" for f, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if plan.chains:
        text += f" ({len(plan.chains)} chain{'s' if len(plan.chains) > 1 else ''})"
    return text or "no Linear/Conv layer"


def _pt2(compiled: nn.Module, inputs: ExampleInputs, path: Path) -> rt.Prepared:
    import ticketc.compile as tc

    with warnings.catch_warnings(), quiet():
        warnings.simplefilter("ignore")
        try:
            program = tc.export_program(compiled, inputs)
        except Exception as e:  # noqa: BLE001
            raise rt.NotRunnable(f"torch.export failed: {first_line(e, 200)}") from e
        torch.export.save(program, str(path))
        module = torch.export.load(str(path)).module()
    return rt.Prepared(_no_grad(lambda: inputs(module)), "torch.export.load(...).module()")


def _like(reference: Any, flat: list[Tensor]) -> Any:
    """onnxruntime's flat outputs in the structure of the torch model's outputs."""
    import torch.utils._pytree as pytree

    leaves, spec = pytree.tree_flatten(reference)
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    if len(tensors) != len(flat):
        raise ValueError(f"onnxruntime returned {len(flat)} outputs, torch {len(tensors)}")
    out = list(leaves)
    for i, t in zip(tensors, flat, strict=True):
        out[i] = t
    return pytree.tree_unflatten(out, spec)


# --------------------------------------------------------------------------- sizes


def _density(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, SPARSE_LAYERS)]
    total = sum(w.numel() for w in weights)
    return sum(int((w != 0).sum()) for w in weights) / total if total else 1.0


def entropy_bound_bytes(model: nn.Module, value_bits: int) -> int:
    """Bytes no lossless format can beat for the prunable weights (Linear / Conv) alone: per
    weight the entropy of its layer's mask, H(d) bits (Shannon), plus `value_bits` per nonzero.
    Biases, norms and buffers are left out: exports fold or drop some of them (BatchNorm into
    the conv before it), so only the weights have a bound every export must respect."""
    bits = 0.0
    for m in model.modules():
        if isinstance(m, SPARSE_LAYERS):
            w = m.weight
            n, nnz = w.numel(), int((w != 0).sum())
            d = nnz / n if n else 0.0
            h = 0.0 if d in (0.0, 1.0) else -(d * math.log2(d) + (1 - d) * math.log2(1 - d))
            bits += n * h + nnz * value_bits
    return int(math.ceil(bits / 8))


def _sizes(
    model: nn.Module, example: ExampleInputs, onnx: rt.OnnxDense | None, tmp: Path
) -> list[SizeRow]:
    rows = []
    if onnx is not None and onnx.files:
        rows.append(SizeRow("dense ONNX", sum(p.stat().st_size for p in onnx.files)))
    else:
        rows.append(SizeRow("dense ONNX", None, "the dense ONNX export did not run"))
    from ticketc.export import ExportConfig, export_model
    from ticketc.inputs import ExampleInputs

    one = example.at_batch(1)
    inputs = ExampleInputs(tuple(one.args), dict(one.kwargs))  # positional and named, as given

    for fmt, values in [("portable", "fp32"), ("portable", "fp16"), ("portable", "int8"),
                        ("sparse-initializer", "fp32")]:  # fmt: skip
        label = f"ticketc {fmt} {values}"
        out = tmp / f"{fmt}_{values}" / "model.onnx"
        out.parent.mkdir()
        try:
            with warnings.catch_warnings(), quiet():
                warnings.simplefilter("ignore")
                res = export_model(
                    copy.deepcopy(model),
                    inputs,
                    out,
                    ExportConfig(format=fmt, values=values, verify=False),
                )
            rows.append(SizeRow(label, int(res.total_bytes)))
        except Exception as e:  # noqa: BLE001
            rows.append(SizeRow(label, None, f"export failed: {first_line(e, 200)}"))
    rows.append(SizeRow("entropy bound of the weights, fp32", entropy_bound_bytes(model, 32)))
    rows.append(SizeRow("entropy bound of the weights, fp16", entropy_bound_bytes(model, 16)))
    return rows


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else platform.processor()."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
