"""ONNX's own sparse storage (`SparseTensorProto`, COO) for pruned weights: the baseline format.

What the standard allows and what passes (onnx 1.23, onnxruntime 1.32, measured in
tests/test_portable_sparse_initializer.py):

- Indices are int64 (the checker rejects other types), in the linearised form: one row-major
  index per nonzero, shape [nnz], sorted. That is 8 B per nonzero for positions alone, which
  is why this format is 2-3x larger than the compact codec (ticketc.export.portable).
- `graph.sparse_initializer` passes `onnx.checker.check_model(model)` and runs in
  onnxruntime, which densifies it at load (no memory or speed gain at run time).
- It cannot pass `check_model(model, full_check=True)` whatever consumes it: shape inference
  types a sparse initializer as `sparse_tensor(float)`, which no standard op accepts (Gemm:
  "unsupported type"; MatMul: "wrong rank (0)"; Conv: "spatial dimensions (0)"), and a
  `value_info` declaring it dense fails with "type case mismatch".
- What does pass `full_check`: a `Constant` node whose `sparse_value` attribute holds the same
  SparseTensorProto (its output is a dense tensor). `as_constant=True` writes that form.
- `onnx.reference.ReferenceEvaluator` runs neither form (onnx 1.23).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

__all__ = ["to_sparse_initializer"]


def _sparse_tensor(name: str, dense: np.ndarray) -> onnx.SparseTensorProto:
    flat = dense.reshape(-1)
    index = np.flatnonzero(flat)
    values = numpy_helper.from_array(flat[index], name)
    indices = numpy_helper.from_array(index.astype(np.int64), "")
    return helper.make_sparse_tensor(values, indices, list(dense.shape))


def to_sparse_initializer(
    model: onnx.ModelProto,
    weights: Mapping[str, torch.Tensor | np.ndarray],
    as_constant: bool = False,
) -> onnx.ModelProto:
    """A copy of `model` with the initializers named in `weights` stored as COO sparse tensors.

    `weights` maps initializer name -> the dense tensor as the graph holds it (same shape and
    type; its zeros are dropped). By default the tensors go to `graph.sparse_initializer` (passes
    `check_model`, not `full_check`; see the module docstring); with `as_constant=True` each is
    a `Constant(sparse_value=...)` node instead, which also passes `full_check`.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    by_name = {init.name: init for init in graph.initializer}
    tensors: list[onnx.SparseTensorProto] = []
    for name, weight in weights.items():
        if name not in by_name:
            raise ValueError(f"initializer {name!r} is not in the model")
        if isinstance(weight, torch.Tensor):
            dense = weight.detach().cpu().numpy()
        elif isinstance(weight, np.ndarray):
            dense = weight
        else:
            kind = type(weight).__name__
            raise TypeError(f"weights[{name!r}] must be a torch.Tensor or numpy array, got {kind}")
        # dims and type only: the exporter may have dropped the dense data already
        target = by_name[name]
        target_dtype = helper.tensor_dtype_to_np_dtype(target.data_type)
        if dense.shape != tuple(target.dims) or dense.dtype != target_dtype:
            raise ValueError(
                f"weights[{name!r}] is {dense.dtype}{list(dense.shape)}, "
                f"initializer is {target_dtype}{list(target.dims)}"
            )
        tensors.append(_sparse_tensor(name, dense))

    kept = [init for init in graph.initializer if init.name not in weights]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in weights]
    graph.ClearField("input")
    graph.input.extend(inputs)
    if as_constant:
        constants = [
            helper.make_node("Constant", [], [t.values.name], sparse_value=t) for t in tensors
        ]
        for node in constants:
            node.attribute[0].sparse_tensor.values.name = ""
        nodes = list(graph.node)
        graph.ClearField("node")
        graph.node.extend(constants + nodes)
    else:
        graph.sparse_initializer.extend(tensors)
    return out
