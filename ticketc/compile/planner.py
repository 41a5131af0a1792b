"""Choose a format per layer: dense, csr, bsr(B) or tiled, from the cost model or by timing.

The rule that matters: a sparse format is chosen only when it is predicted (or, with tuning,
measured) faster than dense, by the configured margin; predictions are compared with
predictions and measurements with measurements, never one with the other. Runs of Linear
layers that the runtime executes as one kernel call (CsrSequential) are priced as that call.
The compiled model as a whole is then measured against dense (ticketc.compile.check).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from ticketc.compile.chain import chain_csr, fuse_relu_
from ticketc.compile.config import CompileConfig
from ticketc.compile.costs import ConvShape, CostModel, Gemm, device_costs, gemm_stats
from ticketc.compile.measure import TimingConfig, time_interleaved
from ticketc.compile.modules import _pads, is_conv1d, linear_weight, replaceable, sparse_module
from ticketc.compile.plan import ChainPlan, LayerPlan, Plan, apply_overrides, read_plan
from ticketc.inputs import ExampleInputs
from ticketc.transforms.layers import SPARSE_LAYERS, SparseLayer

FILTERED = "kept dense by filter_fn"
OVERRIDES_FORWARD = "kept dense: its class overrides forward"


def make_plan(
    model: nn.Module,
    inputs: ExampleInputs | None,
    config: CompileConfig,
    *,
    dead_units: dict | None = None,
) -> Plan:
    """Plan every Linear/Conv layer of `model` (pruned weights are exact zeros) for
    config.batch_size rows (1 if unset). `inputs` (any batch size) give conv layers their
    output size and Linear layers their rows per sample (tokens)."""
    batch = config.batch_size or 1
    costs = device_costs(config.device_kind, config.torch_dtype, calibrate=config.calibrate)
    shapes = trace_shapes(model, inputs)
    itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
    layers: list[LayerPlan] = []
    gemms: dict[str, Gemm] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, SPARSE_LAYERS) and not is_conv1d(layer):
            continue
        g = layer_gemm(layer, shapes.get(name), batch, itemsize)
        predicted = {f: costs.predict(f, g) for f in costs.candidates(g, config.formats)}
        lp = LayerPlan(
            name=name,
            kind="conv" if isinstance(layer, nn.Conv1d | nn.Conv2d) else "linear",
            shape=tuple(layer.weight.shape),
            gemm=(g.n, g.k, g.m),
            density=round(g.density, 6),
            format="dense",
            predicted_us={f: round(t * 1e6, 3) for f, t in predicted.items()},
        )
        if not replaceable(layer):
            lp = replace(lp, reason=OVERRIDES_FORWARD)
        elif config.filter_fn is not None and not config.filter_fn(layer, name):
            lp = replace(lp, reason=FILTERED)
        elif config.tune:
            lp = _tune(lp, layer, shapes.get(name), config)
        else:
            lp = _choose(lp, config.min_speedup)
        layers.append(lp)
        gemms[name] = g
    if "csr" in config.formats:
        runs = [r for r in linear_runs(model) if all(n in gemms for n in r)]
        layers = _plan_runs(model, layers, runs, gemms, costs, config)
    plan = Plan(
        device=config.device,
        dtype=config.dtype,
        batch_size=batch,
        cost_model=costs.name + ("+tuned" if config.tune else ""),
        layers=tuple(layers),
        dead_units=dead_units,
        threads=torch.get_num_threads(),
    )
    if config.plan_path is not None:
        plan = apply_overrides(plan, read_plan(config.plan_path), str(config.plan_path))
        fixed = {lp.name for lp in layers if lp.reason == OVERRIDES_FORWARD}
        plan = replace(plan, layers=tuple(
            replace(lp, format="dense", reason=OVERRIDES_FORWARD) if lp.name in fixed else lp
            for lp in plan.layers
        ))  # fmt: skip
    return with_chains(plan, model, costs, gemms)


def with_chains(plan: Plan, model: nn.Module, costs: CostModel, gemms: dict[str, Gemm]) -> Plan:
    """`plan` with its chains: every stretch of >= 2 consecutive csr layers of a Linear run,
    which the runtime executes as one call, priced as that call."""
    fmt = {lp.name: lp.format for lp in plan.layers}
    chains = []
    for run in linear_runs(model):
        stretch: list[str] = []
        for name in [*run, ""]:
            if name and fmt.get(name) == "csr" and name in gemms:
                stretch.append(name)
                continue
            predicted = costs.predict_chain([gemms[n] for n in stretch]) if stretch else None
            if predicted is not None:
                chains.append(ChainPlan(tuple(stretch), round(predicted * 1e6, 3)))
            stretch = []
    return replace(plan, chains=tuple(chains))


def _plan_runs(
    model: nn.Module,
    layers: list[LayerPlan],
    runs: list[list[str]],
    gemms: dict[str, Gemm],
    costs: CostModel,
    config: CompileConfig,
) -> list[LayerPlan]:
    """Make a whole run of Linear layers csr where running it as one chain beats both the
    layer-by-layer plan and dense by min_speedup (a chain saves the per-layer overheads that
    price a small layer out of csr on its own). Tuned plans time the chain; untuned ones
    predict it: each decision compares like with like."""
    by_name = {lp.name: i for i, lp in enumerate(layers)}
    for run in runs:
        idx = [by_name[name] for name in run]
        if any(layers[i].reason in (FILTERED, OVERRIDES_FORWARD) for i in idx):
            continue
        predicted_chain = costs.predict_chain([gemms[name] for name in run])
        if predicted_chain is None:  # no chain kernel on this device
            continue
        if config.tune:
            chain, planned, dense = _time_run(model, run, [layers[i] for i in idx], config)
            how = "measured"
        else:
            chain = predicted_chain * 1e6
            times = [layers[i].predicted_us for i in idx]
            planned = _run_time([layers[i] for i in idx], times, costs, gemms)
            dense = sum(t["dense"] for t in times)
            how = "predicted"
        if chain >= planned or chain * config.min_speedup > dense:
            continue
        reason = (
            f"csr chain of {len(run)} layers {how} {chain:.1f} us, layer by layer "
            f"{planned:.1f} us, dense {dense:.1f} us"
        )
        for i in idx:
            layers[i] = replace(layers[i], format="csr", reason=reason)
    return layers


def _run_time(
    run: list[LayerPlan], times: list[dict[str, float]], costs: CostModel, gemms: dict[str, Gemm]
) -> float:
    """Predicted microseconds of a run as planned: its csr stretches as chains."""
    total, stretch = 0.0, []
    for lp, t in [*zip(run, times, strict=True), (None, None)]:
        if lp is not None and lp.format == "csr":
            stretch.append(lp)
            continue
        if stretch:
            chain = costs.predict_chain([gemms[s.name] for s in stretch])
            total += (
                chain * 1e6 if chain is not None else sum(s.predicted_us["csr"] for s in stretch)
            )
            stretch = []
        if lp is not None and t is not None:
            total += t[lp.format]
    return total


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
            linear = child if isinstance(child, nn.Linear) and replaceable(child) else None
            if linear is not None and (last is None or last.out_features == linear.in_features):
                run, last, relu = run + [name], linear, False
                continue
            runs.append(run)
            run, last, relu = ([name], linear, False) if linear is not None else ([], None, False)
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
        return replace(
            lp,
            format=best,
            reason=f"{best} predicted {sparse[best]:.1f} us vs {dense:.1f} us dense",
        )
    return replace(
        lp,
        reason=f"best sparse ({best}) predicted {sparse[best]:.1f} us vs {dense:.1f} us dense, "
        f"needs {min_speedup:.2f}x",
    )


def _tune(
    lp: LayerPlan, layer: SparseLayer, shapes: tuple | None, config: CompileConfig
) -> LayerPlan:
    """Time every candidate format of one layer on its input at the planned batch size."""
    device, dtype = torch.device(config.device), config.torch_dtype
    x = torch.randn(_batched(shapes, layer, config.batch_size or 1), device=device, dtype=dtype)
    dense = _on(layer, device, dtype)
    modules = {
        fmt: dense if fmt == "dense" else sparse_module(dense, fmt, device=device)
        for fmt in lp.predicted_us
    }
    with torch.no_grad():
        timings = time_interleaved(
            {fmt: partial(m, x) for fmt, m in modules.items()},
            _tune_timing(config),
            sync=_sync(device),
        )
    measured = {fmt: round(t.median_us, 3) for fmt, t in timings.items()}
    sparse = {f: t for f, t in measured.items() if f != "dense"}
    best = min(sparse, key=sparse.__getitem__) if sparse else "dense"
    if best != "dense" and measured[best] * config.min_speedup <= measured["dense"]:
        reason = f"{best} measured {measured[best]:.1f} us vs {measured['dense']:.1f} us dense"
        return replace(lp, format=best, measured_us=measured, reason=reason)
    return replace(lp, format="dense", measured_us=measured, reason="dense measured fastest")


def _time_run(
    model: nn.Module, run: list[str], plans: list[LayerPlan], config: CompileConfig
) -> tuple[float, float, float]:
    """Measured microseconds of a Linear run (with its ReLUs) as one csr chain, as tuned layer
    by layer, and dense, on a random input at the planned batch size."""
    device, dtype = torch.device(config.device), config.torch_dtype
    layers = [cast(nn.Linear, _on(model.get_submodule(name), device, dtype)) for name in run]
    relus = _relus_after(model, run)

    def build(formats: list[str]) -> nn.Module:
        children: list[nn.Module] = []
        for layer, fmt, relu in zip(layers, formats, relus, strict=True):
            children.append(layer if fmt == "dense" else sparse_module(layer, fmt, device=device))
            if relu:
                children.append(nn.ReLU())
        seq = nn.Sequential(*children)
        fuse_relu_(seq)
        return chain_csr(seq)

    variants = {
        "chain": build(["csr"] * len(run)),
        "planned": build([lp.format for lp in plans]),
        "dense": build(["dense"] * len(run)),
    }
    x = torch.randn(config.batch_size or 1, layers[0].in_features, device=device, dtype=dtype)
    with torch.no_grad():
        timings = time_interleaved(
            {k: partial(m, x) for k, m in variants.items()},
            _tune_timing(config),
            sync=_sync(device),
        )
    return (
        timings["chain"].median_us,
        timings["planned"].median_us,
        timings["dense"].median_us,
    )


def _relus_after(model: nn.Module, run: list[str]) -> list[bool]:
    """For each layer of a Linear run: is it followed by a ReLU in its Sequential?"""
    out = []
    for name in run:
        parent, _, attr = name.rpartition(".")
        seq = model.get_submodule(parent) if parent else model
        names = [n for n, _ in seq.named_children()]
        i = names.index(attr)
        out.append(i + 1 < len(names) and type(seq.get_submodule(names[i + 1])) is nn.ReLU)
    return out


def _tune_timing(config: CompileConfig) -> TimingConfig:
    return TimingConfig(budget_s=config.tune_budget_s, min_rounds=config.tune_reps)


def _sync(device: torch.device) -> Any:
    return torch.cuda.synchronize if device.type == "cuda" else None


def _on(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(layer).to(device=device, dtype=dtype).eval()


def trace_shapes(model: nn.Module, inputs: ExampleInputs | None) -> dict[str, tuple]:
    """Module name -> (input shape, output shape) of each layer, from one call on the inputs.

    Runs on a single sample where the model allows (only per-sample dims are used)."""
    if inputs is None:
        return {}
    shapes: dict[str, tuple] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, SPARSE_LAYERS):

            def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))

            hooks.append(m.register_forward_hook(hook))
    param = next(model.parameters(), None)
    if param is not None:
        inputs = inputs.to(device=param.device, dtype=param.dtype)
    try:
        with torch.no_grad():
            try:
                inputs.at_batch(1)(model)
            except Exception:  # noqa: BLE001 - e.g. a program exported with a fixed batch
                shapes.clear()
                inputs(model)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def layer_gemm(layer: SparseLayer, shapes: tuple | None, batch_size: int, itemsize: int) -> Gemm:
    """The layer's work at `batch_size` samples, from its traced shapes."""
    if isinstance(layer, nn.Linear) or is_conv1d(layer):
        keep = linear_weight(layer).detach() != 0
        # rows of x per sample: 1 for [N, K] inputs, T for [N, T, K]
        per_sample = 1 if shapes is None else _numel(shapes[0][1:]) // max(1, keep.shape[1])
        return gemm_stats(keep, batch_size * max(1, per_sample), itemsize)
    if shapes is None:
        raise ValueError(
            f"conv layer {type(layer).__name__}{tuple(layer.weight.shape)} needs an example "
            "input to know its output size"
        )
    keep = layer.weight.detach().reshape(layer.weight.shape[0], -1) != 0
    return gemm_stats(keep, batch_size, itemsize, conv=conv_shape(layer, shapes[0]))


