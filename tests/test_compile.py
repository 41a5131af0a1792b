"""ticketc.compile: compiled models compute what the dense masked model computes, hold only
sparse data, and survive torch.export save/load and torch.compile."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from torch import Tensor, nn

import ticketc.compile as tc
from ticketc import ops
from ticketc.compile import (
    CompileConfig,
    Plan,
    SparseConv,
    SparseLinear,
    export_program,
    load_program,
    plan_of,
    plan_rows,
    save_compiled,
)
from ticketc.models import lenet300

SPARSE_FORMATS = ["csr", "bsr(16)", "tiled"]
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10), torch.bfloat16: (3e-2, 3e-2)}
# Where speed is not the subject: no timing runs, the reference cost model (deterministic plans)
FAST = {"check": False, "calibrate": False}


@torch.no_grad()
def _prune(model: nn.Module, density: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
            m.weight.mul_(torch.rand(m.weight.shape, generator=g) < density)
    return model.eval()


def conv_net() -> nn.Sequential:
    # groups, stride, padding, dilation, padding modes, a bias-free conv, then a classifier
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 12, (3, 2), padding="same", groups=4),  # even kernel: asymmetric pad
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12 * 2 * 2, 5),
    )


def conv1d_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(3, 6, 5, padding=2, dilation=1),
        nn.ReLU(),
        nn.Conv1d(6, 6, 3, stride=2, dilation=2, groups=3, padding="valid"),
        nn.ReLU(),
        nn.Conv1d(6, 2, 1, bias=False),
    )


def _forced(model: nn.Module, fmt: str, tmp_path, example: torch.Tensor, **kw) -> nn.Module:
    """Compile with every layer forced to `fmt` through a plan file (the override path)."""
    config = CompileConfig(dead_units=False, **FAST, **kw)
    plan = plan_of(tc.compile_model(model, config, example_input=example)).to_json()
    for layer in plan["layers"]:
        layer["format"] = fmt
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    config = CompileConfig(dead_units=False, plan_path=str(path), **FAST, **kw)
    return tc.compile_model(model, config, example_input=example)


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    scale = ref.abs().max().item() or 1.0
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_lenet300_every_format_matches_dense(tmp_path, fmt, dtype):
    model = _prune(lenet300(), 0.1)
    x = torch.randn(16, 1, 28, 28)
    compiled = _forced(model, fmt, tmp_path, x, dtype=str(dtype).removeprefix("torch."))
    sparse = [m for m in compiled.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 3 and all(m.format == fmt for m in sparse)
    with torch.no_grad():
        _close(compiled(x.to(dtype)), model.to(dtype)(x.to(dtype)), dtype)


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
@pytest.mark.parametrize(("make", "shape"), [(conv_net, (3, 4, 10, 9)), (conv1d_net, (3, 3, 17))])
def test_conv_nets_match_dense(tmp_path, make, shape, fmt):
    model = _prune(make(), 0.3)
    x = torch.randn(shape)
    compiled = _forced(model, fmt, tmp_path, x)
    assert sum(isinstance(m, SparseConv) for m in compiled.modules()) >= 3
    with torch.no_grad():
        _close(compiled(x), model(x), torch.float32)


@pytest.mark.parametrize("batch", [1, 64])
def test_planned_compile_matches_dense_and_leaves_input_alone(batch):
    model = _prune(lenet300(), 0.036)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(batch, 1, 28, 28)
    config = CompileConfig(check_budget_s=0.05, calibrate=False)
    compiled = tc.compile_model(model, config, example_input=x)  # batch size from the example
    with torch.no_grad():
        _close(compiled(x), model(x), torch.float32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plan = plan_of(compiled)
    assert plan is not None and plan.batch_size == batch and len(plan.layers) == 3
    assert plan.check is not None and plan.check["batch_size"] == batch
    assert plan.check["max_rel_error"] < 1e-5 and plan.check["threads"] >= 1


def test_masks_are_applied_even_when_weights_are_not_zero():
    model = lenet300().eval()
    masks = {n: torch.rand(p.shape) < 0.1 for n, p in model.named_parameters() if p.dim() == 2}
    x = torch.randn(4, 1, 28, 28)
    compiled = tc.compile_model(model, CompileConfig(**FAST), masks=masks, example_input=x)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
        _close(compiled(x), model(x), torch.float32)


def test_sparse_modules_hold_no_dense_size_buffer(tmp_path):
    model = _prune(conv_net(), 0.1)
    x = torch.randn(2, 4, 10, 9)
    for fmt in ("csr", "tiled"):
        compiled = _forced(model, fmt, tmp_path, x)
        dense_sizes = {n: p.numel() for n, p in model.named_parameters() if "weight" in n}
        for name, module in compiled.named_modules():
            if f"{name}.weight" in dense_sizes:
                assert isinstance(module, SparseLinear | SparseConv)
                limit = dense_sizes[f"{name}.weight"]
                sizes = [b.numel() for b in module.buffers()]
                assert max(sizes) < limit, (fmt, name, sizes, limit)
                assert not any(p.numel() for p in module.parameters())


def test_pt2_round_trip_with_dynamic_batch(tmp_path):
    model = _prune(lenet300(), 0.05)
    x = torch.randn(8, 1, 28, 28)
    compiled = _forced(model, "csr", tmp_path, x)
    assert any(isinstance(m, SparseLinear) for m in compiled.modules())
    program = export_program(compiled, x)
    # the graph calls ticketc's ops (not the eager CPU fast path): the whole MLP is one
    # csr_chain node, and holds no sparse tensor
    assert str(program.graph).count("ticketc.csr_chain") == 1
    assert all(t.layout == torch.strided for t in program.state_dict.values())
    out, plan_path = save_compiled(program, plan_of(compiled), tmp_path / "m.pt2")
    assert plan_path == tmp_path / "m.plan.json"
    loaded = load_program(out).module()
    for batch in (3, 8):
        xb = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            _close(loaded(xb), model(xb), torch.float32)
    rows = plan_rows(out)
    assert [r["format"] for r in rows] == [lp.format for lp in plan_of(compiled).layers]
    assert json.loads(plan_path.read_text())["layers"] == rows
    assert plan_rows(plan_path) is None  # a JSON file is not a compiled artifact


def test_under_torch_compile(tmp_path):
    model = _prune(nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 6)), 0.2)
    x = torch.randn(5, 40)
    compiled = _forced(model, "csr", tmp_path, x)
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        _close(fn(x), model(x), torch.float32)


def test_compile_model_is_public_beside_the_package():
    import ticketc
    import ticketc.compile  # the package, bound to ticketc.compile, does not hide the function

    model = _prune(nn.Sequential(nn.Linear(8, 4)), 0.5)
    assert isinstance(ticketc.compile_model(model, CompileConfig(**FAST)), nn.Module)


def test_rejects_what_it_cannot_compile():
    with pytest.raises(TypeError, match="LoadedModel"):
        tc.compile_model("model.pt")
    with pytest.raises(ValueError, match="no parameter"):
        tc.compile_model(lenet300(), masks={"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="example input"):
        tc.compile_model(conv_net(), CompileConfig(**FAST))
    with pytest.raises(TypeError, match="a tensor, a tuple of positional arguments or a dict"):
        tc.compile_model(lenet300(), CompileConfig(**FAST), example_input="x")


def test_eager_cpu_fast_path_matches_the_op():
    layer = _prune(nn.Sequential(nn.Linear(30, 20)), 0.2)[0]
    sparse = SparseLinear.from_dense(layer.weight, layer.bias, "csr")
    x = torch.randn(7, 30)
    via_op = torch.ops.ticketc.csr_linear(
        x, sparse.crow_indices, sparse.col_indices, sparse.values, sparse.row_order, sparse.bias
    )
    torch.testing.assert_close(sparse(x), via_op)
    sparse.values.mul_(2)  # in-place updates are seen (the prepared kernel is rebuilt)
    torch.testing.assert_close(sparse(x), 2 * via_op - sparse.bias)


@pytest.mark.parametrize(("make", "shape"), [(conv_net, (3, 4, 10, 9)), (conv1d_net, (3, 3, 17))])
def test_sparse_conv_pt2_round_trip(tmp_path, make, shape):
    model = _prune(make(), 0.3)
    x = torch.randn(shape)
    compiled = _forced(model, "csr", tmp_path, x)
    out, _ = save_compiled(export_program(compiled, x), plan_of(compiled), tmp_path / "c.pt2")
    loaded = load_program(out).module()
    for batch in (1, 5):
        xb = torch.randn(batch, *shape[1:])
        with torch.no_grad():
            _close(loaded(xb), model(xb), torch.float32)


@pytest.mark.parametrize("batch", [1, 5, 40, 64])
def test_relu_after_a_sparse_linear_is_fused_and_names_are_kept(tmp_path, batch):
    model = _prune(
        nn.Sequential(
            nn.Linear(40, 24),
            nn.ReLU(),
            nn.Linear(24, 16),
            nn.ReLU(inplace=True),
            nn.Linear(16, 6),
            nn.ReLU(),
            nn.Flatten(),
        ),
        0.3,
    )
    x = torch.randn(batch, 40)
    compiled = _forced(model, "csr", tmp_path, x)
    assert list(compiled._modules) == ["0", "2", "4", "6"]  # the ReLUs "1", "3", "5" left
    assert [compiled.get_submodule(n).relu for n in ("0", "2", "4")] == [True, True, True]
    assert set(compiled.state_dict()) >= {"0.values", "2.values", "4.values", "4.bias"}
    with torch.no_grad():
        _close(compiled(x), model(x), torch.float32)
        # the exported graph (custom ops, no eager fast path) applies the fused ReLUs too
        program = export_program(compiled, torch.randn(8, 40))
        (chain,) = [n for n in program.graph.nodes if "csr_chain" in str(n.target)]
        assert chain.args[5] == [True, True, True]
        _close(program.module()(x), model(x), torch.float32)


def test_relu_is_not_fused_into_dense_layers_or_across_other_modules(tmp_path):
    model = _prune(nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.ReLU(), nn.Linear(20, 4)), 0.3)
    x = torch.randn(64, 30)
    compiled = _forced(model, "csr", tmp_path, x)
    assert list(compiled._modules) == ["0", "1", "2", "3"] and not compiled[0].relu
    dense = tc.compile_model(model, CompileConfig(formats=(), **FAST), example_input=x)
    assert isinstance(dense.get_submodule("2"), nn.ReLU)
    with torch.no_grad():
        _close(compiled(x), model(x), torch.float32)


@pytest.mark.parametrize("batch", [1, 40])  # the rows and the columns kernel
def test_cpu_fast_path_follows_buffer_updates(batch):
    layer = _prune(nn.Sequential(nn.Linear(30, 20)), 0.2)[0]
    sparse = SparseLinear.from_dense(layer.weight, layer.bias, "csr")
    x = torch.randn(batch, 30)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), layer(x))
        sparse.values.mul_(2)  # in place: the prepared kernel is rebuilt
        torch.testing.assert_close(sparse(x), 2 * layer(x) - layer.bias)
        sparse.bias = torch.zeros(20)  # a replaced buffer: the cache is rebuilt
        torch.testing.assert_close(sparse(x), 2 * (layer(x) - layer.bias))


@pytest.mark.parametrize("batch", [1, 40])
def test_sparse_linear_refuses_the_wrong_input_width(batch):
    layer = _prune(nn.Sequential(nn.Linear(30, 20)), 0.5)[0]
    sparse = SparseLinear.from_dense(layer.weight, layer.bias, "csr")
    with pytest.raises(ValueError, match=r"x is \(\d+, 10\) torch.float32, expected \[N, 30\]"):
        sparse(torch.randn(batch, 10))


def _sparse_mlp() -> nn.Sequential:
    return _prune(
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(40, 24),
            nn.ReLU(),
            nn.Linear(24, 16),
            nn.ReLU(),
            nn.Linear(16, 6),
            nn.Tanh(),
            nn.Linear(6, 5),
            nn.Linear(5, 3),
        ),
        0.3,
    )


@pytest.mark.parametrize("batch", [1, 5, 16, 40, 64])
def test_runs_of_csr_layers_run_as_one_chain(tmp_path, monkeypatch, batch):
    model = _sparse_mlp()
    x = torch.randn(batch, 40)
    compiled = _forced(model, "csr", tmp_path, x)
    assert type(compiled) is tc.CsrSequential  # same children, names and state dict
    assert list(compiled._modules) == ["0", "1", "3", "5", "6", "7", "8"]
    built, build = [], ops.cpu_chain
    monkeypatch.setattr(
        tc.modules.ops, "cpu_chain",
        lambda layers, relus: built.append(len(layers)) or build(layers, relus),
    )  # fmt: skip
    with torch.no_grad():
        _close(compiled(x), model(x), torch.float32)
        _close(compiled(x), model(x), torch.float32)  # the prepared chains
        assert sorted(built) == [2, 3]  # "1"-"3"-"5", then "7"-"8" past the Tanh; built once
        program = export_program(compiled, torch.randn(8, 40))
        assert str(program.graph).count("ticketc.csr_chain") == 2  # one node per chain
        _close(program.module()(x), model(x), torch.float32)
        compiled(x)
        built.clear()
        compiled.get_submodule("3").values.mul_(0)  # in place: that chain is rebuilt
        model[3].weight.mul_(0)
        _close(compiled(x), model(x), torch.float32)
        assert built == [3]


def test_batch_one_chain_reads_any_layout_and_sees_replaced_buffers(tmp_path):
    """The batch-1 path reads the input by address and checks its kernel by identity and
    version sums: strided, image-shaped and other-thread calls, a replaced buffer and an
    in-place update must all give the masked model's outputs."""
    model = _prune(
        nn.Sequential(nn.Flatten(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 16),
                      nn.ReLU(), nn.Linear(16, 6)),
        0.3,
    )  # fmt: skip
    compiled = _forced(model, "csr", tmp_path, torch.randn(1, 40))
    assert type(compiled) is tc.CsrSequential
    wide = torch.randn(1, 80)
    with torch.no_grad():
        for x in (
            torch.randn(1, 40),
            wide[:, ::2],
            torch.randn(1, 4, 10),
            wide.view(1, 2, 40)[:, 0],
        ):
            _close(compiled(x), model(x), torch.float32)
        x = torch.randn(1, 40)
        first = compiled(x)
        assert compiled(x).data_ptr() != first.data_ptr()  # a new output each call
        result: list[Tensor] = []
        worker = threading.Thread(target=lambda: result.append(compiled(x)))
        worker.start()
        worker.join()
        assert torch.equal(result[0], first)
        layer = compiled.get_submodule("3")
        layer.values = layer.values * 2  # a new tensor in the slot
        model[3].weight.mul_(2)
        _close(compiled(x), model(x), torch.float32)
        layer.bias.add_(1)  # in place
        model[3].bias.add_(1)
        _close(compiled(x), model(x), torch.float32)


