"""A wrong input gives ticketc's one line on stderr: no library log lines, no traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ticketc.cli import main
from ticketc.errors import UserError

TICKET = Path(__file__).resolve().parents[1] / "examples" / "lenet300-ticket.pt"


def _one_line(capfd) -> str:
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", ["export", "compile", "verify"])
@pytest.mark.parametrize("shape", ["2,5", "1,3,28,28"])
def test_wrong_input_shape_is_one_line(tmp_path, capfd, command, shape):
    out = tmp_path / ("x.pt2" if command == "compile" else "x.onnx")
    argv = [command, str(TICKET), "-o", str(out), "--input-shape", shape]
    if command == "verify":
        out.write_bytes(b"never read")
        argv = [command, str(out), "--against", str(TICKET), "--input-shape", shape]
    assert main(argv) == 2
    err = _one_line(capfd)
    assert f"--input-shape {shape}" in err and "does not run" in err
    assert [p.name for p in tmp_path.iterdir()] == ([out.name] if command == "verify" else [])


def test_library_log_records_stay_off_stderr(monkeypatch, capfd, caplog):
    """torch.export logs fake-tensor tracebacks (logger torch._subclasses.fake_tensor) before it
    raises; whatever a command's libraries log, the user sees ticketc's line only."""
    import ticketc.commands.export as export_command

    def noisy(args):
        logging.getLogger("torch._subclasses.fake_tensor").error("failed while attempting ...")
        logging.getLogger("transformers").warning("some chatter")
        raise UserError("cannot trace the model")

    monkeypatch.setattr(export_command, "run", noisy)
    assert main(["export", str(TICKET)]) == 2
    assert _one_line(capfd) == "ticketc: error: cannot trace the model"
    assert not caplog.records  # no handler saw them
    assert logging.root.manager.disable == logging.NOTSET  # restored after the command
    monkeypatch.setenv("TICKETC_DEBUG", "1")  # shown when debugging
    assert main(["export", str(TICKET)]) == 2
    assert [r.name for r in caplog.records] == ["torch._subclasses.fake_tensor", "transformers"]


def test_export_over_the_input_model_is_refused_and_keeps_it(tmp_path, capfd):
    model = tmp_path / "lenet.pt"
    model.write_bytes(TICKET.read_bytes())
    assert main(["export", str(model), "-o", str(model)]) == 2
    assert "overwrite" in _one_line(capfd)
    assert model.read_bytes() == TICKET.read_bytes()


def test_a_sample_with_nan_is_refused_not_verified(tmp_path, capfd):
    import torch

    sample = tmp_path / "nan.pt"
    torch.save(torch.full((2, 784), float("nan")), sample)
    out = tmp_path / "m.onnx"
    assert main(["export", str(TICKET), "-o", str(out), "--sample", str(sample)]) == 2
    assert "NaN" in _one_line(capfd) and not out.exists()


def test_torch_pytree_deprecation_warnings_stay_off_stderr(monkeypatch, capfd, recwarn):
    """Copying a loaded .pt2 program makes torch warn of its own deprecated LeafSpec."""
    import warnings

    import ticketc.commands.export as export_command

    def warns(args):
        message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(...)`"
        warnings.warn(message, FutureWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(export_command, "run", warns)
    assert main(["export", str(TICKET)]) == 0
    assert capfd.readouterr().err == ""
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]  # not even recorded


def test_a_library_warning_before_a_refusal_leaves_stderr_one_line(tmp_path, capfd, recwarn):
    """torch warns "LSTM with projections is not supported with oneDNN" while the export of
    such an LSTM is refused: the refusal stays the one line on stderr."""
    import torch

    from tests.models_for_tests import ProjectedLSTM

    torch.save(ProjectedLSTM().state_dict(), tmp_path / "m.pt")
    arch = "--arch=tests.models_for_tests:ProjectedLSTM"
    argv = ["export", str(tmp_path / "m.pt"), arch, "--input", "2x5x8"]
    assert main(argv) == 2
    assert "proj" in _one_line(capfd)
    assert not [w for w in recwarn if "oneDNN" in str(w.message)]  # never reaches stderr


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 8000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),
        MemoryError(),
    ],
)
def test_running_out_of_memory_is_one_line_and_exit_2(monkeypatch, capfd, error):
    """torch's allocator raises a RuntimeError, not MemoryError: both are the user's machine
    being too small for the request, not ticketc's fault (before: "internal error", exit 1)."""
    import ticketc.commands.export as export_command

    def fails(args):
        raise error

    monkeypatch.setattr(export_command, "run", fails)
    assert main(["export", str(TICKET)]) == 2
    assert _one_line(capfd).startswith("ticketc: error: out of memory")


