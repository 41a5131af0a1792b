"""No code runs from a file without an opt-in flag; every refusal is one line naming the flag.

Canaries: pickles whose unpickling runs `os.system("touch MARKER")`, and strings naming code
(`subprocess:run`, `tests.canary_module:factory`, whose import writes a marker) in every place
ticketc reads: model files, masks, samples, run directories on --resume, report, .pt2 archives,
ONNX external data and metadata. Each test also fires its canary through the unprotected path
(plain torch.load / torch.export.load / the opt-in flag), so a canary that could not fire
cannot make a test pass.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tests.fuzzing import FIND  # a one-round find on tiny data
from tests.models_for_tests import prune_random_, tiny_mlp
from ticketc.checkpoint import Ticket, save_ticket
from ticketc.cli import main
from ticketc.errors import UserError

ARCH = "tests.models_for_tests:tiny_mlp"
SHAPE = ["--input-shape", "1,20"]


class Canary:
    """Unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., int], tuple[str]]:
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "CANARY"
    monkeypatch.setenv("TICKETC_CANARY", str(path))
    sys.modules.pop("tests.canary_module", None)
    return path


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _model_commands(model: Path, tmp_path: Path, good_onnx: Path) -> list[list[str]]:
    return [
        ["inspect", str(model)],
        ["export", str(model), "-o", str(tmp_path / "o.onnx"), *SHAPE],
        ["verify", str(good_onnx), "--against", str(model), *SHAPE],
        ["compile", str(model), "-o", str(tmp_path / "o.pt2"), *SHAPE],
    ]


@pytest.fixture
def good_onnx(tmp_path: Path) -> Path:
    model = tiny_mlp()
    prune_random_(model, 0.3)
    torch.save(model.state_dict(), tmp_path / "good.pt")
    out = tmp_path / "good.onnx"
    assert (
        main(
            ["export", str(tmp_path / "good.pt"), "--arch", ARCH, *SHAPE, "-o", str(out), "--json"]
        )
        == 0
    )
    return out


# --- pickles in model files, masks and samples ------------------------------------------------


def test_pickled_model_runs_nothing_without_the_flag(tmp_path, marker, good_onnx, capsys):
    path = tmp_path / "model.pt"
    torch.save({"weights": Canary(marker)}, path)
    for argv in _model_commands(path, tmp_path, good_onnx):
        _one_line(capsys, argv, str(path), "--trust-pickle")
        assert not marker.exists(), argv
    main(["inspect", str(path), "--trust-pickle"])  # the opt-in: the canary is real
    assert marker.exists()


@pytest.mark.parametrize("flag", ["--mask", "--sample"])
def test_pickled_masks_and_samples_are_never_unpickled(tmp_path, marker, capsys, flag):
    model = tiny_mlp()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    evil = tmp_path / "evil.pt"
    torch.save({"1.weight": Canary(marker)}, evil)
    for trust in ([], ["--trust-pickle"]):  # --trust-pickle is about the model file only
        _one_line(
            capsys,
            [
                "export",
                str(tmp_path / "sd.pt"),
                "--arch",
                ARCH,
                *SHAPE,
                flag,
                str(evil),
                "-o",
                str(tmp_path / "o.onnx"),
                *trust,
            ],
            str(evil),
        )
    assert not marker.exists()
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_legacy_format_pickle_is_refused(tmp_path, marker, capsys):
    path = tmp_path / "legacy.pt"
    torch.save({"w": Canary(marker)}, path, _use_new_zipfile_serialization=False)
    _one_line(capsys, ["inspect", str(path)], "--trust-pickle")
    assert not marker.exists()


# --- architectures named inside files ---------------------------------------------------------


def _ticket(path: Path, arch: str, arch_kwargs: dict[str, object] | None = None) -> None:
    model = tiny_mlp()
    save_ticket(
        Ticket(arch, model.state_dict(), {}, model.state_dict(), arch_kwargs=arch_kwargs or {}),
        path,
    )