def test_the_plan_is_returned_not_written_onto_the_module():
    model = _sparse_mlp()
    x = torch.randn(4, 40)
    config = CompileConfig(dead_units=False, **FAST)
    compiled, plan = tc.compile_with_plan(model, config, example_input=x)
    assert not any(isinstance(v, Plan) for m in compiled.modules() for v in vars(m).values())
    assert plan.layers and plan_of(compiled) is None  # compile_with_plan keeps no table entry
    again = tc.compile_model(model, config, example_input=x)
    assert plan_of(again) == plan and plan_of(copy.deepcopy(again)) is None


def test_chain_falls_back_to_the_op_off_its_fast_path(tmp_path):
    model = _sparse_mlp()
    x = torch.randn(40, 40)
    compiled = _forced(model, "csr", tmp_path, x)
    with torch.no_grad():
        _close(compiled(x.double()), model.double()(x.double()), torch.float32)


def test_an_all_dense_plan_runs_the_dense_models_modules():
    model = _prune(nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 10), nn.Linear(10, 4)), 0.3)
    x = torch.randn(64, 30)
    dense = tc.compile_model(model, CompileConfig(formats=(), **FAST), example_input=x)
    assert type(dense) is nn.Sequential and [type(m) for m in dense] == [nn.Linear] * 3
