"""Compiled real architectures: the replaced layers keep the interface other code reads, models
with token ids, several inputs and dict / ModelOutput outputs compile and are checked, and the
check sends slow layers back to dense."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import ticketc.compile as tc
from ticketc.compile import CompileConfig, ExampleInputs, SparseConv, SparseLinear, plan_of
from ticketc.compile.check import MAX_ROUNDS, READS_WEIGHT, output_error
from ticketc.compile.measure import Timing
from ticketc.compile.planner import OVERRIDES_FORWARD

from .real_models import (
    AttentionClassifier,
    BasicBlock,
    BertLike,
    ConvNeXtBlock,
    InvertedResidual,
    calibrate_bn_,
    prune_global_,
    token_inputs,
)

FAST = {"check": False, "calibrate": False}
CHECK = {"check_budget_s": 0.02, "calibrate": False}  # the check, with few timed rounds


def _all_csr(model: nn.Module, example, tmp_path, **kw) -> nn.Module:
    """Compile with every layer planned csr (through a plan file), so that every kind of
    layer runs sparse whatever the cost model says."""
    base = CompileConfig(dead_units=False, **FAST)
    plan = plan_of(tc.compile_model(model, base, example_input=example)).to_json()
    for layer in plan["layers"]:
        layer["format"] = "csr"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    config = CompileConfig(dead_units=False, plan_path=str(path), **{**FAST, **kw})
    return tc.compile_model(model, config, example_input=example)


def _same(model: nn.Module, compiled: nn.Module, example, rtol: float = 1e-5) -> None:
    inputs = ExampleInputs.of(example)
    with torch.no_grad():
        _, rel = output_error(inputs(model), inputs(compiled))
    assert rel < rtol


# ------------------------------------------------------------------------------ interface


def test_sparse_linear_reads_like_a_linear():
    layer = nn.Linear(30, 20)
    prune_global_(layer, 0.8)
    sparse = SparseLinear.from_dense(layer.weight, layer.bias, "csr")
    assert (sparse.in_features, sparse.out_features) == (30, 20)
    assert torch.equal(sparse.weight, layer.weight.detach())  # built on access
    assert sparse.weight.dtype == layer.weight.dtype and sparse.weight.device.type == "cpu"
    assert sparse.weight_reads == 3  # counted: the check keeps dense what a model reads
    assert torch.equal(sparse.bias, layer.bias.detach())


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(4, 6, 3, stride=2, padding=1),
        nn.Conv1d(4, 6, 5, padding="same", dilation=2, groups=2),
        nn.Conv2d(4, 8, (3, 2), stride=(2, 1), padding=(1, 0), groups=4),
        nn.Conv2d(4, 8, 3, padding="valid", bias=False),
    ],
)
def test_sparse_conv_reads_like_its_conv(conv):
    prune_global_(conv, 0.5)
    sparse = SparseConv(conv, "csr")
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode", "output_padding", "transposed"):  # fmt: skip
        assert getattr(sparse, name) == getattr(conv, name), name
    assert len(sparse.stride) == (1 if isinstance(conv, nn.Conv1d) else 2)
    assert torch.equal(sparse.weight, conv.weight.detach())
    x = torch.randn(2, 4, 9) if isinstance(conv, nn.Conv1d) else torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)


class _StandardizedConv(nn.Conv2d):
    """A conv whose forward changes its weight (as timm's StdConv2d): not replaceable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_layers_whose_class_overrides_forward_stay_dense(tmp_path):
    model = nn.Sequential(_StandardizedConv(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    prune_global_(model, 0.8)
    x = torch.randn(2, 3, 8, 8)
    compiled = _all_csr(model, x, tmp_path)
    assert type(compiled[0]) is _StandardizedConv and isinstance(compiled[2], SparseConv)
    plan = plan_of(tc.compile_model(model, CompileConfig(**FAST), example_input=x))
    assert plan.layers[0].reason == OVERRIDES_FORWARD
    _same(model.eval(), compiled, x)


# ------------------------------------------------------------------------- architectures


def _cnn(block: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    model = calibrate_bn_(block, torch.randn(*shape))
    prune_global_(model, 0.9)
    return model, torch.randn(*shape)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: BasicBlock(8, 16, stride=2), (2, 8, 12, 12)),
        (lambda: BasicBlock(16, 16), (2, 16, 9, 9)),
        (lambda: InvertedResidual(8, 8, 4, kernel=5), (2, 8, 10, 10)),
        (lambda: InvertedResidual(8, 12, 3, stride=2), (2, 8, 11, 11)),
        (lambda: ConvNeXtBlock(16), (2, 16, 7, 7)),
    ],
)
def test_cnn_blocks_compile_to_the_masked_outputs(tmp_path, make, shape):
    model, x = _cnn(make(), shape)
    compiled = _all_csr(model, x, tmp_path)
    assert sum(isinstance(m, SparseConv | SparseLinear) for m in compiled.modules()) >= 2
    _same(model, compiled, x)
    for batch in (1, 3):  # other batch sizes than planned
        _same(model, compiled, torch.randn(batch, *shape[1:]))
    planned = tc.compile_model(model, CompileConfig(**CHECK), example_input=x)
    _same(model, planned, x)
    assert plan_of(planned).check["max_rel_error"] < 1e-5


def test_token_ids_and_dict_outputs(tmp_path):
    model = BertLike(vocab=50, dim=32, heads=2, ffn=64, layers=2, max_len=16).eval()
    prune_global_(model, 0.9)
    example = token_inputs(3, 12, vocab=50)
    compiled = _all_csr(model, example, tmp_path)
    assert sum(isinstance(m, SparseLinear) for m in compiled.modules()) == 13
    _same(model, compiled, example)
    planned = tc.compile_model(model, CompileConfig(**CHECK), example_input=example)
    assert plan_of(planned).check["batch_size"] == 3
    _same(model, planned, example)


def test_a_compiled_model_that_computes_something_else_is_refused(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    prune_global_(model, 0.9)
    real = SparseLinear.forward
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: real(self, x) * 1.01)
    with pytest.raises(RuntimeError, match="outputs differ from the masked model's"):
        _all_csr(model, torch.randn(3, 32), tmp_path, **CHECK, check=True)


def test_multihead_attention_reads_out_proj_weight(tmp_path):
    model = AttentionClassifier(dim=32, heads=4).eval()
    prune_global_(model, 0.9)
    x = torch.randn(2, 5, 16)
    compiled = _all_csr(model, x, tmp_path)  # out_proj sparse: MHA unpacks its weight
    assert isinstance(compiled.attn.out_proj, SparseLinear)
    _same(model, compiled, x)
    checked = _all_csr(model, x, tmp_path, **CHECK, check=True)
    assert type(checked.attn.out_proj) is not SparseLinear
    assert plan_of(checked).layer("attn.out_proj").reason == READS_WEIGHT
    _same(model, checked, x)


transformers = pytest.importorskip("transformers")


def _bert():
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def test_hf_bert_with_token_ids_and_model_output(tmp_path):
    model = _bert()
    prune_global_(model, 0.9)
    ids = torch.randint(0, 64, (2, 10))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    compiled = _all_csr(model, example, tmp_path)
    out = compiled(**example)
    assert out.last_hidden_state.shape == (2, 10, 32)  # a ModelOutput, as from BertModel
    _same(model, compiled, example)


def test_hf_vit_reads_the_patch_projection_dtype(tmp_path):
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_channels=3,
    )  # fmt: skip
    model = transformers.ViTModel(config).eval()
    prune_global_(model, 0.9)
    x = torch.randn(2, 3, 16, 16)
    compiled = _all_csr(model, x, tmp_path)
    assert isinstance(compiled.embeddings.patch_embeddings.projection, SparseConv)
    _same(model, compiled, x)
    checked = _all_csr(model, x, tmp_path, **CHECK, check=True)
    name = "embeddings.patch_embeddings.projection"
    assert plan_of(checked).layer(name).reason == READS_WEIGHT