@pytest.mark.parametrize("arch", ["subprocess:run", "tests.canary_module:factory"])
def test_ticket_naming_code_is_refused_naming_arch(tmp_path, marker, good_onnx, capsys, arch):
    path = tmp_path / "ticket.pt"
    _ticket(path, arch, {"args": ["touch", str(marker)]})
    for argv in _model_commands(path, tmp_path, good_onnx):
        _one_line(capsys, argv, f"--arch {arch}")
        assert not marker.exists() and "tests.canary_module" not in sys.modules, argv
    from ticketc.factory import resolve  # what the old loader did with the file's string

    resolve(arch)(args=["touch", str(marker)])
    assert marker.exists()


def test_ticket_of_a_user_architecture_builds_with_the_same_arch(tmp_path, capsys):
    path = tmp_path / "ticket.pt"
    _ticket(path, ARCH)
    assert main(["inspect", str(path), "--arch", ARCH, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "model"


def test_arch_module_in_the_current_folder_is_found(tmp_path, monkeypatch, capsys):
    # `ticketc` started from its console script has no '' on sys.path; `--arch mymodels:mlp`
    # must still find ./mymodels.py, as `python -m ticketc` would.
    name = "ticketc_cwd_models"
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\n"
        "def mlp():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))\n"
    )
    model = tiny_mlp()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", cwd)])
    monkeypatch.delitem(sys.modules, name, raising=False)
    assert main(["inspect", "sd.pt", "--arch", f"{name}:mlp", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "model"
    sys.modules.pop(name, None)


def test_top_level_help_names_every_flag_that_runs_code():
    from ticketc.cli import RUNS_CODE, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {
        option
        for command in subparsers.choices.values()
        for action in command._actions
        if "(runs code" in (action.help or "")
        for option in action.option_strings
        if option.startswith("--")
    }
    assert {"--arch", "--trust-pickle", "--model", "--data"} <= flags
    for flag in flags:
        assert flag in RUNS_CODE, flag
    assert parser.epilog == RUNS_CODE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": torch.tensor(10)},
        {"num_classes": 10, "extra": {"nested": [1, torch.ones(1)]}},
        {"num_classes": float("nan")},
        {"in_features": 10**9},  # would allocate 1.2 TB: refused on the meta device first
        {"in_features": -1},
    ],
)
def test_builtin_architecture_takes_only_plain_fitting_arguments(tmp_path, capsys, kwargs):
    from ticketc.models import lenet300

    model = lenet300(num_classes=4, in_features=20)
    path = tmp_path / "ticket.pt"
    save_ticket(
        Ticket(
            "ticketc.models:lenet300",
            model.state_dict(),
            {},
            model.state_dict(),
            arch_kwargs=kwargs,
        ),
        path,
    )
    _one_line(capsys, ["inspect", str(path)], str(path))


# --- run directories: find --resume and report ------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("find") / "run"
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        assert main(["find", "--out", str(run), *FIND]) == 0
    return run


@pytest.mark.parametrize(
    "victim", ["init.pt", "level_00/final.pt", "level_00/mask.pt", "level_01/partial.pt"]
)
def test_resume_over_a_pickle_is_one_line(finished_run, tmp_path, marker, capsys, victim):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "ticket.pt").unlink()
    (run / "level_01" / "metrics.json").unlink()  # level 1 is redone: it reads the victim
    (run / victim).write_bytes(_bytes({"x": Canary(marker)}))
    _one_line(
        capsys, ["find", "--out", str(run), *FIND, "--resume"], victim.split("/")[-1], "pickled"
    )
    assert not marker.exists()


