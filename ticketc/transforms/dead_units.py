"""Dead-unit elimination: remove hidden units a ticket has cut off, keeping outputs unchanged.

Pruning often leaves whole units dead. In a chain A -> (pointwise ops) -> B of Linear/Conv layers:

* a unit of A whose incoming weights are all zero outputs the constant act(bias): its
  contribution to B is a constant, folded into B's bias, and the unit is dropped;
* a unit of A whose outgoing weights in B are all zero is read by nobody: it is dropped.

Dropping units shrinks real dimensions, which is the only thing that makes a model smaller and
faster in runtimes that densify sparse weights (onnxruntime). Removing a unit can kill others,
so the pass repeats until nothing changes. It works on plain dense masked models (pruned weights
are exact zeros) and is what `ticketc export --dead-units` and `ticketc.compile_model` run.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ticketc.transforms.layers import SPARSE_LAYERS as LAYERS
from ticketc.transforms.layers import SparseLayer as Layer

Norm = nn.BatchNorm1d | nn.BatchNorm2d

# Elementwise ops: a unit's value depends only on that unit, and a constant stays a constant.
POINTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)  # per channel: sliced along with the units
POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)


@dataclass(frozen=True)
class LayerUnits:
    """What the pass did to the output units of one layer."""

    name: str
    units_before: int
    units_after: int
    constant_units: int  # incoming weights all zero: act(bias) folded into the next layer's bias
    unused_units: int  # outgoing weights all zero: nobody reads them


@dataclass(frozen=True)
class DeadUnitReport:
    """Result of `eliminate_dead_units`: `applied` is False when the model was left unchanged."""

    applied: bool
    reason: str = ""
    layers: tuple[LayerUnits, ...] = ()
    skipped: tuple[str, ...] = ()  # layer pairs the pass could not touch, and why
    params_before: int = 0
    params_after: int = 0

    @property
    def removed_units(self) -> int:
        return sum(u.units_before - u.units_after for u in self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["removed_units"] = self.removed_units
        return d


@dataclass
class _Link:
    """Layer A feeding layer B through the modules in `between`."""

    a_name: str
    a: Layer
    b: Layer
    between: list[nn.Module]
    constant_ok: bool  # may a nonzero constant unit be folded into B's bias exactly?
    counts: dict[str, int] = field(default_factory=lambda: {"constant": 0, "unused": 0})


def eliminate_dead_units(model: nn.Module) -> tuple[nn.Module, DeadUnitReport]:
    """Return a copy of `model` (in eval mode) with dead hidden units removed, and a report.

    Handles an `nn.Sequential` (nested ones are flattened) of Linear/Conv1d/Conv2d layers joined
    by elementwise activations, BatchNorm, pooling, Dropout and Flatten. The model's inputs and
    outputs keep their shapes and, up to float rounding of the folded biases, their values (in
    eval mode). Any other graph is refused: the model comes back unchanged with
    `report.applied == False` and the reason.
    """
    params_before = sum(p.numel() for p in model.parameters())
    if not isinstance(model, nn.Sequential):
        reason = f"{type(model).__name__} is not an nn.Sequential chain; dead units need a chain"
        return model, DeadUnitReport(
            False, reason, params_before=params_before, params_after=params_before
        )
    new = copy.deepcopy(model).eval()
    leaves = list(_leaves(new))
    links, skipped = _links(leaves)
    before = {id(link.a): _units(link.a) for link in links}
    with torch.no_grad():
        while any([_shrink_link(link) for link in links]):  # list: run every link each round
            pass
    layers = tuple(
        LayerUnits(
            link.a_name,
            before[id(link.a)],
            _units(link.a),
            link.counts["constant"],
            link.counts["unused"],
        )
        for link in links
    )
    return new, DeadUnitReport(
        applied=True,
        layers=layers,
        skipped=tuple(skipped),
        params_before=params_before,
        params_after=sum(p.numel() for p in new.parameters()),
    )


def _leaves(seq: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, m in seq.named_children():
        if isinstance(m, nn.Sequential):
            out += _leaves(m, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", m))
    return out


def _units(layer: Layer) -> int:
    return int(layer.weight.shape[0])


def _links(leaves: list[tuple[str, nn.Module]]) -> tuple[list[_Link], list[str]]:
    idx = [i for i, (_, m) in enumerate(leaves) if isinstance(m, LAYERS)]
    links: list[_Link] = []
    skipped: list[str] = []
    for i, j in zip(idx, idx[1:], strict=False):
        (a_name, a), (b_name, b) = leaves[i], leaves[j]
        assert isinstance(a, LAYERS) and isinstance(b, LAYERS)
        between = [m for _, m in leaves[i + 1 : j]]
        why = _unsupported(a, b, between)
        if why:
            skipped.append(f"{a_name} -> {b_name}: {why}")
            continue
        links.append(_Link(a_name, a, b, between, _constant_ok(b, between)))
    return links, skipped


def _unsupported(a: Layer, b: Layer, between: list[nn.Module]) -> str:
    for m in between:
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                return f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim})"
        elif not isinstance(m, POINTWISE + NORMS + POOLS):
            return f"{type(m).__name__} between them is not an elementwise/pooling op"
    if isinstance(a, nn.Conv1d | nn.Conv2d) and a.groups != 1:
        return f"grouped conv (groups={a.groups}) keeps its channels"
    if isinstance(b, nn.Conv1d | nn.Conv2d):
        flattened = any(isinstance(m, nn.Flatten) for m in between)
        if not isinstance(a, nn.Conv1d | nn.Conv2d) or flattened:
            return "a conv fed by flattened features"
        if b.groups != 1:
            return f"grouped conv (groups={b.groups}) keeps its channels"
        if b.in_channels != a.out_channels:
            return "channel counts do not match"
    elif isinstance(a, nn.Linear) and b.in_features != a.out_features:
        return "feature counts do not match"
    elif isinstance(a, nn.Conv1d | nn.Conv2d) and b.in_features % a.out_channels:
        return "flattened features are not a multiple of the channels"
    return ""


def _constant_ok(b: Layer, between: list[nn.Module]) -> bool:
    # A constant channel stays constant through max/adaptive pooling, but average pooling that
    # counts zero padding, or a conv B with zero padding, sees zeros at the border.
    for m in between:
        if isinstance(m, nn.AvgPool1d | nn.AvgPool2d):
            pool_pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
            if (any(pool_pad) and m.count_include_pad) or getattr(m, "divisor_override", None):
                return False
    if isinstance(b, nn.Conv1d | nn.Conv2d) and b.padding_mode == "zeros":
        conv_pad = b.padding
        return conv_pad == "valid" or (not isinstance(conv_pad, str) and not any(conv_pad))
    return True


def _constants(link: _Link) -> torch.Tensor:
    """The value each unit of A would output if its incoming weights were zero: act(bias)."""
    a = link.a
    bias = (
        a.bias
        if a.bias is not None
        else torch.zeros(_units(a), dtype=a.weight.dtype, device=a.weight.device)
    )
    x = bias.detach().clone().reshape(1, -1, *([1] * (a.weight.dim() - 2)))
    for m in link.between:
        if isinstance(m, POINTWISE):
            x = m(x)
        elif isinstance(m, NORMS):
            x = nn.functional.batch_norm(
                x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps
            )
    return x.reshape(-1)


def _b_columns(link: _Link) -> torch.Tensor:
    """B's weight as [out, units of A, columns per unit].

    Linear after Linear: one column per unit; after Conv + Flatten: the unit's h*w flattened
    positions (channels are the outer dimension of Flatten); Conv after Conv: its kh*kw taps.
    """
    w = link.b.weight
    return w.reshape(w.shape[0], _units(link.a), -1)


def _shrink_link(link: _Link) -> bool:
    a, b = link.a, link.b
    units = _units(a)
    dead_in = (a.weight.reshape(units, -1) == 0).all(dim=1)
    cols = _b_columns(link)
    dead_out = (cols == 0).all(dim=2).all(dim=0)
    const = _constants(link)
    foldable = dead_in & ~dead_out
    if not link.constant_ok:
        foldable &= const == 0  # a zero constant contributes nothing anywhere
    drop = dead_out | foldable
    if bool(drop.all()):  # keep one unit: a zero-width layer is legal but trips exporters
        drop[0] = False
        foldable[0] = False
    if not bool(drop.any()):
        return False
    if bool(foldable.any()):
        contribution = (cols[:, foldable].sum(dim=2) * const[foldable]).sum(dim=1)
        if bool((contribution != 0).any()):
            if b.bias is None:
                b.bias = nn.Parameter(
                    torch.zeros(b.weight.shape[0], dtype=b.weight.dtype, device=b.weight.device)
                )
            b.bias.add_(contribution.to(b.bias.dtype))
    link.counts["constant"] += int(foldable.sum())
    link.counts["unused"] += int((drop & ~foldable).sum())
    keep = (~drop).nonzero().flatten()
    _keep_outputs(a, keep)
    for m in link.between:
        if isinstance(m, NORMS):
            _keep_norm(m, keep)
    _keep_inputs(b, keep, cols)
    return True


def _keep_outputs(layer: Layer, keep: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias[keep].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)


def _keep_norm(norm: Norm, keep: torch.Tensor) -> None:
    norm.num_features = len(keep)
    for name in ("weight", "bias"):
        if getattr(norm, name) is not None:
            setattr(norm, name, nn.Parameter(getattr(norm, name)[keep].clone()))
    for name in ("running_mean", "running_var"):
        if getattr(norm, name) is not None:
            setattr(norm, name, getattr(norm, name)[keep].clone())


def _keep_inputs(layer: Layer, keep: torch.Tensor, cols: torch.Tensor) -> None:
    w = layer.weight
    kept = cols[:, keep]  # [out, kept units, columns per unit]
    if isinstance(layer, nn.Linear):
        layer.weight = nn.Parameter(kept.reshape(w.shape[0], -1).clone())
        layer.in_features = layer.weight.shape[1]
    else:
        layer.weight = nn.Parameter(kept.reshape(w.shape[0], len(keep), *w.shape[2:]).clone())
        layer.in_channels = len(keep)
