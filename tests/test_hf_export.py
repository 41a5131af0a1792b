"""`ticketc export DIR` on Hugging Face directories, checked against transformers' own model.

The reference is `from_pretrained` on the directory the user saved (not ticketc's loader), run
at other batch sizes and sequence lengths than the export was traced with, padding included.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tests.hf_models import pruned_model, save
from ticketc.cli import main
from ticketc.verify import FP32_RTOL, ort_session

pytest.importorskip("transformers")

CASES = [("bert", 0.5, {}), ("gpt2", 0.9, {"max_shard_size": "100KB"}), ("llama", "2:4", {})]


def _text_inputs(batch: int, length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, -min(3, length - 1) :] = 0  # right padding in the first row
    return {
        "input_ids": torch.randint(0, vocab, (batch, length), generator=g),
        "attention_mask": mask,
    }


def _rel(got: np.ndarray, ref: torch.Tensor) -> float:
    ref64 = ref.double().numpy()
    return float(np.abs(got.astype(np.float64) - ref64).max() / np.abs(ref64).max())


def _export(tmp_path, src, capsys) -> onnx.ModelProto:
    out = tmp_path / "model.onnx"
    assert main(["export", str(src), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified in onnxruntime on batch 3" in printed
    return onnx.load(str(out))


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "level", "save_kwargs"), CASES)
def test_text_model_exports_with_dynamic_batch_and_sequence(
    tmp_path, capsys, arch, level, save_kwargs
):
    model = pruned_model(arch, level)
    src = save(model, tmp_path / "src", **save_kwargs)
    if save_kwargs:
        assert len(list(src.glob("*.safetensors"))) > 1  # sharded
    proto = _export(tmp_path, src, capsys)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in proto.graph.input
    }
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert [o.name for o in proto.graph.output] == ["logits"]

    reference = type(model).from_pretrained(src).eval()  # transformers' own load
    session = ort_session(tmp_path / "model.onnx")
    for batch, length, seed in ((1, 5, 1), (4, 23, 2), (2, 64, 3)):
        inputs = _text_inputs(batch, length, model.config.vocab_size, seed)
        with torch.no_grad():
            expected = reference(**inputs, use_cache=False).logits
        (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert got.shape == tuple(expected.shape)
        assert _rel(got, expected) <= FP32_RTOL, (arch, batch, length)


def test_an_encoder_decoder_classifier_exports_on_input_ids_alone(tmp_path, capsys):
    """BART's classification head makes its decoder inputs from input_ids and reads the
    states at each row's end-of-sequence token: the default inputs gave it decoder_input_ids
    of another length (torch.onnx failed on a [2, 16] mask over [2, 4, 64]), and random
    verification ids without that token."""
    model = pruned_model("bart_classifier", 0.5)
    src = save(model, tmp_path / "src")
    proto = _export(tmp_path, src, capsys)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    reference = type(model).from_pretrained(src).eval()
    session = ort_session(tmp_path / "model.onnx")
    eos = model.config.eos_token_id
    for batch, length, seed in ((1, 5, 1), (3, 23, 2)):
        ids = torch.randint(
            3,
            model.config.vocab_size,
            (batch, length),
            generator=torch.Generator().manual_seed(seed),
        )
        ids[:, -1] = eos
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            expected = reference(**inputs).logits
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        assert _rel(got, expected) <= FP32_RTOL, (batch, length)


@pytest.mark.slow
def test_vision_model_exports_with_dynamic_batch(tmp_path, capsys):
    model = pruned_model("vit", 0.9)
    src = save(model, tmp_path / "src")
    proto = _export(tmp_path, src, capsys)
    (pixels,) = proto.graph.input
    assert [d.dim_param or d.dim_value for d in pixels.type.tensor_type.shape.dim] == [
        "batch",
        3,
        32,
        32,
    ]
    reference = type(model).from_pretrained(src).eval()
    session = ort_session(tmp_path / "model.onnx")
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = reference(pixel_values=x).logits
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        assert _rel(got, expected) <= FP32_RTOL


def test_export_refuses_remote_code_without_the_flag(tmp_path, capsys):
    from tests.test_hf_load import remote_code_directory

    src = remote_code_directory(tmp_path / "custom")
    (tmp_path / "x.onnx").write_bytes(b"not read")
    for command in ("export", "compile", "verify"):
        argv = [command, str(src)]
        if command == "verify":
            argv = [command, str(tmp_path / "x.onnx"), "--against", str(src)]
        assert main(argv) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--trust-remote-code" in err, (command, err)
    assert not (src / "RAN").exists()
    assert [p.name for p in tmp_path.glob("*.onnx")] == ["x.onnx"]


def test_a_pt2_of_a_transformers_model_with_keyword_inputs_and_model_output(tmp_path, capsys):
    """torch.export of a transformers model: keyword inputs, a ModelOutput (whose class torch
    reads back only once its transformers module is imported), a dynamic batch."""
    model = pruned_model("bert", 0.9)
    ids = torch.randint(0, 50, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch = torch.export.Dim("batch", min=1, max=32)
    shapes = {"input_ids": {0: batch}, "attention_mask": {0: batch}}
    program = torch.export.export(model, (), inputs, dynamic_shapes=shapes, strict=False)
    torch.export.save(program, tmp_path / "m.pt2")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.pt2"), "-o", str(out)]) == 0, capsys.readouterr()
    session = ort_session(out)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    ids = torch.randint(0, 50, (5, 8))
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((5, 8), np.int64)}
    got = session.run(None, feed)[0]
    expected = model(input_ids=ids, attention_mask=torch.ones_like(ids))[0].detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=FP32_RTOL, atol=1e-5)


def test_a_pickled_transformers_model_takes_its_attention_mask(tmp_path, capsys):
    model = pruned_model("bert", 0.9)
    torch.save(model, tmp_path / "m.pt")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.pt"), "--trust-pickle", "-o", str(out)]) == 0
    names = [i.name for i in ort_session(out).get_inputs()]
    assert names == ["input_ids", "attention_mask"], names


def test_verification_samples_pad_masks_on_both_sides():
    from ticketc.inputs import ExampleInputs, random_like

    example = ExampleInputs(
        (),
        {
            "input_ids": torch.ones(3, 6, dtype=torch.long),
            "attention_mask": torch.ones(3, 6, dtype=torch.long),
        },
    )
    mask = random_like(example, padded=True).kwargs["attention_mask"]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0] and mask[1].tolist() == [0, 0, 1, 1, 1, 1]
    assert mask[2].all() and random_like(example).kwargs["attention_mask"].all()


def test_an_audio_model_directory_exports_with_a_dynamic_length(tmp_path, capsys):
    """wav2vec2's audio length (input_values [batch, samples]) was fixed at the 4000 samples
    it was traced at, with no note; torch.export keeps it dynamic through the conv stem, and
    the file matches transformers' model at other lengths."""
    from tests.hf_models import tiny_wav2vec2

    torch.manual_seed(0)
    tiny_wav2vec2().eval().save_pretrained(tmp_path / "w2v")
    out = tmp_path / "w2v.onnx"
    assert main(["export", str(tmp_path / "w2v"), "-o", str(out)]) == 0, capsys.readouterr().err
    session = ort_session(out)
    (port,) = session.get_inputs()
    assert port.name == "input_values" and all(isinstance(d, str) for d in port.shape)
    reference = type(tiny_wav2vec2()).from_pretrained(tmp_path / "w2v").eval()
    for batch, samples in ((1, 4000), (2, 9001)):
        x = torch.randn(batch, samples, generator=torch.Generator().manual_seed(samples))
        with torch.no_grad():
            expected = reference(input_values=x).logits
        (got,) = session.run(None, {"input_values": x.numpy()})
        assert got.shape == tuple(expected.shape)
        assert _rel(got, expected) <= FP32_RTOL, (batch, samples)


