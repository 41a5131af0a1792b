"""Checkpoints in compressed-tensors' sparse-bitmask / sparse-24-bitmask layout, written here.

The writer below follows the layout those compressors wrote (see ticketc.hf.compressed_tensors)
without the library, which no longer has them: `P.shape`, `P.compressed` (kept values,
row-major), `P.bitmask` (numpy.packbits(mask, axis=-1, bitorder="little")) and, for
sparse-bitmask, `P.row_offsets`; P the module path (releases from 0.8) or the full tensor name
(0.4 - 0.7, which compressed every tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.hf_models import example_inputs, outputs, pruned_model, save
from ticketc.cli import main
from ticketc.errors import UserError
from ticketc.hf import load_hf, open_checkpoint
from ticketc.pack import load_packed, pack, unpack

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402


def _compress(name: str, t: torch.Tensor, fmt: str, prefix: str) -> dict[str, torch.Tensor]:
    if fmt == "sparse-24-bitmask":  # the 2 largest of every 4, zeros included when fewer
        groups = t.reshape(-1, 4)
        mask = torch.zeros_like(groups, dtype=torch.bool)
        mask.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
        mask = mask.reshape(t.shape)
    else:
        mask = t != 0
    values = t[mask]
    out = {
        f"{prefix}.shape": torch.tensor(list(t.shape)),
        f"{prefix}.compressed": values,
        f"{prefix}.bitmask": torch.from_numpy(
            np.packbits(mask.numpy(), axis=-1, bitorder="little")
        ),
    }
    if fmt == "sparse-24-bitmask":
        out[f"{prefix}.shape"] = out[f"{prefix}.shape"].reshape(-1, 1)
        out[f"{prefix}.compressed"] = values.reshape(t.shape[0], t.shape[1] // 2)
    else:
        counts = mask.sum(dim=-1)
        out[f"{prefix}.row_offsets"] = torch.cumsum(counts, 0) - counts
    return out


def write_compressed_tensors(model, directory: Path, fmt: str, *, style: str = "module") -> Path:
    """save_pretrained, then rewrite the weights as compressed-tensors did.

    style "module" (0.8+): Linear weights under their module path, config under
    quantization_config; "all" (0.4 - 0.7): every tensor under its full name, config under
    compression_config.
    """
    save(model, directory)
    dense = load_file(str(directory / "model.safetensors"))
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in dense.items():
        if style == "all" and tensor.is_floating_point():
            stored.update(_compress(name, tensor, fmt, name))
        elif name in linear and name != "lm_head.weight":
            stored.update(_compress(name, tensor, fmt, name.removesuffix(".weight")))
        else:
            stored[name] = tensor
    (directory / "model.safetensors").unlink()
    save_file(stored, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    sparsity = {
        "format": fmt,
        "global_sparsity": 0.5,
        "sparsity_structure": "2:4" if fmt == "sparse-24-bitmask" else "unstructured",
        "targets": ["Linear"],
        "ignore": ["lm_head"],
    }
    if style == "all":
        config["compression_config"] = {"sparsity_config": sparsity, "version": "0.5.0"}
    else:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "dense",
            "version": "0.9.0",
            "sparsity_config": sparsity,
        }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


CASES = [
    pytest.param("sparse-bitmask", "module", 0.5, marks=pytest.mark.slow),
    ("sparse-bitmask", "all", 0.9),
    pytest.param("sparse-24-bitmask", "module", "2:4", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("fmt", "style", "level"), CASES)
def test_legacy_directory_reads_back_equal_to_its_dense_weights(tmp_path, fmt, style, level):
    model = pruned_model("llama", level, torch.float16)
    dense = model.state_dict()
    src = write_compressed_tensors(model, tmp_path / "legacy", fmt, style=style)
    assert any(k.endswith(".bitmask") for k in load_file(str(src / "model.safetensors")))

    state = open_checkpoint(src).state_dict()
    for name, tensor in state.items():
        assert torch.equal(tensor, dense[name]), name
    saved = load_file(str(save(model, tmp_path / "plain") / "model.safetensors"))
    assert state.keys() == saved.keys()

    inputs = example_inputs(model)
    reference = type(model).from_pretrained(tmp_path / "plain")
    assert torch.equal(outputs(load_hf(src).model, inputs), outputs(reference, inputs))

    # pack it like any model; unpack gives plain dense safetensors and a plain config
    pack(src, tmp_path / "packed")
    unpack(tmp_path / "packed", tmp_path / "dense")
    back = load_file(str(tmp_path / "dense" / "model.safetensors"))
    assert back.keys() == saved.keys()
    assert all(torch.equal(back[k], saved[k]) for k in saved)
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config and "compression_config" not in config
    assert torch.equal(
        outputs(load_packed(tmp_path / "packed"), inputs), outputs(reference, inputs)
    )


def test_unpack_decompresses_a_legacy_directory(tmp_path, capsys):
    model = pruned_model("gpt2", 0.5, torch.float32)  # Conv1D: compressed under "all"
    src = write_compressed_tensors(model, tmp_path / "legacy", "sparse-bitmask", style="all")
    assert main(["unpack", str(src), "-o", str(tmp_path / "dense")]) == 0
    saved = load_file(str(save(model, tmp_path / "plain") / "model.safetensors"))
    back = load_file(str(tmp_path / "dense" / "model.safetensors"))
    assert back.keys() == saved.keys() and all(torch.equal(back[k], saved[k]) for k in saved)


def test_corrupt_and_unsupported_legacy_directories_are_refused(tmp_path):
    model = pruned_model("llama", 0.5, torch.float32)
    src = write_compressed_tensors(model, tmp_path / "legacy", "sparse-bitmask")
    weights = load_file(str(src / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.compressed"
    weights[name] = weights[name][:-1]  # one value short of its bitmask
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(UserError, match="up_proj.weight.*corrupt"):
        open_checkpoint(src).state_dict()

    quantized = write_compressed_tensors(model, tmp_path / "q", "sparse-bitmask")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["config_groups"] = {"group_0": {"weights": {"num_bits": 4}}}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quantized"):
        open_checkpoint(quantized)
    config["quantization_config"].pop("config_groups")
    config["quantization_config"]["sparsity_config"]["format"] = "marlin-24"
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="marlin-24"):
        open_checkpoint(quantized)
