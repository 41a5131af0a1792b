"""pack -> unpack -> load_packed on real transformers architectures, pruned as users prune them.

Checked against the user's own in-memory model (its logits) and against the dense safetensors
transformers wrote, never against ticketc's own view of the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.hf_models import example_inputs, outputs, pruned_model, save
from ticketc.cli import main
from ticketc.formats.compact_positions import mask_entropy_bits
from ticketc.pack import PackConfig, load_packed, pack, read_packed, unpack

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _entropy_bound(tensors: dict[str, torch.Tensor]) -> float:
    """Mask entropy + kept values in their own dtype, per tensor; dense bytes where smaller."""
    total = 0.0
    for t in tensors.values():
        dense = t.numel() * t.element_size()
        if not t.is_floating_point():
            total += dense
            continue
        nnz = int(t.count_nonzero())
        sparse = (mask_entropy_bits(t.numel(), nnz) + nnz * 8 * t.element_size()) / 8
        total += min(sparse, dense)
    return total


# The judged levels: packed size vs the dense safetensors, fp16 weights.
MIN_RATIO = {0.5: 1.6, 0.9: 6.0, "2:4": 1.5}


# Two of the twelve in the fast subset (pytest -m "not slow"), all of them in the full suite.
_FAST = {("llama", 0.9), ("gpt2", "2:4")}
CELLS = [
    pytest.param(arch, level, marks=() if (arch, level) in _FAST else pytest.mark.slow)
    for arch in ("bert", "gpt2", "llama", "vit")
    for level in (0.5, 0.9, "2:4")
]


@pytest.mark.parametrize(("arch", "level"), CELLS)
def test_pack_unpack_load_packed_fp16(tmp_path, arch, level):
    model = pruned_model(arch, level, torch.float16)
    src = save(model, tmp_path / "src")
    inputs = example_inputs(model)
    expected = outputs(model, inputs)

    result = pack(src, tmp_path / "packed")
    dense = _tensors(src)

    # unpack gives the dense tensors transformers wrote, in files of the same names
    written = unpack(tmp_path / "packed", tmp_path / "dense")
    assert sorted(p.name for p in written) == sorted(p.name for p in src.glob("*.safetensors"))
    back = _tensors(tmp_path / "dense")
    assert back.keys() == dense.keys()
    for name, tensor in dense.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name

    # load_packed builds the transformers model: the same logits as transformers' own load of
    # the dense directory, and as the user's model (exactly for fp32, test_fp32_logits; here
    # within fp16 rounding: model.half() also casts Llama's rotary inv_freq buffer, which
    # from_pretrained keeps in fp32)
    loaded = load_packed(tmp_path / "packed")
    assert type(loaded) is type(model) and not loaded.training
    reference = type(model).from_pretrained(src)
    assert torch.equal(outputs(loaded, inputs), outputs(reference, inputs))
    torch.testing.assert_close(outputs(loaded, inputs), expected, rtol=2e-2, atol=2e-3)

    # sizes: against the dense safetensors and the entropy bound, computed here independently
    packed_bytes = _weight_bytes(tmp_path / "packed")
    ratio = _weight_bytes(src) / packed_bytes
    assert ratio >= MIN_RATIO[level], f"{arch} {level}: only {ratio:.2f}x"
    if level != "2:4":  # 2:4 packs below the unstructured bound (its mask holds less entropy)
        assert packed_bytes <= 1.10 * _entropy_bound(dense), f"{arch} {level}"
    card = json.loads((tmp_path / "packed" / "sparsity.card.json").read_text())
    assert card["totals"]["file_bytes"] == packed_bytes
    assert math.isclose(card["totals"]["times_smaller"], ratio)
    if level == "2:4":
        patterns = {r["pattern"] for r in card["layers"] if r["layout"] in ("2:4", "2:4@0")}
        assert patterns and patterns <= {"2:4", "2:4 (along dim 0)"}
    assert result.card.totals["file_bytes"] == packed_bytes


@pytest.mark.parametrize(
    "arch", ["gpt2", *(pytest.param(a, marks=pytest.mark.slow) for a in ("bert", "llama", "vit"))]
)
def test_fp32_logits_equal_the_users_model(tmp_path, arch):
    model = pruned_model(arch, 0.9, torch.float32)
    pack(save(model, tmp_path / "src"), tmp_path / "packed")
    inputs = example_inputs(model)
    assert torch.equal(outputs(load_packed(tmp_path / "packed"), inputs), outputs(model, inputs))


def test_sharded_source_and_shards_out(tmp_path):
    """A sharded checkpoint in, several packed shards out, the same shards back."""
    model = pruned_model("gpt2", 0.9, torch.float32)
    src = save(model, tmp_path / "src", max_shard_size="100KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1 and (src / "model.safetensors.index.json").is_file()
    result = pack(src, tmp_path / "packed", PackConfig(max_shard_size="20KB"))
    assert len(result.files) > 1
    index = json.loads((tmp_path / "packed" / "sparse.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in result.files}
    unpack(tmp_path / "packed", tmp_path / "dense")
    assert sorted(p.name for p in (tmp_path / "dense").glob("*.safetensors")) == shards
    original = json.loads((src / "model.safetensors.index.json").read_text())
    restored = json.loads((tmp_path / "dense" / "model.safetensors.index.json").read_text())
    assert restored["weight_map"] == original["weight_map"]
    inputs = example_inputs(model)
    assert torch.equal(outputs(load_packed(tmp_path / "packed"), inputs), outputs(model, inputs))


def test_keep_zero_signs_restores_identical_files(tmp_path):
    model = pruned_model("llama", 0.5, torch.float16)
    src = save(model, tmp_path / "src")
    weights = load_file(str(src / "model.safetensors"))
    assert any(bool(torch.signbit(t[t == 0]).any()) for t in weights.values())  # -0.0 inside
    pack(src, tmp_path / "packed", PackConfig(keep_zero_signs=True))
    unpack(tmp_path / "packed", tmp_path / "dense")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (tmp_path / "dense" / name).read_bytes() == (src / name).read_bytes(), name


@pytest.mark.parametrize(
    "values", ["int4", *(pytest.param(v, marks=pytest.mark.slow) for v in ("fp16", "int8"))]
)
def test_lossy_values_stay_within_their_bound(tmp_path, values):
    model = pruned_model("llama", 0.9, torch.float32)
    src = save(model, tmp_path / "src")
    result = pack(src, tmp_path / "packed", PackConfig(values=values))
    dense = _tensors(src)
    back = read_packed(tmp_path / "packed")
    for record in result.card.layers:
        a, b = dense[record.name].double(), back[record.name].double()
        assert bool(((a == 0) == (b == 0)).all() | (a != 0).all())  # zeros stay zeros
        assert torch.equal(a[a == 0], b[a == 0])
        assert float((a - b).abs().max()) == pytest.approx(record.max_abs_error, abs=1e-12)
        if values != "lossless" and record.layout != "dense":
            assert record.values == values
        if record.layout != "dense":  # a 16-entry codebook misses the tails: judge the mean
            kept = a != 0
            rms = float(((a - b)[kept] ** 2).mean().sqrt() / (a[kept] ** 2).mean().sqrt())
            assert rms < {"fp16": 1e-3, "int8": 1e-2, "int4": 0.1}[values], record.name
    worst = max(r.max_rel_error for r in result.card.layers)
    assert 0 < worst < {"fp16": 1e-3, "int8": 1e-2, "int4": 0.5}[values]


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path):
    model = pruned_model("bert", 0.9, torch.float32)
    src = save(model, tmp_path / "src")  # transformers 5 writes safetensors only: convert
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    pack(src, tmp_path / "packed")
    unpack(tmp_path / "packed", tmp_path / "dense")
    assert (tmp_path / "dense" / "model.safetensors").is_file()
    inputs = example_inputs(model)
    assert torch.equal(outputs(load_packed(tmp_path / "packed"), inputs), outputs(model, inputs))


def test_state_dict_sources_pack_too(tmp_path):
    """A single .safetensors file packs without an architecture; load_packed gives its tensors."""
    from safetensors.torch import save_file

    from tests.models_for_tests import prune_random_, tiny_mlp

    mlp = tiny_mlp()
    prune_random_(mlp, 0.1)
    save_file(mlp.state_dict(), str(tmp_path / "mlp.safetensors"))
    pack(tmp_path / "mlp.safetensors", tmp_path / "packed")
    state = load_packed(tmp_path / "packed")
    assert isinstance(state, dict)
    for name, tensor in mlp.state_dict().items():
        assert torch.equal(state[name], tensor)
    torch.save(mlp.state_dict(), tmp_path / "sd.pt")  # via load_model and --arch
    assert (
        main(
            [
                "pack",
                str(tmp_path / "sd.pt"),
                "-o",
                str(tmp_path / "p2"),
                "--arch",
                "tests.models_for_tests:tiny_mlp",
                "--json",
            ]
        )
        == 0
    )
    state = load_packed(tmp_path / "p2")
    assert all(torch.equal(state[k], v) for k, v in mlp.state_dict().items())


def test_cli_pack_and_unpack(tmp_path, capsys):
    model = pruned_model("vit", 0.9, torch.float16)
    src = save(model, tmp_path / "src")
    assert main(["pack", str(src), "-o", str(tmp_path / "packed"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["times_smaller"] > 6
    assert (tmp_path / "packed" / "sparsity.card.md").read_text().startswith("# Sparsity card")
    assert main(["unpack", str(tmp_path / "packed"), "-o", str(tmp_path / "dense")]) == 0
    assert "wrote 1 dense file" in capsys.readouterr().out
    assert torch.equal(
        load_file(str(tmp_path / "dense" / "model.safetensors"))["classifier.weight"],
        load_file(str(src / "model.safetensors"))["classifier.weight"],
    )


def _fails_cleanly(capsys, argv, message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err


def test_cli_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    model = pruned_model("gpt2", 0.9, torch.float32)
    src = save(model, tmp_path / "src")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    _fails_cleanly(capsys, ["pack", str(src), "-o", str(busy)], "not an empty directory")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    _fails_cleanly(capsys, ["pack", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], "no such")
    _fails_cleanly(capsys, ["unpack", str(src), "-o", str(tmp_path / "o")], "not compressed")
    _fails_cleanly(
        capsys, ["pack", str(src), "-o", str(tmp_path / "o"), "--max-shard-size", "lots"], "size"
    )
    # a corrupt packed shard: one line, no output directory
    assert main(["pack", str(src), "-o", str(tmp_path / "packed")]) == 0
    capsys.readouterr()
    shard = tmp_path / "packed" / "sparse.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails_cleanly(
        capsys, ["unpack", str(tmp_path / "packed"), "-o", str(tmp_path / "d")], "sparse"
    )
    assert not (tmp_path / "d").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_card_lists_every_tensor_and_what_runtimes_gain(tmp_path):
    model = pruned_model("llama", 0.9, torch.float32)
    src = save(model, tmp_path / "src")
    result = pack(src, tmp_path / "packed")
    names = set(load_file(str(src / "model.safetensors")))
    assert {r.name for r in result.card.layers} == names
    by_name = {r.name: r for r in result.card.layers}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]  # an nn.Linear: planned speed-up
    assert q.speedup is not None and q.speedup >= 1.0 and "planned" in q.speedup_basis
    assert by_name["model.embed_tokens.weight"].speedup is None
    md = (tmp_path / "packed" / "sparsity.card.md").read_text()
    for text in ("onnxruntime", "size only", "ticketc runtime", "q_proj.weight", "entropy bound"):
        assert text in md