def test_a_dual_encoder_gets_pixel_values_beside_its_token_ids(tmp_path, capsys):
    """CLIP's main input is input_ids, but its forward needs pixel_values too: the default
    inputs gave it none ("'NoneType' object has no attribute 'shape'")."""
    from tests.hf_models import tiny_clip

    torch.manual_seed(0)
    tiny_clip().eval().save_pretrained(tmp_path / "clip")
    out = tmp_path / "clip.onnx"
    assert main(["export", str(tmp_path / "clip"), "-o", str(out)]) == 0, capsys.readouterr().err
    session = ort_session(out)
    assert [p.name for p in session.get_inputs()] == ["input_ids", "attention_mask", "pixel_values"]
    reference = type(tiny_clip()).from_pretrained(tmp_path / "clip").eval()
    ids = torch.randint(3, 99, (3, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["pixel_values"] = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(**inputs).logits_per_image
    got = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, {k: v.numpy() for k, v in inputs.items()}),
            strict=True,
        )
    )
    assert _rel(got["logits_per_image"], expected) <= FP32_RTOL


def test_verify_in_a_fresh_process_flattens_a_causal_lms_cache_as_the_export_did(tmp_path):
    """The export registers transformers' cache classes as pytree nodes (in its own
    process): a causal LM's file returns the logits and every layer's keys and values. A
    verify in a fresh process must flatten the reference the same way, not see 1 output."""
    import subprocess
    import sys

    src, arch = tmp_path / "gpt2.pt", "--arch=tests.hf_models:tiny_gpt2"
    torch.save(pruned_model("gpt2", 0.9).state_dict(), src)
    out = tmp_path / "model.onnx"
    assert main(["export", str(src), arch, "-o", str(out)]) == 0
    names = [o.name for o in onnx.load(out).graph.output]
    assert len(names) == 5 and names[0] == "logits"  # and 2 layers' keys and values
    command = [sys.executable, "-m", "ticketc", "verify", str(out), "--against", str(src), arch]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert all(f"{name}: max abs" in run.stdout for name in names), run.stdout