def conv_shape(conv: nn.Conv1d | nn.Conv2d, input_shape: tuple[int, ...]) -> ConvShape:
    """The geometry the CPU kernel runs for this conv on an input of `input_shape`."""
    one_d = isinstance(conv, nn.Conv1d)
    h, w = (1, input_shape[-1]) if one_d else (input_shape[-2], input_shape[-1])
    kernel = (1, *conv.kernel_size) if one_d else tuple(conv.kernel_size)
    stride = (1, *conv.stride) if one_d else tuple(conv.stride)
    dilation = (1, *conv.dilation) if one_d else tuple(conv.dilation)
    pt, pb, pl, pr = _pads(conv)
    if conv.padding_mode != "zeros":
        h, w, (pt, pb, pl, pr) = h + pt + pb, w + pl + pr, (0, 0, 0, 0)
    oh = (h + pt + pb - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + pl + pr - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    taps = {
        ((ky * dilation[0]) % stride[0], (kx * dilation[1]) % stride[1])
        for ky in range(kernel[0])
        for kx in range(kernel[1])
    }
    return ConvShape(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel=(int(kernel[0]), int(kernel[1])),
        stride=(int(stride[0]), int(stride[1])),
        groups=conv.groups,
        h=int(h),
        w=int(w),
        oh=int(oh),
        ow=int(ow),
        hq=-(-(h + pt + pb) // stride[0]),
        wq=-(-(w + pl + pr) // stride[1]),
        phases=len(taps),
        direct=stride == (1, 1) and not any((pt, pb, pl, pr)),
    )


def _batched(shapes: tuple | None, layer: SparseLayer, batch_size: int) -> tuple[int, ...]:
    """The layer's traced input shape at the planned batch size."""
    if shapes is None:
        return (batch_size, linear_weight(layer).shape[1])
    return (batch_size, *shapes[0][1:])


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
