"""End to end: pruned torch models -> every format and value type -> same outputs everywhere."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from tests.models_for_tests import prune_random_, tiny_conv1d, tiny_convnet, tiny_mlp
from ticketc.export import ExportConfig, export_model, read_metadata
from ticketc.inspect import onnx_weights

CASES = {
    "mlp": (tiny_mlp, (2, 20)),
    "conv2d": (tiny_convnet, (2, 4, 8, 8)),
    "conv1d": (tiny_conv1d, (2, 3, 11)),
}


def _model(name: str, density: float = 0.1):
    factory, shape = CASES[name]
    model = factory().eval()
    prune_random_(model, density)
    return model, torch.randn(shape)


def _outputs(path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    proto = onnx.load(str(path))
    if proto.graph.sparse_initializer:
        # onnx.reference cannot load sparse initializers (it reads a field SparseTensorProto
        # lacks), so it evaluates the same graph with them densified.
        _densify_sparse_initializers_(proto)
    return session.run(None, {name: x})[0], ReferenceEvaluator(proto).run(None, {name: x})[0]


def _densify_sparse_initializers_(proto: onnx.ModelProto) -> None:
    for sparse in proto.graph.sparse_initializer:
        dense = np.zeros(int(np.prod(sparse.dims)), dtype=np.float32)
        indices = numpy_helper.to_array(sparse.indices).reshape(-1)
        dense[indices] = numpy_helper.to_array(sparse.values)
        proto.graph.initializer.append(
            numpy_helper.from_array(dense.reshape(tuple(sparse.dims)), sparse.values.name)
        )
    del proto.graph.sparse_initializer[:]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["portable", "sparse-initializer", "dense"])
def test_lossless_formats_match_torch(tmp_path, case, fmt):
    model, x = _model(case)
    result = export_model(model, x, tmp_path / "m.onnx", ExportConfig(format=fmt))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=fmt != "sparse-initializer")
    assert result.verification is not None and result.verification.passed
    # a different batch size than the one traced: the batch dimension is dynamic
    x3 = torch.randn((3, *x.shape[1:])).numpy()
    expected = model(torch.from_numpy(x3)).detach().numpy()
    for got in _outputs(tmp_path / "m.onnx", x3):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_portable_fp32_weights_are_bit_exact(tmp_path, case):
    model, x = _model(case, density=0.05)
    export_model(model, x, tmp_path / "m.onnx")
    decoded = onnx_weights(tmp_path / "m.onnx")
    params = dict(model.named_parameters())
    assert decoded, "no pruned weight was found in the file"
    for name, weight in decoded.items():
        original = params[name].detach() if name in params else None
        if original is None:  # stored transposed by torch.onnx's optimizer
            original = next(
                p for p in params.values() if p.dim() == 2 and p.t().shape == weight.shape
            ).t()
        assert torch.equal(weight, original.float())


@pytest.mark.parametrize("values", ["fp16", "int8", "int4"])
def test_lossy_values_are_close_and_smaller(tmp_path, values):
    model, x = _model("mlp", density=0.2)
    fp32 = export_model(model, x, tmp_path / "fp32.onnx")
    lossy = export_model(model, x, tmp_path / f"{values}.onnx", ExportConfig(values=values))
    onnx.checker.check_model(onnx.load(str(tmp_path / f"{values}.onnx")), full_check=True)
    # the weights' payload shrinks; on a model this small the int4 codebook may eat the gain
    assert sum(x.nbytes for x in lossy.layers) < sum(x.nbytes for x in fp32.layers)
    assert lossy.verification is not None and lossy.verification.passed  # reported, no tolerance
    assert lossy.verification.max_rel < {"fp16": 1e-2, "int8": 5e-2, "int4": 0.3}[values]
    ort_out, ref_out = _outputs(tmp_path / f"{values}.onnx", x.numpy())
    np.testing.assert_allclose(ort_out, ref_out, rtol=1e-4, atol=1e-5)


def test_tolerance_failure_writes_nothing_and_keeps_old_file(tmp_path):
    model, x = _model("mlp", density=0.5)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(ValueError, match="verification failed"):
        export_model(model, x, out, ExportConfig(values="int4", tolerance=1e-9))
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_metadata_records_version_and_layers(tmp_path):
    model, x = _model("conv2d")
    export_model(model, x, tmp_path / "m.onnx", ExportConfig(values="int8"))
    meta = read_metadata(onnx.load(str(tmp_path / "m.onnx")))
    assert meta is not None and meta["version"] and meta["values"] == "int8"
    assert {layer["name"] for layer in meta["layers"]} == {"0.weight", "3.weight", "6.weight"}
    assert all(0 < layer["density"] < 1 and "+int8" in layer["codec"] for layer in meta["layers"])
    json.dumps(meta)


def test_sparse_portable_is_much_smaller_than_dense(tmp_path):
    from ticketc.models import lenet300

    model = lenet300().eval()
    prune_random_(model, 0.036)
    x = torch.randn(1, 1, 28, 28)
    dense = export_model(model, x, tmp_path / "d.onnx", ExportConfig(format="dense", verify=False))
    for values, ratio in (("fp32", 15), ("int4", 45)):
        config = ExportConfig(values=values, verify=False)
        portable = export_model(model, x, tmp_path / "p.onnx", config)
        assert dense.total_bytes / portable.total_bytes > ratio


def test_dead_units_shrink_the_file_and_keep_outputs(tmp_path):
    from ticketc.models import lenet300

    model = lenet300().eval()
    prune_random_(model, 0.3)
    with torch.no_grad():
        model[1].weight[:100] = 0  # 100 hidden units with no input: constant act(bias)
        model[3].weight[:, 200:] = 0  # 100 units nobody reads
    x = torch.randn(1, 1, 28, 28)
    plain = export_model(model, x, tmp_path / "plain.onnx")
    smaller = export_model(model, x, tmp_path / "dead.onnx", ExportConfig(dead_units=True))
    assert any("removed" in note for note in smaller.notes)
    assert smaller.verification is not None and smaller.verification.passed  # vs the original
    weights = onnx_weights(tmp_path / "dead.onnx")
    assert weights["1.weight"].shape[0] < 300 - 150
    assert smaller.total_bytes < plain.total_bytes


def test_a_dense_layer_is_never_stored_bigger(tmp_path):
    model, x = _model("mlp", density=1.0)
    dense = export_model(model, x, tmp_path / "d.onnx", ExportConfig(format="dense"))
    portable = export_model(model, x, tmp_path / "p.onnx")
    assert all(layer.codec == "dense" for layer in portable.layers)
    assert portable.total_bytes <= dense.total_bytes
