"""The portable compact ONNX export: checker, onnxruntime and onnx.reference agree with dense."""

from __future__ import annotations

import itertools
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ticketc.export.portable import (
    DOMAIN,
    decode_function,
    function_name,
    read_portable,
    to_portable,
)
from ticketc.formats import POSITIONS_KINDS, VALUES_KINDS, Compact

KINDS = list(itertools.product(POSITIONS_KINDS, VALUES_KINDS))
OPSET = 18


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _masked(rng: np.random.Generator, shape: tuple[int, ...], density: float) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32)
    return (w * (rng.random(shape) < density)).astype(np.float32)


def conv_mlp(opset: int = OPSET, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[N,2,6,6] -> Conv(4x2x3x3) -> Relu -> Flatten -> Gemm(64->20) -> Relu -> Gemm(20->3).

    The first Gemm weight has a long run of zeros so gap8 needs fillers.
    """
    rng = np.random.default_rng(seed)
    conv = _masked(rng, (4, 2, 3, 3), 0.4)
    fc1 = _masked(rng, (20, 64), 0.3)
    fc1[3:10] = 0  # 7 empty rows: a gap of > 448 elements
    fc2 = _masked(rng, (3, 20), 0.5)
    weights = {"conv.weight": conv, "fc1.weight": fc1, "fc2.weight": fc2}
    biases = {
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "fc1.bias": rng.standard_normal(20).astype(np.float32),
        "fc2.bias": rng.standard_normal(3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"]),
        helper.make_node("Flatten", ["cr"], ["f"]),
        helper.make_node("Gemm", ["f", "fc1.weight", "fc1.bias"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "fc2.weight", "fc2.bias"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in {**weights, **biases}.items()]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), weights


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Expose tensors (here: the decoded weights) as extra graph outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return out


def lenet300(density: float, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Lenet-300-100 shaped as torch exports it (Gemm, transB), hidden layers at `density`,
    the output layer at 20 % (pruned at half the rate, as in the paper)."""
    rng = np.random.default_rng(seed)
    dims = [784, 300, 100, 10]
    nodes, inits, weights = [], [], {}
    x = "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        d = density if i < 2 else 0.2
        weights[f"{i}.weight"] = w = _masked(rng, (fan_out, fan_in), d) * 0.05
        inits += [
            numpy_helper.from_array(w, f"{i}.weight"),
            numpy_helper.from_array(rng.standard_normal(fan_out).astype(np.float32), f"{i}.bias"),
        ]
        nodes.append(helper.make_node("Gemm", [x, f"{i}.weight", f"{i}.bias"], [f"g{i}"], transB=1))
        x = f"g{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "lenet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), weights


# --------------------------------------------------------------------------- every kind
@pytest.mark.parametrize(("positions", "values"), KINDS)
def test_every_kind_passes_checker_and_decodes_exactly_in_both_runtimes(positions, values):
    model, weights = conv_mlp()
    compact = {
        n: Compact.from_dense(w, values=values, positions=positions) for n, w in weights.items()
    }
    half = ["conv.bias", "fc1.bias", "fc2.bias"] if values != "fp32" else []
    portable = to_portable(model, compact, half=half)
    onnx.checker.check_model(portable, full_check=True)
    if positions == "gap8":
        assert compact["fc1.weight"].entries > compact["fc1.weight"].nnz  # fillers exercised

    # The decoded weights themselves: bit-identical to Compact.to_dense in both runtimes.
    names = list(weights)
    x = np.random.default_rng(1).standard_normal((3, 2, 4, 4)).astype(np.float32)
    probe = with_outputs(portable, names)
    ort_out = _session(probe).run(None, {"x": x})
    ref_out = ReferenceEvaluator(probe).run(None, {"x": x})
    for name, got_ort, got_ref in zip(names, ort_out[1:], ref_out[1:], strict=True):
        expected = compact[name].to_dense().numpy()
        np.testing.assert_array_equal(got_ort, expected)
        np.testing.assert_array_equal(got_ref, expected)
        if values == "fp32":
            np.testing.assert_array_equal(got_ort, weights[name])

    # The model output: equal to the dense model holding the decoded weights.
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    for init in dense.graph.initializer:
        if init.name in compact:
            init.CopyFrom(numpy_helper.from_array(compact[init.name].to_dense().numpy(), init.name))
        elif init.name in half:
            value = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    expected = _session(dense).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ort_out[0], expected)
    np.testing.assert_allclose(ref_out[0], expected, rtol=1e-5, atol=1e-5)
    if values == "fp32":
        np.testing.assert_array_equal(expected, _session(model).run(None, {"x": x})[0])