def test_hf_whisper_encoder_conv1d_strides(tmp_path):
    config = transformers.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    model = transformers.WhisperModel(config).encoder.eval()
    prune_global_(model, 0.9)
    x = torch.randn(2, 8, 32)
    compiled = _all_csr(model, x, tmp_path)
    assert isinstance(compiled.conv2, SparseConv) and compiled.conv2.stride == (2,)
    _same(model, compiled, x)


# ----------------------------------------------------------------------------- the check


def _planner_says_csr(monkeypatch) -> None:
    """The planner plans every layer csr (as a cost model that is wrong would)."""
    lower = sys.modules["ticketc.compile.lower"]
    real = lower.make_plan

    def all_csr(*args, **kwargs):
        plan = real(*args, **kwargs)
        layers = tuple(dataclasses.replace(lp, format="csr") for lp in plan.layers)
        return dataclasses.replace(plan, layers=layers)

    monkeypatch.setattr(lower, "make_plan", all_csr)


def _slow_sparse(monkeypatch) -> None:
    real = SparseLinear.forward

    def slow(self, x):
        time.sleep(0.02)  # 1000x a dense layer here: no noise on a loaded machine hides it
        return real(self, x)

    monkeypatch.setattr(SparseLinear, "forward", slow)


def test_the_check_sends_slow_layers_back_to_dense(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    prune_global_(model, 0.95)
    x = torch.randn(4, 64)
    _planner_says_csr(monkeypatch)
    _slow_sparse(monkeypatch)
    config = CompileConfig(dead_units=False, check=True, **CHECK)
    compiled = tc.compile_model(model, config, example_input=x)  # planned all sparse ...
    checked = plan_of(compiled)
    assert not checked.sparse_layers  # ... measured: all back to dense
    assert not any(isinstance(m, SparseLinear) for m in compiled.modules())
    assert checked.check["fallback_rounds"] >= 1 and checked.check["history"]
    assert all(lp.reason.startswith("kept dense") for lp in checked.layers)
    _same(model.eval(), compiled, x)


@pytest.mark.parametrize(("gains", "kept"), [((1.05, 0.9), False), ((1.05, 1.04), True)])
def test_a_narrow_win_is_measured_again_and_the_lower_gain_counts(monkeypatch, gains, kept):
    """A compiled model measured only a little faster than dense is timed again: noise that
    made one run look faster cannot keep a model that is not."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    prune_global_(model, 0.95)
    x = torch.randn(4, 64)
    _planner_says_csr(monkeypatch)
    runs = iter(gains)

    def timed(variants, inputs, timing):  # dense takes `gain` x the compiled model's time
        gain = next(runs, 1.0)
        return {
            name: Timing(1.0, 1.0, 1.0, 5, (gain if name == "dense" else 1.0,) * 5)
            for name in variants
        }

    monkeypatch.setattr(tc.check, "_time", timed)
    config = CompileConfig(dead_units=False, check=True, **CHECK)
    checked = plan_of(tc.compile_model(model, config, example_input=x))
    assert {"remeasured_speedup": gains[1]} in checked.check["history"]
    assert bool(checked.sparse_layers) is kept
    if kept:
        assert checked.check["fallback_rounds"] == 0 and checked.check["speedup"] == gains[1]
    else:  # later runs measure 1.0x: fallback rounds until all dense
        assert 1 <= checked.check["fallback_rounds"] <= MAX_ROUNDS + 1


def test_the_check_measures_but_keeps_a_plan_the_user_wrote(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    prune_global_(model, 0.95)
    x = torch.randn(4, 64)
    _slow_sparse(monkeypatch)
    compiled = _all_csr(model, x, tmp_path, **CHECK, check=True)
    checked = plan_of(compiled)
    assert checked.sparse_layers == ["0", "2"]
    assert checked.check["user_plan"] and checked.check["speedup"] < 1
    _same(model.eval(), compiled, x)


def test_the_check_keeps_the_faster_of_the_tuned_and_untuned_plans(monkeypatch):
    """A tuned plan is kept only if the whole model measures faster with it."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    prune_global_(model, 0.95)
    x = torch.randn(4, 64)
    calls = []
    real = tc.check.check_speed

    def spy(dense, plans, inputs, config, lower):
        calls.append([p.cost_model for p in plans])
        return real(dense, plans, inputs, config, lower)

    monkeypatch.setattr(sys.modules["ticketc.compile.lower"], "check_speed", spy)
    config = CompileConfig(tune=True, tune_budget_s=0.01, tune_reps=3, **CHECK)
    compiled = tc.compile_model(model, config, example_input=x)
    model_name = f"cpu{torch.get_num_threads()}-reference"
    assert calls == [[f"{model_name}+tuned", model_name]]
    history = plan_of(compiled).check["history"]
    gains = history[0]["candidates_speedup"]
    assert len(gains) == 2
    _same(model.eval(), compiled, x)


def test_compiled_pt2_loads_after_import_ticketc_alone(tmp_path):
    model = BertLike(vocab=50, dim=32, heads=2, ffn=64, layers=1, max_len=16).eval()
    prune_global_(model, 0.9)
    example = token_inputs(2, 8, vocab=50)
    compiled = _all_csr(model, example, tmp_path)
    path, _ = tc.save_compiled(tc.export_program(compiled, example), plan_of(compiled),
                               tmp_path / "m.pt2")  # fmt: skip
    torch.save(token_inputs(3, 8, vocab=50, seed=1), tmp_path / "x.pt")
    code = (
        "import ticketc, torch, sys; d = torch.load(sys.argv[2]); "
        "out = torch.export.load(sys.argv[1]).module()(**d); "
        "print(tuple(out['last_hidden_state'].shape))"
    )
    run = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "(3, 8, 32)"
    assert "failed to resolve" not in run.stderr
