"""Card records for packed tensors: sizes, the entropy bound, errors, planned speed-ups."""

from __future__ import annotations

import numpy as np
import torch

from ticketc.card import LayerRecord
from ticketc.pack.codec import Encoded, count_nonzero, entropy_bound_bytes, value_bits
from ticketc.pack.pattern import sparsity_pattern

__all__ = ["SPEEDUP_BATCH", "layer_record", "planned_speedup"]

SPEEDUP_BATCH = 1  # batch size the planned CPU speed-ups are predicted at
_NO_COMPUTE = {"Embedding": "a lookup: no compute to save"}
_COMPILED = ("Linear",)  # module types whose weight ticketc compile runs sparse


def _side_bytes(encoded: Encoded) -> int:
    side = [a for k, a in encoded.streams.items() if k in ("scale", "codebook")]
    return sum(int(a.nbytes) for a in side if isinstance(a, np.ndarray))


def _values_label(encoded: Encoded) -> str:
    own = str(encoded.dtype).removeprefix("torch.")
    return f"{own} (lossless)" if encoded.values == "lossless" else encoded.values


def planned_speedup(weight: torch.Tensor, batch: int = SPEEDUP_BATCH) -> float:
    """Predicted dense time over csr time for a Linear weight [out, in] on this CPU in fp32,
    from ticketc's cost model (ticketc.compile.costs); 1.0 when the planner would keep it dense
    (csr must clear CompileConfig.min_speedup, as in the planner). Block formats are left out:
    counting blocks costs more than packing the tensor."""
    from ticketc.compile.config import CompileConfig
    from ticketc.compile.costs import Gemm, device_costs

    out_features, in_features = weight.shape
    g = Gemm(batch, in_features, out_features, int(weight.count_nonzero()), 4)
    costs = device_costs("cpu", torch.float32)
    speedup = costs.predict("dense", g) / costs.predict("csr", g)
    return speedup if speedup >= CompileConfig().min_speedup else 1.0


def _speedup_fields(
    name: str, decoded: torch.Tensor, pattern: str, module_types: dict[str, str] | None
) -> tuple[float | None, str, str]:
    if pattern == "dense":
        return None, "", "dense: nothing to skip"
    if module_types is None or name not in module_types:
        return None, "", "module unknown"
    module = module_types[name]
    if module in _NO_COMPUTE:
        return None, "", _NO_COMPUTE[module]
    if module not in _COMPILED or not name.endswith("weight") or decoded.ndim != 2:
        return None, "", f"{module}: not run sparse by ticketc compile"
    speedup = planned_speedup(decoded.float())
    return speedup, f"planned, CPU fp32 batch {SPEEDUP_BATCH}", ""


def layer_record(
    name: str,
    source: torch.Tensor,
    encoded: Encoded,
    decoded: torch.Tensor,
    module_types: dict[str, str] | None = None,
) -> LayerRecord:
    """The card's record of one packed tensor; `decoded` is what unpack gives back."""
    pattern = sparsity_pattern(source)
    dense_bytes = encoded.dense_nbytes
    if encoded.layout == "dense":
        bound = float(dense_bytes)
        nnz = count_nonzero(source)
    else:
        bits = value_bits(encoded.values, encoded.dtype)
        bound = entropy_bound_bytes(encoded.numel, encoded.nnz, bits, _side_bytes(encoded))
        nnz = encoded.nnz
    abs_err = rel_err = 0.0
    if encoded.values != "lossless" and source.numel():
        a = source.detach().to(torch.float64).numpy()
        b = decoded.to(torch.float64).numpy()
        abs_err = float(np.abs(a - b).max())
        peak = float(np.abs(a).max())
        rel_err = abs_err / peak if peak else 0.0
    speedup, basis, note = _speedup_fields(name, decoded, pattern, module_types)
    return LayerRecord(
        name=name,
        shape=tuple(encoded.shape),
        dtype=str(encoded.dtype).removeprefix("torch."),
        nnz=nnz,
        pattern=pattern,
        layout=encoded.layout,
        values=_values_label(encoded),
        dense_bytes=dense_bytes,
        stored_bytes=encoded.nbytes,
        bound_bytes=bound,
        max_abs_error=abs_err,
        max_rel_error=rel_err,
        speedup=speedup,
        speedup_basis=basis,
        speedup_note=note,
    )
