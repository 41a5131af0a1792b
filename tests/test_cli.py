"""The CLI: every bad input is one clear line, exit code 2, and no partial output."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from tests.models_for_tests import prune_random_, tiny_mlp
from ticketc.cli import main

ARCH = "tests.models_for_tests:tiny_mlp"


@pytest.fixture
def state_dict_file(tmp_path):
    model = tiny_mlp()
    prune_random_(model, 0.2)
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    return path


def _fails_cleanly(capsys, argv, message: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert message in err, err
    return err


def test_export_writes_verified_file_and_json(tmp_path, state_dict_file, capsys):
    out = tmp_path / "m.onnx"
    assert (
        main(
            [
                "export",
                str(state_dict_file),
                "--arch",
                ARCH,
                "--input-shape",
                "1,20",
                "-o",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["verification"]["passed"] and report["total_bytes"] == out.stat().st_size
    assert (
        main(
            [
                "verify",
                str(out),
                "--against",
                str(state_dict_file),
                "--arch",
                ARCH,
                "--input-shape",
                "1,20",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("ok")
    assert main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["kind"] == "onnx" and len(inspected["layers"]) == 2


def test_inspect_model_table(state_dict_file, capsys):
    assert main(["inspect", str(state_dict_file), "--arch", ARCH]) == 0
    out = capsys.readouterr().out
    assert "1.weight" in out and "total" in out


def test_missing_file(tmp_path, capsys):
    _fails_cleanly(capsys, ["export", str(tmp_path / "nope.pt")], "no such file")


@pytest.mark.parametrize("content", [b"garbage bytes, not torch", b""])
def test_not_a_torch_file(tmp_path, capsys, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    _fails_cleanly(capsys, ["export", str(path), "--arch", ARCH], "bad.pt")
    assert not (tmp_path / "bad.onnx").exists()


def test_truncated_file(tmp_path, state_dict_file, capsys):
    data = state_dict_file.read_bytes()
    state_dict_file.write_bytes(data[: len(data) // 3])
    _fails_cleanly(
        capsys,
        ["export", str(state_dict_file), "--arch", ARCH, "--input-shape", "1,20"],
        "truncated",
    )


def test_corrupt_onnx_for_inspect(tmp_path, capsys):
    path = tmp_path / "x.onnx"
    path.write_bytes(b"\x08\x07garbage")
    _fails_cleanly(capsys, ["inspect", str(path)], "x.onnx")


def test_pickle_refused_with_the_flag_named(tmp_path, capsys):
    torch.save(tiny_mlp(), tmp_path / "full.pt")
    _fails_cleanly(capsys, ["export", str(tmp_path / "full.pt")], "--trust-pickle")
    assert (
        main(["export", str(tmp_path / "full.pt"), "--trust-pickle", "--input-shape", "2,20"]) == 0
    )


def test_no_pruned_layer_exports_and_says_so(tmp_path, capsys):
    torch.save(tiny_mlp().state_dict(), tmp_path / "dense.pt")
    assert (
        main(["export", str(tmp_path / "dense.pt"), "--arch", ARCH, "--input-shape", "1,20"]) == 0
    )
    assert "no zeros in any weight" in capsys.readouterr().out
    assert (tmp_path / "dense.onnx").exists()


def test_nan_weights(tmp_path, capsys):
    model = tiny_mlp()
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    _fails_cleanly(
        capsys,
        ["export", str(tmp_path / "nan.pt"), "--arch", ARCH, "--input-shape", "1,20"],
        "1.weight",
    )


def test_mask_names_and_shapes(tmp_path, state_dict_file, capsys):
    torch.save({"fc9.weight": torch.ones(3, 3, dtype=torch.bool)}, tmp_path / "names.pt")
    torch.save({"1.weight": torch.ones(3, 3, dtype=torch.bool)}, tmp_path / "shapes.pt")
    base = ["export", str(state_dict_file), "--arch", ARCH, "--input-shape", "1,20", "--mask"]
    _fails_cleanly(capsys, [*base, str(tmp_path / "names.pt")], "fc9.weight")
    _fails_cleanly(capsys, [*base, str(tmp_path / "shapes.pt")], "shape")


class _Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ticketc_test.mystery(self.fc(x))


@torch.library.custom_op("ticketc_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


def unsupported() -> nn.Module:
    return _Unsupported()


def test_unsupported_layer_is_named(tmp_path, capsys):
    torch.save(unsupported().state_dict(), tmp_path / "u.pt")
    err = _fails_cleanly(
        capsys,
        [
            "export",
            str(tmp_path / "u.pt"),
            "--arch",
            "tests.test_cli:unsupported",
            "--input-shape",
            "1,20",
        ],
        "mystery",
    )
    assert "cannot export" in err
    assert not (tmp_path / "u.onnx").exists()


def test_unwritable_output(tmp_path, state_dict_file, capsys):
    base = ["export", str(state_dict_file), "--arch", ARCH, "--input-shape", "1,20", "-o"]
    _fails_cleanly(
        capsys, [*base, str(tmp_path / "no" / "such" / "dir" / "m.onnx")], "does not exist"
    )
    _fails_cleanly(capsys, [*base, str(tmp_path)], "directory")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _fails_cleanly(capsys, [*base, str(locked / "m.onnx")], "cannot write")


def test_failed_run_keeps_existing_output(tmp_path, state_dict_file, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    _fails_cleanly(
        capsys,
        [
            "export",
            str(state_dict_file),
            "--arch",
            ARCH,
            "--input-shape",
            "1,20",
            "--values",
            "int4",
            "--tolerance",
            "0",
            "-o",
            str(out),
        ],
        "verification failed",
    )
    assert out.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--values", "int8", "--format", "dense"], "portable"),
        (["--tolerance", "-1"], "tolerance"),
        (["--input-shape", "1,x"], "input shape"),
        (["--arch", "no_such_module_xyz:f"], "no_such_module_xyz"),
    ],
)
def test_bad_flags(state_dict_file, capsys, argv, message):
    base = ["export", str(state_dict_file), "--input-shape", "1,20"]
    if "--arch" not in argv:
        base += ["--arch", ARCH]
    _fails_cleanly(capsys, [*base, *argv], message)


def test_state_dict_without_arch(state_dict_file, capsys):
    _fails_cleanly(capsys, ["export", str(state_dict_file)], "--arch")


def test_inspect_shows_the_plan_of_a_compiled_model(tmp_path, state_dict_file, capsys):
    out = tmp_path / "m.pt2"
    assert (
        main(
            [
                "compile",
                str(state_dict_file),
                "--arch",
                ARCH,
                "--input-shape",
                "4,20",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "compiled"
    assert {row["name"] for row in report["plan"]} <= {"1", "3"} and report["plan"]


def test_positions_choice_is_honoured(tmp_path, state_dict_file, capsys):
    out = tmp_path / "m.onnx"
    assert (
        main(
            [
                "export",
                str(state_dict_file),
                "--arch",
                ARCH,
                "--input-shape",
                "1,20",
                "--positions",
                "bitmask",
                "-o",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    stored = [layer for layer in report["layers"] if layer["codec"] != layer["dtype"]]
    assert stored and all(layer["codec"].startswith("bitmask+") for layer in stored)