def test_resume_never_imports_what_run_files_name(finished_run, tmp_path, marker, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "arch.json").write_text(
        json.dumps({"arch": "tests.canary_module:factory", "arch_kwargs": {}, "input_shape": [12]})
    )
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": "tests.canary_module:f"}))
    # Where the data came from is not a result setting (#21: a run may resume from moved data
    # whose md5 matches): the command line's --data is used, what the files name never is.
    assert main(["find", "--out", str(run), *FIND, "--resume"]) == 0
    capsys.readouterr()
    assert not marker.exists() and "tests.canary_module" not in sys.modules
    assert json.loads((run / "arch.json").read_text())["arch"] == "tests.test_find_run:tiny_mlp"


def test_report_refuses_an_architecture_it_does_not_know(finished_run, tmp_path, marker, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "arch.json").write_text(
        json.dumps(
            {
                "arch": "subprocess:run",
                "arch_kwargs": {"args": ["touch", str(marker)]},
                "input_shape": [12],
            }
        )
    )
    _one_line(capsys, ["report", str(run)], "--arch subprocess:run")
    assert not marker.exists()
    assert main(["report", str(run), "--no-export", "--json"]) == 0  # the rest reads fine
    capsys.readouterr()


def test_report_reads_weights_without_unpickling(finished_run, tmp_path, marker, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "level_00" / "final.pt").write_bytes(_bytes({"x": Canary(marker)}))
    assert main(["report", str(run), "--arch", "tests.test_find_run:tiny_mlp", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["levels"]
    assert rows[0]["export_bytes"] is None and rows[1]["export_bytes"] > 0
    assert not marker.exists()


# --- .pt2 archives ------------------------------------------------------------------------------


def _program(path: Path) -> None:
    model = nn.Sequential(nn.Linear(20, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 20),)), path)


def _rewrite(
    src: Path,
    dst: Path,
    edit: Callable[[str, bytes], bytes],
    rename: Callable[[str], str] = str,
) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(rename(info.filename), edit(info.filename, zin.read(info)))


def _craft_pt2(kind: str, src: Path, dst: Path, marker: Path) -> None:
    command = f"__import__('os').system('touch {marker}')"

    def edit(name: str, data: bytes) -> bytes:
        if kind == "use_pickle" and name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first].update(use_pickle=True, path_name="evil")
            return json.dumps(config).encode()
        if kind == "opaque_constant" and name.endswith("model_constants_config.json"):
            return json.dumps(
                {
                    "config": {
                        "c": {"path_name": "opaque_obj_0", "use_pickle": True, "is_param": False}
                    }
                }
            ).encode()
        if kind == "sample_inputs" and name.endswith("sample_inputs/model.pt"):
            return _bytes(Canary(marker))
        if kind == "expr" and name.endswith("models/model.json"):
            expr = {"as_expr": {"expr_str": command, "hint": {"as_int": 20}}}
            return data.decode().replace('{"as_int": 20}', json.dumps(expr), 1).encode()
        if kind == "guards" and name.endswith("models/model.json"):
            return json.dumps({**json.loads(data), "guards_code": [f"{command} == 0"]}).encode()
        if kind == "target" and name.endswith("models/model.json"):
            return data.replace(b"torch.ops.aten.relu.default", b"torch.os.getpid")
        if kind == "file_operator" and name.endswith("models/model.json"):  # writes a file
            return data.replace(b"torch.ops.aten.relu.default", b"torch.ops.aten.from_file.default")
        if kind == "operator_argument" and name.endswith("models/model.json"):
            program = json.loads(data)
            node = program["graph_module"]["graph"]["nodes"][0]
            node["inputs"].append({"name": "op", "arg": {"as_operator": "torch.os.system"}})
            return json.dumps(program).encode()
        if kind == "unchecked_entry" and name.endswith("models/model.json"):
            expr = {"as_expr": {"expr_str": command, "hint": {"as_int": 20}}}
            return data.decode().replace('{"as_int": 20}', json.dumps(expr), 1).encode()
        return data

    def rename(name: str) -> str:  # torch reads every entry under models/ as a program
        return name.replace("models/model.json", "models/modelXjson")

    _rewrite(src, dst, edit, rename if kind == "unchecked_entry" else str)
    root = zipfile.ZipFile(src).namelist()[0].split("/")[0]
    extra = {
        "use_pickle": (f"{root}/data/weights/evil", _bytes(Canary(marker))),
        "aoti": (f"{root}/data/aotinductor/model/model.so", b"\x7fELF"),
    }
    if kind in extra:
        with zipfile.ZipFile(dst, "a") as z:
            z.writestr(*extra[kind])


