"""`ticketc compile`: writes a runnable .pt2 and its plan; bad input is one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from tests.models_for_tests import prune_random_, tiny_mlp
from ticketc.cli import main
from ticketc.compile import load_program, plan_rows

ARCH = "tests.models_for_tests:tiny_mlp"


@pytest.fixture
def model_file(tmp_path):
    model = tiny_mlp()
    prune_random_(model, 0.2)
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def _args(path, *extra):
    return ["compile", str(path), "--arch", ARCH, "--input-shape", "1,20", *extra]


def test_compile_writes_program_and_plan(tmp_path, model_file, capsys):
    path, model = model_file
    out = tmp_path / "m.pt2"
    assert main(_args(path, "-o", str(out), "--batch-size", "16", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["output"] == str(out) and result["max_abs_error"] < 1e-5
    assert (tmp_path / "m.plan.json").is_file()
    assert [r["name"] for r in plan_rows(out)] == ["1", "3"]
    x = torch.randn(4, 20)
    with torch.no_grad():
        torch.testing.assert_close(load_program(out).module()(x), model(x))


def test_plan_written_by_compile_can_be_edited_and_passed_back(tmp_path, model_file, capsys):
    path, _ = model_file
    assert main(_args(path, "-o", str(tmp_path / "a.pt2"))) == 0
    assert "a.plan.json" in capsys.readouterr().out
    plan = json.loads((tmp_path / "a.plan.json").read_text())
    for layer in plan["layers"]:
        layer["format"] = "csr"
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    out = tmp_path / "b.pt2"
    assert main(_args(path, "-o", str(out), "--plan", str(tmp_path / "edited.json"))) == 0
    assert [r["format"] for r in plan_rows(out)] == ["csr", "csr"]


def _fails_cleanly(capsys, argv, message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--batch-size", "0"), "batch_size"),
        (("--device", "tpu"), "'tpu'"),
        (("-o", "out.onnx"), "must end in .pt2"),
        (("--plan", "missing.json"), "missing.json"),
    ],
)
def test_bad_flags_exit_2(tmp_path, model_file, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    _fails_cleanly(capsys, _args(model_file[0], *extra), message)
    assert not list(tmp_path.glob("*.pt2"))


def test_unknown_dtype_is_an_argparse_error(model_file, capsys):
    assert main(_args(model_file[0], "--dtype", "int8")) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_missing_model_exits_2(tmp_path, capsys):
    _fails_cleanly(capsys, _args(tmp_path / "nope.pt"), "no such file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")
def test_cuda_without_gpu_exits_2(model_file, capsys):
    _fails_cleanly(capsys, _args(model_file[0], "--device", "cuda"), "no CUDA device")


def test_plan_naming_unknown_layers_exits_2(tmp_path, model_file, capsys):
    plan = {
        "format": "ticketc.plan",
        "version": 1,
        "device": "cpu",
        "dtype": "float32",
        "batch_size": 1,
        "layers": [{"name": "fc9", "format": "csr"}],
    }
    (tmp_path / "p.json").write_text(json.dumps(plan))
    _fails_cleanly(
        capsys,
        _args(model_file[0], "-o", str(tmp_path / "x.pt2"), "--plan", str(tmp_path / "p.json")),
        "fc9",
    )
    assert not (tmp_path / "x.pt2").exists()
