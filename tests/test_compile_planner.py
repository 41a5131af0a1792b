"""The planner: never a format predicted slower than dense; overrides, tuning, filter_fn."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ticketc.compile as tc
from ticketc.compile import CompileConfig, ExampleInputs, SparseLinear, make_plan, plan_of
from ticketc.compile.calibrate import REFERENCE, calibration
from ticketc.compile.costs import device_costs, gemm_stats, parse_format
from ticketc.compile.planner import conv_shape, layer_gemm, trace_shapes
from ticketc.errors import UserError

FAST = {"check": False, "calibrate": False}  # plans from the reference rates, deterministic


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
    config = CompileConfig(device=device, dtype=dtype, batch_size=batch, dead_units=False, **FAST)
    plan = make_plan(_layer(m, k, density), None, config)
    (lp,) = plan.layers
    assert lp.format in lp.predicted_us
    assert lp.predicted_us[lp.format] * config.min_speedup <= lp.predicted_us["dense"] or (
        lp.format == "dense"
    )
    assert lp.gemm == (batch, k, m)


def test_picks_sparse_where_it_clearly_wins_and_dense_where_not():
    config = CompileConfig(batch_size=64, dead_units=False, **FAST)
    sparse = make_plan(_layer(1024, 1024, 0.01), None, config).layers[0]
    dense = make_plan(_layer(64, 64, 1.0), None, config).layers[0]
    assert sparse.format != "dense" and "predicted" in sparse.reason
    assert dense.format == "dense"


def test_costs_grow_with_work():
    costs = device_costs("cpu", torch.float32)
    few = gemm_stats(torch.rand(256, 256) < 0.01, 64, 4)
    many = gemm_stats(torch.rand(256, 256) < 0.5, 64, 4)
    assert costs.predict("csr", few) < costs.predict("csr", many)
    assert costs.predict("dense", few) == costs.predict("dense", many)
    small_batch = gemm_stats(torch.ones(64, 64, dtype=torch.bool), 1, 4)
    large_batch = gemm_stats(torch.ones(64, 64, dtype=torch.bool), 256, 4)
    assert costs.predict("dense", small_batch) < costs.predict("dense", large_batch)


def test_cpu_candidates_are_dense_and_csr_only():
    costs = device_costs("cpu", torch.float32)
    g = gemm_stats(torch.rand(64, 64) < 0.1, 8, 4)
    assert costs.candidates(g, ("csr", "bsr", "tiled")) == ["dense", "csr"]
    assert costs.candidates(g, ("bsr",)) == ["dense"]
    with pytest.raises(ValueError, match="dense and csr"):
        costs.predict("bsr(16)", g)


def test_calibration_measures_this_machine_once_per_thread_count():
    measured = calibration(measure=True)
    assert measured.source == "measured" and measured.threads == torch.get_num_threads()
    assert calibration(measure=True) is measured  # cached: measured once per process
    for name in ("dense_gemm_s", "dense_conv_s", "csr_fma_s", "conv_fma_s", "csr_dot_s"):
        assert 0 < getattr(measured, name) < 1e-6, name  # a rate, not a stray timing
    assert calibration(measure=False).source == "reference"


def test_conv_costs_follow_the_kernel_geometry():
    costs = device_costs("cpu", torch.float32)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    shape = conv_shape(conv, (1, 16, 20, 20))
    assert (shape.oh, shape.ow, shape.hq, shape.wq, shape.phases) == (10, 10, 11, 11, 4)
    assert not shape.direct and conv_shape(nn.Conv2d(16, 32, 1), (1, 16, 20, 20)).direct
    sparse = layer_gemm(conv, ((1, 16, 20, 20), (1, 32, 10, 10)), 8, 4)
    assert sparse.conv == shape and sparse.n == 8
    one_d = conv_shape(nn.Conv1d(4, 8, 5, stride=2, padding=2), (1, 4, 33))
    assert (one_d.h, one_d.oh, one_d.ow) == (1, 1, 17)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < 0.02)
    thin = layer_gemm(conv, ((1, 16, 20, 20), (1, 32, 10, 10)), 8, 4)
    assert costs.predict("csr", thin) < costs.predict("csr", sparse)


def test_plans_from_the_reference_rates_are_reproducible():
    model = _lenet(0.036)
    config = CompileConfig(batch_size=16, dead_units=False, **FAST)
    assert make_plan(model, None, config) == make_plan(model, None, config)
    assert make_plan(model, None, config).cost_model.endswith("-reference")
    assert REFERENCE.source == "reference"


def test_trace_shapes_takes_token_ids_and_keyword_inputs():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj = nn.Embedding(50, 8), nn.Linear(8, 4)

        def forward(self, input_ids, scale=1.0):
            return self.proj(self.emb(input_ids)) * scale

    model = Embed()
    inputs = ExampleInputs.of({"input_ids": torch.randint(0, 50, (3, 7)), "scale": 2.0})
    assert trace_shapes(model, inputs) == {"proj": ((1, 7, 8), (1, 7, 4))}
    plan = make_plan(model, inputs, CompileConfig(batch_size=3, **FAST))
    assert plan.layers[0].gemm == (21, 8, 4)  # rows: batch x tokens


def test_parse_format_names_the_known_ones():
    assert parse_format("bsr(32)") == ("bsr", 32)
    with pytest.raises(ValueError, match="known: dense, csr"):
        parse_format("coo")


def test_plan_override_is_honoured(tmp_path):
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    config = CompileConfig(dead_units=False, **FAST)
    plan = plan_of(tc.compile_model(model, config)).to_json()
    plan["layers"][0]["format"] = "bsr(16)"
    plan["layers"][1]["format"] = "dense"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    compiled = tc.compile_model(model, CompileConfig(dead_units=False, plan_path=str(path), **FAST))
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
    plan = plan_of(tc.compile_model(model, CompileConfig(**FAST))).to_json()
    edit(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(UserError, match=message):
        tc.compile_model(model, CompileConfig(plan_path=str(path), **FAST))


def test_tune_measures_every_candidate_and_keeps_the_fastest():
    config = CompileConfig(
        batch_size=16, tune=True, tune_reps=3, tune_budget_s=0.01, dead_units=False,
        min_speedup=1.0, **FAST,
    )  # fmt: skip
    (lp,) = make_plan(_layer(128, 96, 0.05), None, config).layers
    assert lp.measured_us is not None and set(lp.measured_us) == set(lp.predicted_us)
    assert lp.format == min(lp.measured_us, key=lp.measured_us.__getitem__)
    assert "measured" in lp.reason


def test_filter_fn_keeps_layers_dense():
    model = _layer(1024, 1024, 0.01)
    config = CompileConfig(batch_size=64, filter_fn=lambda m, fqn: fqn != "0", **FAST)
    compiled = tc.compile_model(model, config)
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
        ({"min_model_speedup": 0.5}, "0.5"),
        ({"check_budget_s": -1.0}, "check_budget_s"),
    ],
)
def test_config_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompileConfig(**kwargs)


def _lenet(density: float) -> nn.Sequential:
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model[1], model[3], model[5]:
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) < density)
    return model


def test_linear_runs_follow_the_sequential():
    model = nn.Sequential(
        nn.Linear(8, 6),
        nn.ReLU(),
        nn.Linear(6, 5),
        nn.ReLU(),
        nn.ReLU(),
        nn.Linear(5, 4),
        nn.Linear(4, 3),
        nn.Tanh(),
        nn.Linear(3, 2),
        nn.Linear(9, 2),
        nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
    )
    assert tc.planner.linear_runs(model) == [["0", "2"], ["5", "6"], ["10.0", "10.1"]]


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_a_sparse_chain_is_planned_csr_at_any_batch(batch):
    plan = make_plan(_lenet(0.036), None, CompileConfig(batch_size=batch, dead_units=False, **FAST))
    assert [lp.format for lp in plan.layers] == ["csr", "csr", "csr"]
    (chain,) = plan.chains
    assert chain.layers == ("1", "3", "5")


@pytest.mark.parametrize("density", [0.5, 1.0])
def test_chain_is_not_planned_where_dense_is_predicted_faster(density):
    plan = make_plan(_lenet(density), None, CompileConfig(batch_size=1, dead_units=False, **FAST))
    assert [lp.format for lp in plan.layers] == ["dense", "dense", "dense"]
    assert plan.chains == ()


def test_one_source_for_every_printed_prediction():
    """The plan's total prediction counts each chain once, at the time its reasons print."""
    plan = make_plan(_lenet(0.036), None, CompileConfig(batch_size=1, dead_units=False, **FAST))
    (chain,) = plan.chains
    assert plan.predicted_us == pytest.approx(chain.predicted_us)
    for lp in plan.layers:
        if "chain" in lp.reason:
            assert f"{chain.predicted_us:.1f} us" in lp.reason
    assert plan.predicted_us < sum(lp.predicted_us["csr"] for lp in plan.layers)
    assert plan.to_json()["predicted_us"] == round(plan.predicted_us, 3)


def test_chain_prediction_needs_two_layers_and_a_cpu():
    costs = device_costs("cpu", torch.float32)
    small = gemm_stats(torch.rand(300, 784) < 0.036, 1, 4)
    assert costs.predict_chain([small, small]) < 2 * costs.predict("csr", small)
    assert costs.predict_chain([small]) is None  # one layer is no chain
    assert device_costs("cuda", torch.float16).predict_chain([small, small]) is None


def test_chain_leaves_filtered_layers_dense():
    config = CompileConfig(
        batch_size=1, dead_units=False, filter_fn=lambda module, name: name != "3", **FAST
    )
    plan = make_plan(_lenet(0.036), None, config)
    assert plan.layers[1].format == "dense" and plan.layers[1].reason == "kept dense by filter_fn"