PT2_CANARIES = [
    "use_pickle",
    "opaque_constant",
    "sample_inputs",
    "expr",
    "guards",
    "target",
    "file_operator",
    "operator_argument",
    "unchecked_entry",
    "aoti",
]


@pytest.mark.parametrize("kind", PT2_CANARIES)
def test_pt2_that_would_run_code_is_refused(tmp_path, marker, good_onnx, capsys, kind):
    base, path = tmp_path / "base.pt2", tmp_path / f"{kind}.pt2"
    _program(base)
    _craft_pt2(kind, base, path, marker)
    for argv in _model_commands(path, tmp_path, good_onnx):
        _one_line(capsys, argv, str(path), "--trust-pickle")
        assert not marker.exists(), argv
    if kind in ("use_pickle", "sample_inputs", "expr", "guards", "unchecked_entry"):
        with contextlib.suppress(Exception):  # torch may fail, after the damage is done
            torch.export.load(path).module()(torch.randn(2, 20))  # guards run in forward
        assert marker.exists(), "torch.export.load runs this canary: it must be real"


def test_sound_pt2_programs_load(tmp_path, capsys):
    """Dynamic shapes (sympy sizes, range constraints, guards) and higher-order ops pass."""

    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(self.conv(x).mean(dim=(2, 3)))
            return torch.cond(y.sum() > 0, lambda y: y.relu(), lambda y: -y, (y,)) + x.shape[2]

    x = torch.randn(2, 3, 16, 16)
    batch, side = torch.export.Dim("b", min=1, max=64), torch.export.Dim("h", min=4, max=128)
    program = torch.export.export(
        Conv().eval(), (x,), dynamic_shapes=({0: batch, 2: side, 3: side},)
    )
    torch.export.save(program, tmp_path / "conv.pt2")
    from ticketc.load import load_model

    loaded = load_model(tmp_path / "conv.pt2")
    torch.testing.assert_close(loaded.model(x), program.module()(x))


def test_zip_bomb_is_refused_before_reading(tmp_path, capsys):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("bomb/data/0", bytes(64 * 2**20))  # 64 MiB of zeros in ~64 KiB
    assert path.stat().st_size < 2**20
    _one_line(capsys, ["inspect", str(path)], "zip bomb")
    sd = tmp_path / "sd.pt"  # a sound file whose central directory claims 3 GiB for a record
    torch.save(tiny_mlp().state_dict(), sd)
    sd.write_bytes(_declare_size(sd.read_bytes(), "/data/0", 3 * 2**30))
    _one_line(capsys, ["inspect", str(sd), "--arch", ARCH], "3.0 GiB")


def _declare_size(data: bytes, suffix: str, size: int) -> bytes:
    """Set the uncompressed size that the central directory declares for the entry `*suffix`."""
    out = bytearray(data)
    start = 0
    while (entry := out.find(b"PK\x01\x02", start)) >= 0:
        name_length = int.from_bytes(out[entry + 28 : entry + 30], "little")
        if out[entry + 46 : entry + 46 + name_length].decode().endswith(suffix):
            out[entry + 24 : entry + 28] = size.to_bytes(4, "little")
            return bytes(out)
        start = entry + 4
    raise AssertionError(f"no entry {suffix}")


# --- ONNX ---------------------------------------------------------------------------------------


