"""Hugging Face directories as MODEL: Auto classes, default inputs, and no code run unasked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.hf_models import outputs, pruned_model, save, tiny_whisper
from ticketc.cli import main
from ticketc.errors import UserError
from ticketc.hf import BATCH, SEQUENCE, default_input_specs, example_inputs, load_hf
from ticketc.load import load_model
from ticketc.pack import load_packed, pack

pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

CONFIG = """
from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "tiny-custom"

    def __init__(self, width=8, **kwargs):
        self.width = width
        super().__init__(**kwargs)
"""
MODELING = """
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyConfig

Path(__file__).with_name("RAN").write_text("code from the directory ran")  # the tell-tale


class TinyModel(PreTrainedModel):
    config_class = TinyConfig
    main_input_name = "input_values"

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, input_values):
        return self.proj(input_values)
"""


def remote_code_directory(path: Path) -> Path:
    """A checkpoint whose config.json names its own modeling code (auto_map)."""
    path.mkdir()
    (path / "configuration_tiny.py").write_text(CONFIG)
    (path / "modeling_tiny.py").write_text(MODELING)
    config = {
        "model_type": "tiny-custom",
        "architectures": ["TinyModel"],
        "auto_map": {
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModel": "modeling_tiny.TinyModel",
        },
        "width": 8,
    }
    (path / "config.json").write_text(json.dumps(config))
    weight = torch.randn(8, 8) * (torch.rand(8, 8) < 0.2)
    state = {"proj.weight": weight, "proj.bias": torch.zeros(8)}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_remote_code_is_refused_without_the_flag(tmp_path, capsys):
    src = remote_code_directory(tmp_path / "custom")
    for argv in (
        ["pack", str(src), "-o", str(tmp_path / "out")],
        ["unpack", str(src), "-o", str(tmp_path / "out")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--trust-remote-code" in err and "auto_map" in err
    for call in (lambda: load_hf(src), lambda: load_model(src)):
        with pytest.raises(UserError, match="--trust-remote-code"):
            call()
    assert not (tmp_path / "out").exists()
    assert not (src / "RAN").exists()

    # a model type transformers does not know can only come from the directory's code
    config = json.loads((src / "config.json").read_text())
    del config["auto_map"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="tiny-custom.*--trust-remote-code"):
        load_hf(src)
    assert not (src / "RAN").exists()


def test_a_packed_remote_code_model_is_refused_without_the_flag(tmp_path):
    model = pruned_model("llama", 0.9)
    src = save(model, tmp_path / "src")
    pack(src, tmp_path / "packed")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tmp_path / "packed" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_packed(tmp_path / "packed")
    assert isinstance(load_packed(tmp_path / "packed", state_dict=True), dict)  # tensors only


@pytest.mark.slow
def test_remote_code_runs_with_the_flag(tmp_path):
    """In a subprocess: transformers copies the directory's modules into HF_MODULES_CACHE."""
    src = remote_code_directory(tmp_path / "custom")
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file
        from ticketc.cli import main
        from ticketc.pack import load_packed
        assert main(["pack", {str(src)!r}, "-o", {str(tmp_path / "packed")!r},
                     "--trust-remote-code"]) == 0
        model = load_packed({str(tmp_path / "packed")!r}, trust_remote_code=True)
        x = torch.randn(2, 8)
        w = load_file({str(src / "model.safetensors")!r})
        assert torch.equal(model(x), x @ w["proj.weight"].T + w["proj.bias"])
        print("ok", type(model).__name__)
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "m")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok TinyModel" in done.stdout
    assert (src / "RAN").exists() or any((tmp_path / "m").rglob("RAN"))


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "vit", "whisper"])
def test_default_inputs_run_the_model(arch):
    model = tiny_whisper() if arch == "whisper" else pruned_model(arch, 0.5)
    specs = default_input_specs(model)
    inputs = example_inputs(specs)
    with torch.no_grad():
        model.eval()(**inputs)
    main_input = specs[0]
    if arch == "vit":
        assert main_input.name == "pixel_values" and main_input.shape == (2, 3, 32, 32)
        assert main_input.dynamic_axes == {0: BATCH}
    elif arch == "whisper":
        assert main_input.name == "input_features" and main_input.shape == (2, 16, 64)
        assert [s.name for s in specs] == ["input_features", "decoder_input_ids"]
    else:
        assert [s.name for s in specs] == ["input_ids", "attention_mask"]
        assert main_input.dynamic_axes == {0: BATCH, 1: SEQUENCE}
        assert main_input.dtype == "int64" and int(inputs["input_ids"].max()) < 512
        assert bool((inputs["attention_mask"] == 1).all())
    assert all(json.dumps(s.to_json()) for s in specs)  # plain data


def test_inputs_drawn_again_cover_the_vocabulary(tmp_path):
    """The check at another batch and length draws token ids again: for a transformers model
    they span its vocabulary. They were drawn below its smallest Embedding: 0 or 1 for BERT
    (its token-type table), so the check saw two tokens."""
    import argparse

    from ticketc.commands._common import inputs_from_args
    from ticketc.inputs import random_like

    model = pruned_model("bert", 0.5)
    src = save(model, tmp_path / "src")
    args = argparse.Namespace(model=str(src), input=None, input_shape=None, sample=None)
    example, _ = inputs_from_args(args, load_model(src))
    drawn = random_like(example, model, seed=3)
    ids = drawn.kwargs["input_ids"]
    assert int(ids.max()) >= 64 and int(ids.max()) < model.config.vocab_size, ids
    assert bool((drawn.kwargs["attention_mask"] == 1).all())


def test_load_model_reads_directories_and_safetensors_files(tmp_path):
    model = pruned_model("llama", 0.9)
    src = save(model, tmp_path / "src")
    loaded = load_model(src)
    assert loaded.source == "hf" and loaded.example_input is not None
    assert loaded.example_input.dtype == torch.int64
    assert "model.layers.0.mlp.up_proj.weight" in loaded.masks  # masks from exact zeros
    inputs = {"input_ids": loaded.example_input}
    assert torch.equal(outputs(loaded.model, inputs), outputs(model, inputs))

    from tests.models_for_tests import prune_random_, tiny_mlp

    mlp = tiny_mlp()
    prune_random_(mlp, 0.2)
    save_file(mlp.state_dict(), str(tmp_path / "mlp.safetensors"))
    loaded = load_model(tmp_path / "mlp.safetensors", arch="tests.models_for_tests:tiny_mlp")
    x = torch.randn(3, 20)
    assert torch.equal(loaded.model(x), mlp.eval()(x))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="bad.safetensors"):
        load_model(tmp_path / "bad.safetensors", arch="tests.models_for_tests:tiny_mlp")


def test_directories_that_are_not_checkpoints_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_hf(tmp_path / "empty")
    model = pruned_model("gpt2", 0.5)
    src = save(model, tmp_path / "gpt2")
    (src / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="model.safetensors"):
        load_hf(src)


def test_inspect_reads_a_directory_without_building_its_model(tmp_path, capsys):
    model = pruned_model("gpt2", 0.9)
    src = save(model, tmp_path / "src", max_shard_size="100KB")
    remote = json.loads((src / "config.json").read_text())
    remote["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}  # never imported
    (src / "config.json").write_text(json.dumps(remote))
    assert main(["inspect", str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "hf"
    stats = {layer["name"]: layer for layer in report["layers"]}
    expected = {n: p for n, p in model.state_dict().items() if p.dim() >= 2 and "lm_head" not in n}
    assert set(stats) == set(expected)
    for name, weight in expected.items():
        assert stats[name]["nnz"] == int(weight.count_nonzero()), name
