"""The planner: never a format predicted slower than dense; overrides, tuning, filter_fn."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ticketc.compile as tc
from ticketc import ops
from ticketc.compile import CompileConfig, SparseLinear, make_plan, plan_of
from ticketc.compile.costs import (
    device_costs,
    gemm_stats,
    parse_format,
    predict,
    predict_chain,
)
from ticketc.errors import UserError


def _layer(m: int, k: int, density: float, seed: int = 0) -> nn.Sequential:
    layer = nn.Linear(k, m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) < density)
    return nn.Sequential(layer)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 300),
    k=st.integers(1, 300),
    density=st.floats(0.0, 1.0),
    batch=st.sampled_from([1, 16, 64, 256]),
    device=st.sampled_from(["cpu", "cuda"]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
)
def test_never_picks_a_format_predicted_slower_than_dense(m, k, density, batch, device, dtype):
    config = CompileConfig(device=device, dtype=dtype, batch_size=batch, dead_units=False)
    plan = make_plan(_layer(m, k, density), None, config)
    (lp,) = plan.layers
    assert lp.format in lp.predicted_us
    assert lp.predicted_us[lp.format] * config.min_speedup <= lp.predicted_us["dense"] or (
        lp.format == "dense"
    )
    assert lp.gemm == (batch, k, m)


def test_picks_sparse_where_it_clearly_wins_and_dense_where_not():
    config = CompileConfig(batch_size=64, dead_units=False)
    sparse = make_plan(_layer(1024, 1024, 0.01), None, config).layers[0]
    dense = make_plan(_layer(64, 64, 1.0), None, config).layers[0]
    assert sparse.format != "dense" and "faster" in sparse.reason
    assert dense.format == "dense"


def test_costs_grow_with_work():
    costs = device_costs("cpu", torch.float32)
    few = gemm_stats(torch.rand(256, 256) < 0.01, 64, 4)
    many = gemm_stats(torch.rand(256, 256) < 0.5, 64, 4)
    assert predict("csr", few, costs) < predict("csr", many, costs)
    assert predict("dense", few, costs) == predict("dense", many, costs)
    small_batch = gemm_stats(torch.ones(64, 64, dtype=torch.bool), 1, 4)
    large_batch = gemm_stats(torch.ones(64, 64, dtype=torch.bool), 256, 4)
    assert predict("dense", small_batch, costs) < predict("dense", large_batch, costs)


def test_cpu_csr_cost_switches_kernel_at_the_numba_batch():
    costs = device_costs("cpu", torch.float32)
    keep = torch.rand(300, 784) < 0.036
    below = gemm_stats(keep, ops.NUMBA_MIN_BATCH - 1, 4)
    at = gemm_stats(keep, ops.NUMBA_MIN_BATCH, 4)
    assert costs.cost("csr", below.n) is costs.formats["csr"]
    assert costs.cost("csr", at.n) is not costs.formats["csr"]
    # from the Numba batch on, an input already feature-major skips the transpose
    fm = replace(at, feature_major=True)
    assert predict("csr", fm, costs) < predict("csr", at, costs)
    assert predict("dense", fm, costs) == predict("dense", at, costs)


def test_planner_prices_a_csr_chain_as_feature_major():
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.Linear(99, 10))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model[0], model[2]:
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) < 0.03)
    costs = device_costs("cpu", torch.float32)
    plan = make_plan(model, None, CompileConfig(batch_size=64, dead_units=False))
    first, second, third = plan.layers
    assert first.format == second.format == "csr"
    for lp, layer, fm in ((first, model[0], False), (second, model[2], True)):
        g_ = replace(gemm_stats(layer.weight != 0, 64, 4), feature_major=fm)
        assert lp.predicted_us["csr"] == round(predict("csr", g_, costs) * 1e6, 3)
    # 100 outputs do not feed 99 inputs: not a chain, so priced with the transpose
    g3 = gemm_stats(model[3].weight != 0, 64, 4)
    assert third.predicted_us["csr"] == round(predict("csr", g3, costs) * 1e6, 3)


def test_parse_format_names_the_known_ones():
    assert parse_format("bsr(32)") == ("bsr", 32)
    with pytest.raises(ValueError, match="known: dense, csr"):
        parse_format("coo")


def test_plan_override_is_honoured(tmp_path):
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    config = CompileConfig(dead_units=False)
    plan = plan_of(tc.compile(model, config)).to_json()
    plan["layers"][0]["format"] = "bsr(16)"
    plan["layers"][1]["format"] = "dense"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    compiled = tc.compile(model, CompileConfig(dead_units=False, plan_path=str(path)))
    first, last = compiled.get_submodule("0"), compiled.get_submodule("2")
    assert isinstance(first, SparseLinear) and first.format == "bsr(16)"
    assert isinstance(last, nn.Linear)
    assert plan_of(compiled).layers[0].reason == f"set by {path}"
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["layers"][0].update(name="nope"), "does not have: nope"),
        (lambda p: p["layers"][0].update(format="coo"), "unknown format 'coo'"),
        (lambda p: p.update(format="other"), "not a valid ticketc plan"),
    ],
)
def test_bad_plan_files_are_user_errors(tmp_path, edit, message):
    model = nn.Sequential(nn.Linear(8, 4))
    plan = plan_of(tc.compile(model)).to_json()
    edit(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(UserError, match=message):
        tc.compile(model, CompileConfig(plan_path=str(path)))


def test_tune_measures_every_candidate_and_keeps_the_fastest():
    config = CompileConfig(batch_size=16, tune=True, tune_reps=3, dead_units=False)
    (lp,) = make_plan(_layer(128, 96, 0.05), None, config).layers
    assert lp.measured_us is not None and set(lp.measured_us) == set(lp.predicted_us)
    assert lp.format == min(lp.measured_us, key=lp.measured_us.__getitem__)
    assert "measured" in lp.reason


def test_filter_fn_keeps_layers_dense():
    model = _layer(1024, 1024, 0.01)
    config = CompileConfig(batch_size=64, filter_fn=lambda m, fqn: fqn != "0")
    compiled = tc.compile(model, config)
    assert isinstance(compiled[0], nn.Linear)
    assert plan_of(compiled).layers[0].reason == "kept dense by filter_fn"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "'tpu'"),
        ({"dtype": "int8"}, "'int8'"),
        ({"batch_size": 0}, "batch_size"),
        ({"formats": ("coo",)}, "coo"),
        ({"min_speedup": 0.9}, "0.9"),
    ],
)
def test_config_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompileConfig(**kwargs)


def _lenet(density: float) -> nn.Sequential:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model[1], model[3], model[5]:
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) < density)
    return model


def test_linear_runs_follow_the_sequential():
    model = nn.Sequential(
        nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.ReLU(), nn.Linear(5, 4),
        nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), nn.Linear(9, 2),
        nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
    )
    assert tc.planner.linear_runs(model) == [["0", "2"], ["5", "6"], ["10.0", "10.1"]]


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_a_sparse_chain_is_planned_csr_at_any_batch(batch):
    plan = make_plan(_lenet(0.036), None, CompileConfig(batch_size=batch, dead_units=False))
    assert [lp.format for lp in plan.layers] == ["csr", "csr", "csr"]
    assert all("csr chain of 3 layers" in lp.reason for lp in plan.layers) or batch >= 64


@pytest.mark.parametrize("density", [0.2, 1.0])  # 20 %: ~2 ns per stored weight at batch 1
def test_chain_is_not_planned_where_dense_is_predicted_faster(density):
    plan = make_plan(_lenet(density), None, CompileConfig(batch_size=1, dead_units=False))
    assert [lp.format for lp in plan.layers] == ["dense", "dense", "dense"]


def test_chain_prediction_mirrors_the_runtime_rule():
    costs = device_costs("cpu", torch.float32)
    small = [gemm_stats(torch.rand(300, 784) < 0.036, n, 4) for n in (1,)]
    assert predict_chain(small * 2, costs) is not None  # little work: a chain at batch 1
    big = [gemm_stats(torch.rand(2000, 2000) < 0.1, 16, 4)] * 2
    assert predict_chain(big, costs) is None  # much work below NUMBA_MIN_BATCH: layer by layer
    assert predict_chain(big[:1], costs) is None  # one layer is no chain
    assert predict_chain(big, device_costs("cuda", torch.float16)) is None


def test_chain_leaves_filtered_layers_dense():
    config = CompileConfig(
        batch_size=1, dead_units=False, filter_fn=lambda module, name: name != "3"
    )
    plan = make_plan(_lenet(0.036), None, config)
    assert plan.layers[1].format == "dense" and plan.layers[1].reason == "kept dense by filter_fn"