def _onnx_with_external(folder: Path, location: str) -> Path:
    weight = numpy_helper.from_array(np.ones((20, 4), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "320")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    path = folder / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("where", ["dotdot", "absolute", "link", "missing", "too_short"])
def test_external_data_stays_in_the_model_folder(tmp_path, capsys, where):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones((20, 4), np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "short.bin").write_bytes(b"\0" * 16)
    (folder / "link.bin").symlink_to(secret)
    location = {
        "dotdot": "../secret.bin",
        "absolute": str(secret),
        "link": "link.bin",
        "missing": "nope.bin",
        "too_short": "short.bin",
    }[where]
    path = _onnx_with_external(folder, location)
    _one_line(capsys, ["inspect", str(path)], str(path))
    torch.save(nn.Sequential(nn.Linear(20, 4, bias=False)).state_dict(), tmp_path / "sd.pt")
    _one_line(
        capsys,
        [
            "verify",
            str(path),
            "--against",
            str(tmp_path / "sd.pt"),
            "--arch",
            "tests.test_security:linear_20_4",
            *SHAPE,
        ],
        str(path),
    )


def test_external_data_past_the_end_of_its_file_says_where(tmp_path, capsys):
    """An offset past the end with no length: the message printed the span backwards
    ("[1000000000000, 2560)")."""
    (tmp_path / "w.bin").write_bytes(np.ones((20, 4), np.float32).tobytes())
    path = _onnx_with_external(tmp_path, "w.bin")
    model = onnx.load(str(path), load_external_data=False)
    (weight,) = model.graph.initializer
    del weight.external_data[1:]
    entry = weight.external_data.add()
    entry.key, entry.value = "offset", str(10**12)
    onnx.save_model(model, path)
    _one_line(capsys, ["inspect", str(path)], "(offset 1000000000000) lies outside 'w.bin' (320")


def linear_20_4() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 4, bias=False))


def test_external_data_inside_the_folder_is_read(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(np.ones((20, 4), np.float32).tobytes())
    path = _onnx_with_external(folder, "w.bin")
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["nnz"] == 80


def test_sparse_initializer_declaring_huge_dims_is_one_line(tmp_path, capsys):
    values = numpy_helper.from_array(np.ones(2, np.float32), "s")
    indices = numpy_helper.from_array(np.array([0, 5], np.int64), "si")
    sparse = helper.make_sparse_tensor(values, indices, [2**31, 2**31])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "s"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2**31])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2**31])],
        sparse_initializer=[sparse],
    )
    path = tmp_path / "huge.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    _one_line(capsys, ["inspect", str(path)], "2147483648 x 2147483648")


def test_onnx_metadata_naming_code_imports_nothing(good_onnx, marker, capsys):
    model = onnx.load(str(good_onnx))
    model.metadata_props.add(key="arch", value="tests.canary_module:factory")
    for entry in model.metadata_props:
        if entry.key == "ticketc":
            entry.value = json.dumps({"arch": "tests.canary_module:factory", "layers": []})
    onnx.save_model(model, good_onnx)
    assert main(["inspect", str(good_onnx), "--json"]) == 0
    capsys.readouterr()
    assert not marker.exists() and "tests.canary_module" not in sys.modules


def test_an_onnx_file_given_as_a_model_is_named_as_such(good_onnx):
    from ticketc.load import load_model

    with pytest.raises(UserError, match="is an ONNX model") as error:
        load_model(good_onnx)
    assert "pickle" not in str(error.value)


# --- full disks -------------------------------------------------------------------------------