def _single(weight: np.ndarray) -> onnx.ModelProto:
    """A model whose output is the initializer W itself."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["y"])],
        "w",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(weight.shape))],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(1, 1), (1, 37), (37, 1), (5, 7), (3, 2, 3, 3), (1, 700), (11,)]),
    density=st.sampled_from([0.0, 1.0, 0.01, 0.2, 0.6]),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 1000),
)
def test_decode_round_trips_in_onnxruntime(shape, density, kind, seed):
    weight = _masked(np.random.default_rng(seed), shape, density)
    compact = Compact.from_dense(weight, values=kind[1], positions=kind[0])
    portable = to_portable(_single(weight), {"W": compact})
    np.testing.assert_array_equal(_session(portable).run(None, {})[0], compact.to_dense().numpy())


def test_gap16_fillers_decode_in_both_runtimes():
    weight = np.zeros((2, 70000), np.float32)
    weight[0, 3], weight[1, 69990] = 1.5, -2.0  # a gap of 139987 > 2 * 65536
    for values in ("fp32", "int4"):
        compact = Compact.from_dense(weight, values=values, positions="gap16")
        assert compact.entries == compact.nnz + 2
        portable = to_portable(_single(weight), {"W": compact})
        onnx.checker.check_model(portable, full_check=True)
        expected = compact.to_dense().numpy()
        np.testing.assert_array_equal(_session(portable).run(None, {})[0], expected)
        np.testing.assert_array_equal(ReferenceEvaluator(portable).run(None, {})[0], expected)


@pytest.mark.parametrize(("positions", "values"), KINDS)
def test_read_portable_gives_back_the_compact_weights(positions, values):
    model, weights = conv_mlp()
    compact = {
        n: Compact.from_dense(w, values=values, positions=positions) for n, w in weights.items()
    }
    back = read_portable(to_portable(model, compact))
    assert set(back) == set(compact)
    for name, original in compact.items():
        got = back[name]
        got.check()
        assert (got.shape, got.positions_kind, got.values_kind) == (
            original.shape,
            original.positions_kind,
            original.values_kind,
        )
        assert got.nbytes == original.nbytes
        assert torch.equal(got.to_dense(), original.to_dense())
        if values in ("fp32", "fp16"):  # no real nonzero can decode to 0: nnz is exact
            assert got.nnz == original.nnz


# --------------------------------------------------------------------------- graph structure
def test_one_shared_function_per_kind_and_the_rest_of_the_graph_unchanged():
    model, weights = conv_mlp()
    compact = {
        n: Compact.from_dense(w, values="int4", positions="gap8") for n, w in weights.items()
    }
    compact["fc2.weight"] = Compact.from_dense(weights["fc2.weight"], positions="bitmask")
    portable = to_portable(model, compact)
    assert sorted(f.name for f in portable.functions) == ["DecodeBitmaskFp32", "DecodeGap8Int4"]
    assert all(f.domain == DOMAIN for f in portable.functions)
    decoders = [n for n in portable.graph.node if n.domain == DOMAIN]
    assert [n.output[0] for n in decoders] == list(weights)
    assert [n.op_type for n in decoders].count("DecodeGap8Int4") == 2
    # The original nodes are untouched and no dense copy of a weight is left behind.
    assert list(portable.graph.node)[len(decoders) :] == list(model.graph.node)
    assert not set(weights) & {i.name for i in portable.graph.initializer}
    assert {i.name for i in portable.graph.initializer} >= {"0.p", "0.v", "1.p", "1.v"}
    opsets = {o.domain: o.version for o in portable.opset_import}
    assert opsets == {"": OPSET, DOMAIN: 1}
    assert model.graph.initializer[0].name == "conv.weight"  # the input model is not modified


def test_half_stores_fp16_and_casts_back():
    model, weights = conv_mlp()
    portable = to_portable(model, {}, half=["fc1.bias"])
    stored = {i.name: i for i in portable.graph.initializer}
    assert stored["0.h"].data_type == TensorProto.FLOAT16
    assert "fc1.bias" not in stored
    onnx.checker.check_model(portable, full_check=True)
    x = np.ones((1, 2, 4, 4), np.float32)
    out = _session(with_outputs(portable, ["fc1.bias"])).run(None, {"x": x})[1]
    bias = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "fc1.bias"))
    np.testing.assert_array_equal(out, bias.astype(np.float16).astype(np.float32))


def test_older_opsets_and_the_reference_evaluator():
    model, weights = conv_mlp(opset=13)
    for values in VALUES_KINDS:
        compact = {n: Compact.from_dense(w, values=values) for n, w in weights.items()}
        portable = to_portable(model, compact)
        onnx.checker.check_model(portable, full_check=True)
        x = np.ones((1, 2, 4, 4), np.float32)
        a = _session(portable).run(None, {"x": x})[0]
        b = ReferenceEvaluator(portable).run(None, {"x": x})[0]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("weights", "half", "error", "message"),
    [
        ({"nope": None}, [], ValueError, "'nope' is not in the model"),
        ({"fc1.weight": "x"}, [], TypeError, "must be a Compact"),
        ({"fc1.weight": np.ones((2, 2), np.float32)}, [], TypeError, "must be a Compact"),
        ({}, ["missing.bias"], ValueError, "'missing.bias'"),
    ],
)
def test_bad_arguments_name_the_offending_value(weights, half, error, message):
    model, _ = conv_mlp()
    with pytest.raises(error, match=message):
        to_portable(model, weights, half=half)


def test_shape_mismatch_and_old_opset_are_rejected():
    model, weights = conv_mlp()
    wrong = Compact.from_dense(weights["fc2.weight"].T.copy())
    with pytest.raises(ValueError, match=r"shape \(20, 3\).*\(3, 20\)"):
        to_portable(model, {"fc2.weight": wrong})
    with pytest.raises(ValueError, match="opset >= 13"):
        decode_function("gap8", "fp32", opset=12)
    assert function_name("gap16", "int8") == "DecodeGap16Int8"


# --------------------------------------------------------------------------- size and cost
def _serialized(model: onnx.ModelProto) -> int:
    return len(model.SerializeToString())


def test_lenet300_at_3_6_percent_meets_the_size_goals():
    model, weights = lenet300(0.035)
    dense_bytes = _serialized(model)
    goals = {"fp32": 15, "fp16": 25, "int8": 45, "int4": 60}
    biases = [i.name for i in model.graph.initializer if i.name.endswith("bias")]
    for values, goal in goals.items():
        compact = {n: Compact.from_dense(w, values=values) for n, w in weights.items()}
        half = biases if values != "fp32" else []
        size = _serialized(to_portable(model, compact, half=half))
        # The floor: entropy bound of every weight plus the biases as stored (fp16 or fp32).
        bound = sum(c.entropy_bound_bytes for c in compact.values())
        bound += (2 if half else 4) * sum(w.shape[0] for w in weights.values())
        assert dense_bytes / size >= goal, (values, dense_bytes / size)
        assert size <= 1.25 * bound, (values, size / bound)


def test_shape_as_attribute_is_smaller_than_a_shape_initializer():
    # What the design measured: the per-layer cost of carrying [300, 784].
    attr = helper.make_attribute("t", [300, 784])
    init = numpy_helper.from_array(np.array([300, 784], np.int64), "0.weight.t")
    node_input = len("0.weight.t") + 2
    assert len(attr.SerializeToString()) + 2 < len(init.SerializeToString()) + node_input


def _min_session_seconds(model: onnx.ModelProto, repeats: int = 5) -> float:
    blob = model.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("positions", POSITIONS_KINDS)
def test_onnxruntime_folds_every_decode_at_session_creation(positions, tmp_path):
    model, weights = conv_mlp()
    compact = {
        n: Compact.from_dense(w, values="int4", positions=positions) for n, w in weights.items()
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(
        to_portable(model, compact).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    # Only the original compute is left: the weights became plain initializers.
    ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert ops == {n.op_type for n in model.graph.node}


def test_session_creation_stays_cheap():
    model, weights = lenet300(0.035)
    compact = {n: Compact.from_dense(w, values="int4") for n, w in weights.items()}
    portable = to_portable(model, compact)
    dense_s, portable_s = _min_session_seconds(model), _min_session_seconds(portable)
    # Measured on 2 shared CPU cores: dense ~1.5 ms, rice+int4 ~15-25 ms, gap8+int4 ~4-9 ms.
    # The bound only catches a pathological decode (e.g. one that is not folded or is O(n^2)).
    assert portable_s <= 3 * dense_s + 0.05, (portable_s, dense_s)


def test_torch_export_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.3)
    x = torch.randn(2, 20)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), path, dynamo=True, external_data=False)
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    # Find each weight by value: torch may rename or transpose initializers.
    compact = {}
    for layer in (net[0], net[2]):
        w = layer.weight.detach().numpy()
        for name, value in inits.items():
            for candidate in (w, w.T):
                if value.shape == candidate.shape and np.array_equal(value, candidate):
                    compact[name] = Compact.from_dense(np.ascontiguousarray(candidate))
    assert len(compact) == 2
    portable = to_portable(model, compact)
    onnx.checker.check_model(portable, full_check=True)
    got = _session(portable).run(None, {model.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_array_equal(
        got, _session(model).run(None, {model.graph.input[0].name: x.numpy()})[0]
    )
    np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_array_names_never_collide_with_graph_names():
    model, weights = conv_mlp()
    first = next(iter(weights))
    clash = helper.make_tensor("0.p", TensorProto.FLOAT, [1], [0.0])
    model.graph.initializer.append(clash)
    portable = to_portable(model, {first: Compact.from_dense(weights[first])})
    names = [i.name for i in portable.graph.initializer]
    assert len(names) == len(set(names)) and f"{first}.p" in names