@pytest.fixture
def mlp_state(tmp_path):
    import torch

    from tests.models_for_tests import tiny_mlp

    path = tmp_path / "sd.pt"
    torch.save(tiny_mlp().state_dict(), path)
    return path


MLP = "--arch=tests.models_for_tests:tiny_mlp"


def test_an_input_of_the_wrong_dtype_is_blamed_on_the_input(tmp_path, capfd, mlp_state):
    """Token ids into a float model: before, the export traced, wrote a file onnxruntime
    cannot load, and blamed that file."""
    out = tmp_path / "m.onnx"
    assert main(["export", str(mlp_state), MLP, "--input", "input:int64:1,20", "-o", str(out)]) == 2
    err = _one_line(capfd)
    assert "--input input:int64:1,20" in err and "does not run on the given inputs" in err, err
    assert not out.exists()


def test_an_output_under_a_regular_file_says_so(tmp_path, capfd, mlp_state):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["export", str(mlp_state), MLP, "-o", str(blocker / "m.onnx")]) == 2
    assert _one_line(capfd).endswith(f"{blocker} is not a directory")


def test_weights_of_another_shape_name_the_tensor(tmp_path, capfd, mlp_state):
    import torch

    state = torch.load(mlp_state)
    name = next(iter(state))
    state[name] = torch.zeros(7, 3)
    torch.save(state, mlp_state)
    assert main(["export", str(mlp_state), MLP, "-o", str(tmp_path / "m.onnx")]) == 2
    err = _one_line(capfd)
    assert f"size mismatch for {name}" in err and "torch.Size([7, 3])" in err, err


def test_onnxruntime_crashing_on_the_written_file_is_one_line_and_leaves_nothing(
    tmp_path, capfd, monkeypatch, mlp_state
):
    """fp16 nn.MultiheadAttention with dynamic axes segfaults onnxruntime 1.32's session
    creation: ticketc ended with exit 139, no message and its staging file left behind. The
    file's first session is now made in a child process (here one that crashes the same way)."""
    import ticketc.verify

    crash = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    dense = tmp_path / "dense.onnx"  # an ONNX file in, too: the same check
    assert main(["export", str(mlp_state), MLP, "--format", "dense", "-o", str(dense)]) == 0
    capfd.readouterr()
    monkeypatch.setattr(ticketc.verify, "_LOAD_IN_A_CHILD", crash)
    for model, flags in ((mlp_state, [MLP]), (dense, [])):
        out = tmp_path / "out" / "m.onnx"
        out.parent.mkdir(exist_ok=True)
        assert main(["export", str(model), *flags, "-o", str(out)]) == 2
        err = _one_line(capfd)
        assert err.endswith(
            f"{out}: onnxruntime crashes (SIGSEGV) creating a session for it: a "
            "fault of onnxruntime with this graph (another --dtype or opset may avoid it)"
        ), err
        assert not list(out.parent.iterdir())


def test_flags_for_a_pytorch_model_given_with_an_onnx_file_are_named(tmp_path, capfd, mlp_state):
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", str(mlp_state), MLP, "-o", str(onnx_file), "--no-verify"]) == 0
    capfd.readouterr()
    out = str(tmp_path / "again.onnx")
    assert main(["export", str(onnx_file), "--dtype", "fp16", "-o", out]) == 2
    assert _one_line(capfd).endswith(
        "--dtype does not apply to an ONNX file: its graph is used as it is"
    )
    assert main(["export", str(onnx_file), "--dtype", "fp16", "--input-names", "x", "-o", out]) == 2
    assert "--dtype, --input-names do not apply" in _one_line(capfd)


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path):
    """`ticketc inspect --json | head -1`: the pipe's reader gone, the command stops with
    128 + SIGPIPE and nothing on stderr, as the shell tools do (was "error: Broken pipe")."""
    import os
    import signal
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader has left before the first write
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ticketc", "inspect", str(TICKET), "--json"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGPIPE
    assert done.stderr == ""
