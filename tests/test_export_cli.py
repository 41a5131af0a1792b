"""`ticketc export` on what users save: .pt2 programs, layer-keyed mask files, DataParallel
state dicts, typed inputs of a tied-head language model; each file checked in onnxruntime
against the user's masked model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch.nn.utils import prune

from tests.models_for_tests import prune_global_, tied_lm, tiny_mlp
from ticketc.cli import main
from ticketc.export import ExportConfig, export_model

MLP = "tests.models_for_tests:tiny_mlp"


def _run(path, *inputs: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs, strict=True)))


def _pruned_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_mlp().eval()
    prune_global_(model, 0.9)
    for module in (model[1], model[3]):
        prune.remove(module, "weight")
    return model


def _stored(capsys) -> list[dict]:
    report = json.loads(capsys.readouterr().out)
    return [layer for layer in report["layers"] if "+" in layer["codec"]]


@pytest.mark.parametrize("dynamic", [True, False])
def test_pt2_program_exports_its_zeros_and_its_batch(tmp_path, capsys, dynamic):
    model = _pruned_mlp()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(model, (torch.randn(2, 20),), dynamic_shapes=shapes)
    torch.export.save(program, tmp_path / "m.pt2")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.pt2"), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer for layer in report["layers"] if "+" in layer["codec"]], "zeros not stored"
    batch = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    if dynamic:  # any batch runs
        assert batch.dim_param and not batch.dim_value
        x = torch.randn(5, 20)
    else:  # the program's guards fix it: kept, and said
        assert batch.dim_value == 2
        assert any("fixed input shapes" in note for note in report["notes"])
        x = torch.randn(2, 20)
    (got,) = _run(out, x.numpy())
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_pt2_program_takes_its_positional_input_by_its_argument_name(tmp_path, capsys):
    """`--input input:...` names the forward's argument of a program recorded positionally
    (before: "kwarg keyword mismatch ... expected []", exit 2)."""
    model = _pruned_mlp()
    shapes = ({0: torch.export.Dim("batch")},)
    program = torch.export.export(model, (torch.randn(2, 20),), dynamic_shapes=shapes)
    torch.export.save(program, tmp_path / "m.pt2")
    (name,) = [n.name for n in program.graph.nodes if n.op == "placeholder" and "input" in n.name]
    out = tmp_path / "m.onnx"
    argv = ["export", str(tmp_path / "m.pt2"), "--input", f"{name}:float32:1,20", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    x = torch.randn(3, 20)
    (got,) = _run(out, x.numpy())
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_layer_keyed_mask_file_as_nni_writes_it(tmp_path, capsys):
    torch.manual_seed(0)
    model = tiny_mlp().eval()
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    masks = {
        "1": {"weight": torch.rand(16, 20) < 0.1, "bias": torch.ones(16, dtype=torch.bool)},
        "3": {"weight": torch.rand(4, 16) < 0.3},
    }
    torch.save(masks, tmp_path / "masks.pt")
    out = tmp_path / "m.onnx"
    args = [
        "export",
        str(tmp_path / "dense.pt"),
        "--arch",
        MLP,
        "--mask",
        str(tmp_path / "masks.pt"),
    ]
    assert main([*args, "--input-shape", "1,20", "-o", str(out), "--json"]) == 0
    assert _stored(capsys)
    with torch.no_grad():
        model[1].weight.mul_(masks["1"]["weight"])
        model[3].weight.mul_(masks["3"]["weight"])
    x = torch.randn(3, 20)
    (got,) = _run(out, x.numpy())
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_dataparallel_prefixes_are_understood(tmp_path, capsys):
    model = _pruned_mlp()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "dp.pt")
    out = tmp_path / "m.onnx"
    args = ["export", str(tmp_path / "dp.pt"), "--arch", MLP, "--input-shape", "1,20"]
    assert main([*args, "-o", str(out), "--json"]) == 0
    assert _stored(capsys)
    x = torch.randn(3, 20)
    (got,) = _run(out, x.numpy())
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_tied_lm_with_typed_token_ids_and_prune_hooks_in_the_state_dict(tmp_path, capsys, values):
    torch.manual_seed(0)
    model = tied_lm().eval()
    prune_global_(model, 0.9)  # hooks on: weight_orig and weight_mask in the state dict
    torch.save(model.state_dict(), tmp_path / "lm.pt")
    out = tmp_path / "m.onnx"
    args = ["export", str(tmp_path / "lm.pt"), "--arch", "tests.models_for_tests:tied_lm"]
    args += ["--input", "ids:int64:1,7", "--values", values, "-o", str(out), "--json"]
    assert main(args) == 0
    assert _stored(capsys)
    proto = onnx.load(str(out))
    assert [i.name for i in proto.graph.input] == ["ids"]
    ids = torch.randint(0, 50, (2, 9))  # other batch and sequence lengths: dynamic axes
    (got,) = _run(out, ids.numpy())
    expected = model(ids).detach().numpy()
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel <= (1e-5 if values == "fp32" else 0.06), rel


def test_a_tied_weight_pruned_through_one_modules_hooks_is_exported_untied_with_a_note(
    tmp_path, capsys
):
    """Hooks on the head alone: the hooked model's head is masked, its embedding is not, so
    the tie is broken in the model the user built. The file follows that model and says so."""
    torch.manual_seed(0)
    model = tied_lm().eval()
    prune.l1_unstructured(model.head, "weight", 0.5)
    torch.save(model.state_dict(), tmp_path / "lm.pt")
    out = tmp_path / "m.onnx"
    args = ["export", str(tmp_path / "lm.pt"), "--arch", "tests.models_for_tests:tied_lm"]
    assert main([*args, "--input", "ids:int64:1,7", "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "note: head.weight: tied to another weight by the architecture" in printed.out
    assert not printed.err
    ids = torch.randint(0, 50, (2, 9))
    (got,) = _run(out, ids.numpy())
    np.testing.assert_allclose(got, model(ids).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_bad_input_spec_is_one_line_and_exit_2(tmp_path, capsys):
    model = _pruned_mlp()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    args = ["export", str(tmp_path / "m.pt"), "--arch", MLP, "--input", "x:int3:1,20"]
    assert main([*args, "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "int3" in err
    assert not (tmp_path / "m.onnx").exists()


def test_verify_against_a_program_keeps_the_batch_its_guards_fix(tmp_path, capsys):
    model = _pruned_mlp()
    program = torch.export.export(model, (torch.randn(2, 20),))  # batch 2, fixed
    torch.export.save(program, tmp_path / "m.pt2")
    export_model(model, torch.randn(1, 20), tmp_path / "dynamic.onnx")  # any batch
    argv = ["verify", str(tmp_path / "dynamic.onnx"), "--against", str(tmp_path / "m.pt2")]
    assert main(argv) == 0, capsys.readouterr().err


def test_verify_compares_an_exported_file_with_the_onnx_file_it_came_from(tmp_path, capsys):
    model = _pruned_mlp()
    dense = tmp_path / "dense.onnx"
    export_model(model, torch.randn(1, 20), dense, ExportConfig(format="dense"))
    for values in ("fp32", "int4"):
        out = tmp_path / f"{values}.onnx"
        assert main(["export", str(dense), "-o", str(out), f"--values={values}"]) == 0
        capsys.readouterr()
        assert main(["verify", str(out), "--against", str(dense)]) == 0
        said = capsys.readouterr().out
        assert said.startswith("ok: ") and ("lossless" if values == "fp32" else "int4") in said
    # a wrong file fails: the int4 file against the dense one at fp32's tolerance
    args = ["verify", str(tmp_path / "int4.onnx"), "--against", str(dense)]
    assert main([*args, "--tolerance", "1e-5"]) == 2
    assert "verification FAILED" in capsys.readouterr().err
    # PyTorch-only flags are refused against an ONNX file, in one line
    assert main([*args, "--input-shape", "1,20"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("values", ["fp16", "int4"])
def test_verify_fails_a_lossy_file_of_another_graph_with_the_same_weights(tmp_path, capsys, values):
    """A lossy file whose weights are the reference's but whose graph is not (another
    activation) fails, against a PyTorch model and against an ONNX file: the reference's
    graph run on the file's own weights must give the file's outputs at fp32's tolerance.
    Its weights alone pass, and its output error (lossy) is only reported."""
    torch.save(_pruned_mlp().state_dict(), tmp_path / "a.pt")
    out, dense = tmp_path / f"{values}.onnx", tmp_path / "tanh.onnx"
    arch = ["--arch=tests.models_for_tests:tiny_mlp_tanh"]
    export = ["export", str(tmp_path / "a.pt"), f"--values={values}", "-o", str(out)]
    assert main([*export, f"--arch={MLP}"]) == 0
    assert main(["export", str(tmp_path / "a.pt"), *arch, "--format=dense", "-o", str(dense)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--against", str(tmp_path / "a.pt"), f"--arch={MLP}"]) == 0
    assert (
        "the reference's graph on the file's weights gives its outputs" in capsys.readouterr().out
    )
    for against in ([str(tmp_path / "a.pt"), *arch], [str(dense)]):
        assert main(["verify", str(out), "--against", *against]) == 2
        err = capsys.readouterr().err
        assert "verification FAILED: its graph is not the reference's" in err, err
        assert err.count("\n") == 1


@pytest.mark.parametrize("values", ["fp16", "int8", "int4"])
def test_verify_fails_a_lossy_file_of_another_model_by_its_weights(tmp_path, capsys, values):
    """Lossy output errors are reported, not failed; the stored weights are checked against
    the reference's own (the model traced as the export traces it, or the ONNX file it came
    from), each within what its value type promises: another model's file fails."""
    torch.save(_pruned_mlp().state_dict(), tmp_path / "a.pt")
    torch.manual_seed(1)
    other = tiny_mlp().eval()
    prune_global_(other, 0.9)
    torch.save(other.state_dict(), tmp_path / "b.pt")
    out, dense = tmp_path / f"{values}.onnx", tmp_path / "b.onnx"
    assert (
        main(
            [
                "export",
                str(tmp_path / "a.pt"),
                f"--arch={MLP}",
                f"--values={values}",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    export_model(other, torch.randn(1, 20), dense, ExportConfig(format="dense"))
    capsys.readouterr()
    assert main(["verify", str(out), "--against", str(tmp_path / "a.pt"), f"--arch={MLP}"]) == 0
    assert "stored weights within their value type's bound" in capsys.readouterr().out
    for against in ([str(tmp_path / "b.pt"), f"--arch={MLP}"], [str(dense)]):
        assert main(["verify", str(out), "--against", *against]) == 2
        err = capsys.readouterr().err
        assert "verification FAILED" in err and "promises" in err, err  # int4: int8 if tiny


@pytest.mark.parametrize("relabelled", [False, True])
def test_verify_fails_a_lossy_file_whose_bias_was_changed(tmp_path, capsys, relabelled):
    """A bias (stored as it is, not compressed) changed in a lossy file, or in an fp32 file
    whose metadata was then relabelled lossy: its outputs are only reported and its graph
    run on its own weights gives its outputs, so only comparing the stored-as-is weights with
    the reference's catches it."""
    torch.save(_pruned_mlp().state_dict(), tmp_path / "a.pt")
    out = tmp_path / "m.onnx"
    values = "fp32" if relabelled else "int8"
    source = [str(tmp_path / "a.pt"), f"--arch={MLP}"]
    assert main(["export", *source, f"--values={values}", "-o", str(out)]) == 0
    assert main(["verify", str(out), "--against", *source]) == 0
    said = capsys.readouterr().out
    assert relabelled or "2 stored as they are equal to the reference's" in said, said
    model = onnx.load(str(out))
    bias = next(i for i in model.graph.initializer if i.name.endswith("bias"))
    changed = numpy_helper.to_array(bias).copy()
    changed[0] += 5.0
    bias.CopyFrom(numpy_helper.from_array(changed, bias.name))
    if relabelled:
        meta = next(p for p in model.metadata_props if p.key == "ticketc")
        meta.value = json.dumps({**json.loads(meta.value), "values": "int4"})
    onnx.save(model, str(out))
    capsys.readouterr()
    assert main(["verify", str(out), "--against", *source]) == 2
    err = capsys.readouterr().err
    assert f"verification FAILED: {bias.name}, stored as it is, differs" in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("against", ["model", "onnx"])
def test_verify_compares_a_lossy_file_whose_equal_initializers_were_stored_once(
    tmp_path, capsys, against
):
    """ALBERT's shared layer is traced as one copy per layer and stored once: verify traces
    (or reads) the reference the same way, so its weights and graph are still compared."""
    from tests.models_for_tests import albert_tiny

    torch.manual_seed(0)
    model = albert_tiny().eval()
    prune_global_(model, 0.8)
    for module in model.modules():
        masks = [k for k, _ in module.named_buffers(recurse=False) if k.endswith("_mask")]
        for mask in masks:
            prune.remove(module, mask[: -len("_mask")])
    torch.save(model.state_dict(), tmp_path / "a.pt")
    source = [str(tmp_path / "a.pt"), "--arch=tests.models_for_tests:albert_tiny"]
    out, dense = tmp_path / "int8.onnx", tmp_path / "dense.onnx"
    assert main(["export", *source, "--values=int8", "-o", str(out)]) == 0
    assert main(["export", *source, "--format=dense", "-o", str(dense)]) == 0
    capsys.readouterr()
    reference = source if against == "model" else [str(dense)]
    assert main(["verify", str(out), "--against", *reference]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "not compared" not in said and "graph on the file's weights gives" in said, said