def test_full_disk_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import errno

    from ticketc.export import write as export_write

    def full(proto: object, path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_write, "_save", full)
    model = tiny_mlp()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    out = tmp_path / "out.onnx"
    _one_line(
        capsys,
        ["export", str(tmp_path / "sd.pt"), "--arch", ARCH, *SHAPE, "-o", str(out)],
        str(out),
        "disk is full",
    )
    assert sorted(os.listdir(tmp_path)) == ["sd.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "compile", "find"])
def test_file_size_limit_in_a_real_process(tmp_path, command):
    """A write that fails for real (RLIMIT_FSIZE: EFBIG) is one line, exit 2, nothing left."""
    import resource

    ticket = Path(__file__).resolve().parents[1] / "examples" / "lenet300-ticket.pt"
    out = tmp_path / "out"
    out.mkdir()
    argv = {
        "export": ["export", str(ticket), "--format", "dense", "-o", str(out / "m.onnx")],
        "compile": ["compile", str(ticket), "-o", str(out / "m.pt2")],
        "find": ["find", "--out", str(out / "run"), *FIND],
    }[command]
    limit = 3000 if command == "find" else 100_000

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run(
        [sys.executable, "-m", "ticketc", *argv],
        preexec_fn=limited,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0], p.stderr[-2000:]
    leftovers = [f for _, _, files in os.walk(out) for f in files if ".ticketc-" in f]
    assert leftovers == []


# --- packed directories -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["{outside}", "../../escaped.safetensors", "sub/x.safetensors"])
def test_unpack_writes_only_plain_file_names_inside_the_output(tmp_path, capsys, name):
    from safetensors.torch import save_file

    from ticketc.pack import pack

    weights = torch.randn(16, 16) * (torch.rand(16, 16) < 0.2)
    save_file({"w": weights}, str(tmp_path / "m.safetensors"))
    pack(tmp_path / "m.safetensors", tmp_path / "packed")
    index_path = next((tmp_path / "packed").glob("*.index.json"))
    index = json.loads(index_path.read_text())
    files = index["metadata"]["source"]["files"]
    outside = tmp_path / "outside.safetensors"
    files[name.format(outside=outside)] = files.pop(next(iter(files)))
    index_path.write_text(json.dumps(index))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    _one_line(capsys, ["unpack", str(tmp_path / "packed"), "-o", str(work / "dense")], "plain")
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*.safetensors")}
    assert {p.parts[0] for p in written} == {"m.safetensors", "packed"}, written
    assert not (work / "dense").exists()


# --- Hugging Face configs and ONNX tensors that lie -----------------------------------------------


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"auto_map": "evil.Model"}, "auto_map"),
        ({"auto_map": ["evil.Model"]}, "auto_map"),
        ({"architectures": {"0": "BertModel"}}, "architectures"),
        ({"model_type": ["bert"]}, "model_type"),
        ({"attn_implementation": "someone/flash-attn"}, "--trust-remote-code"),
        ({"text_config": {"_attn_implementation": "someone/kernel"}}, "--trust-remote-code"),
        ({"nested": None}, "JSON"),
    ],
)
def test_hf_config_with_wrong_types_or_hub_kernels_is_one_line(tmp_path, capsys, edit, needle):
    from safetensors.torch import save_file

    config = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 50}
    directory = tmp_path / "hf"
    directory.mkdir()
    text = json.dumps({**config, **edit}) if "nested" not in edit else None
    if text is None:  # json.dumps cannot write what it cannot read back: nest by hand
        text = json.dumps(config)[:-1] + ', "nested": ' + "[" * 50_000 + "]" * 50_000 + "}"
    (directory / "config.json").write_text(text)
    save_file({"w": torch.zeros(2, 2)}, str(directory / "model.safetensors"))
    for argv in (
        ["export", str(directory), "-o", str(tmp_path / "o.onnx")],
        ["pack", str(directory), "-o", str(tmp_path / "packed")],
    ):
        _one_line(capsys, argv, needle)
        assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "packed").exists()


def test_onnx_tensor_whose_bytes_disagree_with_its_dims_is_one_line(tmp_path, capsys):
    weight = numpy_helper.from_array(np.ones((8, 4), np.float32), "W")
    weight.raw_data = weight.raw_data[:16]  # dims [8, 4], 4 floats stored
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    _one_line(capsys, ["export", str(path), "-o", str(tmp_path / "o.onnx")], "stores 16 bytes")
    assert not (tmp_path / "o.onnx").exists()
