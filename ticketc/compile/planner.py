"""Choose a format per layer: dense, csr, bsr(B) or tiled, from the cost model or by timing.

The rule that matters: a sparse format is chosen only when it is predicted (or, with tuning,
measured) faster than dense, by the configured margin. Everything else is reporting.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor, nn

from ticketc.compile.config import CompileConfig
from ticketc.compile.costs import (
    DeviceCosts,
    Gemm,
    candidates,
    device_costs,
    gemm_stats,
    predict,
    predict_chain,
)
from ticketc.compile.modules import _block_diagonal, sparse_module
from ticketc.compile.plan import LayerPlan, Plan, apply_overrides, read_plan

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
FILTERED = "kept dense by filter_fn"
Layer = nn.Linear | nn.Conv1d | nn.Conv2d


def make_plan(
    model: nn.Module,
    example_input: Tensor | None,
    config: CompileConfig,
    *,
    dead_units: dict | None = None,
) -> Plan:
    """Plan every Linear/Conv layer of `model` (pruned weights are exact zeros)."""
    costs = device_costs(config.device_kind, config.torch_dtype)
    shapes = trace_shapes(model, example_input)
    itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
    layers: list[LayerPlan] = []
    gemms: dict[str, Gemm] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LAYERS):
            continue
        g = _gemm(layer, shapes.get(name), config.batch_size, itemsize)
        if layers and _feature_major_after(layers[-1], layer, costs):
            g = replace(g, feature_major=True)
        predicted = {f: predict(f, g, costs) for f in candidates(g, costs, config.formats)}
        lp = LayerPlan(
            name=name,
            kind="linear" if isinstance(layer, nn.Linear) else "conv",
            shape=tuple(layer.weight.shape),
            gemm=(g.n, g.k, g.m),
            density=round(g.density, 6),
            format="dense",
            predicted_us={f: round(t * 1e6, 3) for f, t in predicted.items()},
        )
        if config.filter_fn is not None and not config.filter_fn(layer, name):
            lp = replace(lp, reason=FILTERED)
        elif config.tune:
            lp = _tune(lp, layer, shapes.get(name), config)
        else:
            lp = _choose(lp, config.min_speedup)
        layers.append(lp)
        gemms[name] = g
    if "csr" in config.formats:
        layers = _plan_chains(model, layers, gemms, costs, config.min_speedup)
    plan = Plan(
        device=config.device,
        dtype=config.dtype,
        batch_size=config.batch_size,
        cost_model=costs.name + ("+tuned" if config.tune else ""),
        layers=tuple(layers),
        dead_units=dead_units,
    )
    if config.plan_path is not None:
        plan = apply_overrides(plan, read_plan(config.plan_path), str(config.plan_path))
    return plan


def _feature_major_after(previous: LayerPlan, layer: Layer, costs: DeviceCosts) -> bool:
    """Whether `layer` likely gets its input feature-major: a CPU CSR layer on the Numba path
    outputs it so, and in a chain of Linear layers (module order is assumed to be data order,
    as in nn.Sequential) the next one reads it without a transpose. A wrong guess only
    misprices that transpose: DenseLinear and the CSR kernels take either layout."""
    n, _, m = previous.gemm
    return (
        isinstance(layer, nn.Linear)
        and previous.kind == "linear"
        and previous.format == "csr"
        and m == layer.in_features
        and costs.cost("csr", n).per_input_s > 0  # that kernel transposes its input
    )


def _plan_chains(
    model: nn.Module,
    layers: list[LayerPlan],
    gemms: dict[str, Gemm],
    costs: DeviceCosts,
    min_speedup: float,
) -> list[LayerPlan]:
    """Make each run of Linear layers csr where running them as one chain is predicted faster
    than the layer-by-layer plan and than dense by `min_speedup` (a chain saves the per-layer
    overhead that prices a small layer out of csr on its own)."""
    by_name = {lp.name: i for i, lp in enumerate(layers)}
    for run in linear_runs(model):
        idx = [by_name[name] for name in run]
        chain = predict_chain([gemms[name] for name in run], costs)
        if chain is None or any(layers[i].reason == FILTERED for i in idx):
            continue
        # per layer: measured times where tuned, else predicted
        times = [layers[i].measured_us or layers[i].predicted_us for i in idx]
        planned = sum(t[layers[i].format] for t, i in zip(times, idx, strict=True)) * 1e-6
        dense = sum(t["dense"] for t in times) * 1e-6
        if chain >= planned or chain * min_speedup > dense:
            continue
        reason = (
            f"csr chain of {len(run)} layers predicted {chain * 1e6:.1f} us, layer by layer "
            f"{planned * 1e6:.1f} us, dense {dense * 1e6:.1f} us"
        )
        for i in idx:
            layers[i] = replace(layers[i], format="csr", reason=reason)
    return layers


def linear_runs(model: nn.Module) -> list[list[str]]:
    """Names of the Linear layers that follow one another in an nn.Sequential, with at most a
    ReLU between and matching widths: the runs CsrSequential executes as one chain when all
    are csr. Only runs of two or more."""
    runs: list[list[str]] = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        run: list[str] = []
        last: nn.Linear | None = None
        relu = False
        for child_name, child in seq.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if type(child) is nn.ReLU and last is not None and not relu:
                relu = True
                continue
            if isinstance(child, nn.Linear) and (
                last is None or last.out_features == child.in_features
            ):
                run, last, relu = run + [name], child, False
                continue
            runs.append(run)
            run, last, relu = (
                ([name], child, False) if isinstance(child, nn.Linear) else ([], None, False)
            )
        runs.append(run)
    return [r for r in runs if len(r) >= 2]


def _choose(lp: LayerPlan, min_speedup: float) -> LayerPlan:
    dense = lp.predicted_us["dense"]
    sparse = {f: t for f, t in lp.predicted_us.items() if f != "dense"}
    if not sparse:
        return replace(lp, reason="no sparse format applies")
    best = min(sparse, key=sparse.__getitem__)
    speedup = dense / sparse[best] if sparse[best] > 0 else float("inf")
    if speedup >= min_speedup:
        return replace(lp, format=best, reason=f"{best} predicted {speedup:.2f}x faster than dense")
    return replace(
        lp,
        reason=f"best sparse ({best}) predicted {speedup:.2f}x dense, needs {min_speedup:.2f}x",
    )


def _tune(lp: LayerPlan, layer: Layer, shapes: tuple | None, config: CompileConfig) -> LayerPlan:
    device, dtype = torch.device(config.device), config.torch_dtype
    shape = _batched(shapes, layer, config.batch_size)
    x = torch.randn(shape, device=device, dtype=dtype)
    dense = _on(layer, device, dtype)
    measured = {}
    for fmt in lp.predicted_us:
        module = dense if fmt == "dense" else sparse_module(dense, fmt, device=device)
        with torch.no_grad():
            measured[fmt] = round(_median_time(partial(module, x), device, config.tune_reps), 3)
    best = min(measured, key=measured.__getitem__)
    speedup = measured["dense"] / measured[best]
    reason = (
        f"{best} measured {speedup:.2f}x faster than dense"
        if best != "dense"
        else "dense measured fastest"
    )
    return replace(lp, format=best, measured_us=measured, reason=reason)


def _median_time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median microseconds of `fn` after warm-up, synchronising on GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _on(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(layer).to(device=device, dtype=dtype).eval()


def trace_shapes(model: nn.Module, example_input: Tensor | None) -> dict[str, tuple]:
    """Module name -> (input shape, output shape) of each layer, from one sample of the input.

    Runs on a single sample where the model allows (the plan scales to the planned batch size
    and only per-sample dims are used).
    """
    if example_input is None:
        return {}
    shapes: dict[str, tuple] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, LAYERS):

            def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))

            hooks.append(m.register_forward_hook(hook))
    param = next(model.parameters(), None)
    x = example_input
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    try:
        with torch.no_grad():
            try:
                model(x[:1])
            except Exception:  # noqa: BLE001 - e.g. a program exported with a fixed batch
                shapes.clear()
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _gemm(layer: Layer, shapes: tuple | None, batch_size: int, itemsize: int) -> Gemm:
    if isinstance(layer, nn.Linear):
        keep = layer.weight.detach() != 0
        # rows of x per sample: 1 for [N, K] inputs, T for [N, T, K]
        per_sample = 1 if shapes is None else _numel(shapes[0][1:]) // layer.in_features
        return gemm_stats(keep, batch_size * max(1, per_sample), itemsize)
    if shapes is None:
        raise ValueError(
            f"conv layer {type(layer).__name__}{tuple(layer.weight.shape)} needs an example "
            "input to know its output size"
        )
    keep = _block_diagonal(layer.weight.detach(), layer.groups) != 0
    positions = _numel(shapes[1][2:])
    return gemm_stats(keep, batch_size * positions, itemsize, unfold=True)


def _batched(shapes: tuple | None, layer: Layer, batch_size: int) -> tuple[int, ...]:
    """The layer's traced input shape at the planned batch size."""
    if shapes is None:
        return (batch_size, layer.weight.shape[1])
    return (batch_size, *shapes[0][1:])


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
