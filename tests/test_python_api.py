"""The Python API as the README shows it: load -> export -> verify -> compile, on files and on
in-memory models still carrying torch.nn.utils.prune hooks or torch.ao.pruning
parametrizations (checked against the user's own model, which must come back untouched)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import ticketc
from ticketc.verify import run_onnx

ROOT = Path(__file__).resolve().parents[1]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def _with_hooks() -> nn.Module:
    model = _mlp()
    layers = [(model[0], "weight"), (model[2], "weight")]
    prune.global_unstructured(layers, prune.L1Unstructured, amount=0.9)
    return model


def _with_parametrizations() -> nn.Module:
    from torch.ao.pruning import WeightNormSparsifier

    model = _mlp()
    sparsifier = WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4))
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    return model


@pytest.mark.parametrize("make", [_with_hooks, _with_parametrizations])
def test_in_memory_pruned_models_export_and_compile_as_they_are(tmp_path, make):
    model = make()
    x = torch.randn(5, 20)
    with torch.no_grad():
        before = model(x).clone()
    weights = {n: t.detach().clone() for n, t in model.state_dict().items()}

    result = ticketc.export_model(model, torch.randn(2, 20), tmp_path / "m.onnx")
    pruned = [r for r in result.layers if r.density < 1]  # every float initializer is listed
    assert {r.name for r in pruned} == {"0.weight", "2.weight"}
    assert all(r.density < 0.5 and r.codec != "dense" for r in pruned)
    (got,) = run_onnx(tmp_path / "m.onnx", [x])
    np.testing.assert_allclose(got, before.numpy(), rtol=1e-5, atol=1e-6)
    assert ticketc.verify_onnx(tmp_path / "m.onnx", model, x, tolerance=1e-5).passed

    fast = ticketc.compile_model(model)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), before, rtol=1e-5, atol=1e-6)

    # the user's model is as it was: hooks / parametrizations on, same weights and outputs
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in weights.items())


def test_public_names_resolve():
    for name in ticketc.__all__:
        assert getattr(ticketc, name) is not None, name
    assert callable(ticketc.verify_onnx) and callable(ticketc.compile_model)
    # ticketc.compile is the package, a plain module: no class surgery makes it callable
    assert isinstance(ticketc.compile, types.ModuleType) and not callable(ticketc.compile)


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("python_api", ROOT / "examples/python_api.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "compiled the in-memory model: same outputs" in out
    assert {p.name for p in tmp_path.glob("*.onnx")} == {"lenet300.onnx", "mine.onnx"}
