"""ONNX's own COO sparse initializers: what the checker and onnxruntime accept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from tests.test_portable import conv_mlp
from ticketc.export.sparse_initializer import to_sparse_initializer


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _weights() -> tuple[onnx.ModelProto, dict[str, torch.Tensor]]:
    model, weights = conv_mlp()
    return model, {n: torch.from_numpy(w) for n, w in weights.items()}


def test_sparse_initializers_pass_the_checker_and_run_in_onnxruntime():
    model, weights = _weights()
    sparse = to_sparse_initializer(model, weights)
    onnx.checker.check_model(sparse)
    stored = {t.values.name: t for t in sparse.graph.sparse_initializer}
    assert set(stored) == set(weights)
    assert not set(weights) & {i.name for i in sparse.graph.initializer}
    for name, w in weights.items():
        tensor = stored[name]
        nnz = int(w.count_nonzero())
        assert list(tensor.dims) == list(w.shape)
        assert tensor.indices.data_type == TensorProto.INT64
        assert list(tensor.indices.dims) == [nnz]  # the linearised COO form
        assert list(tensor.values.dims) == [nnz]
    x = np.random.default_rng(0).standard_normal((2, 2, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(sparse, x), _run(model, x))


def test_full_check_fails_for_sparse_initializers_but_passes_as_constants():
    # The documented limitation: shape inference sees no dense type or shape for them.
    model, weights = _weights()
    with pytest.raises(onnx.shape_inference.InferenceError, match="Conv"):
        onnx.checker.check_model(to_sparse_initializer(model, weights), full_check=True)
    constant = to_sparse_initializer(model, weights, as_constant=True)
    onnx.checker.check_model(constant, full_check=True)
    assert not constant.graph.sparse_initializer
    assert [n.op_type for n in constant.graph.node[: len(weights)]] == ["Constant"] * len(weights)
    x = np.ones((1, 2, 4, 4), np.float32)
    np.testing.assert_array_equal(_run(constant, x), _run(model, x))


def test_sparse_initializer_is_smaller_than_dense_only_when_sparse_enough():
    # 12 B per nonzero (int64 index + fp32 value) against 4 B per weight.
    model, weights = _weights()
    sparse = to_sparse_initializer(model, weights)
    assert len(sparse.SerializeToString()) < len(model.SerializeToString())
    dense_weights = {n: torch.ones_like(w) for n, w in weights.items()}
    dense_model = to_sparse_initializer(model, dense_weights)
    assert len(dense_model.SerializeToString()) > 2 * len(model.SerializeToString())


def test_bad_arguments_name_the_offending_value():
    model, weights = _weights()
    with pytest.raises(ValueError, match="'nope'"):
        to_sparse_initializer(model, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="fc1.weight"):
        to_sparse_initializer(model, {"fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(TypeError, match="list"):
        to_sparse_initializer(model, {"fc1.weight": [0.0] * 20})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="fc1.weight"):
        to_sparse_initializer(model, {"fc1.weight": np.zeros((20, 64), np.float64)})


def test_the_input_model_is_left_untouched():
    model, weights = _weights()
    before = model.SerializeToString()
    to_sparse_initializer(model, weights)
    assert model.SerializeToString() == before
