"""The planner: never a format predicted slower than dense; overrides, tuning, filter_fn."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ticketc.compile as tc
from ticketc.compile import CompileConfig, SparseLinear, make_plan, plan_of
from ticketc.compile.costs import device_costs, gemm_stats, parse_format, predict
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
    assert isinstance(compiled[0], SparseLinear) and compiled[0].format == "bsr(16)"
    assert isinstance(compiled[2], nn.Linear)
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
