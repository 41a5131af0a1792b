"""`ticketc find` under torchrun (2 ranks, gloo on CPU) against the single-process run: one run
directory, the same masks and accuracies, and a rank killed mid-round that --resume recovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ticketc.checkpoint import load_ticket
from ticketc.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Lenet-300-100 on a user's small dataset (1,080 training rows after validation), a few hundred
# iterations per round, global batch 60 (30 per rank).
ARGS = [
    "--model",
    "lenet300",
    "--data",
    "tests.test_find_runs:small_rows",
    "--rounds",
    "2",
    "--iterations",
    "600",
    "--eval-every",
    "100",
    "--checkpoint-every",
    "100",
    "--batch-size",
    "60",
    "--no-progress",
]
LEVELS = range(3)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_gloo_available(), reason="torch.distributed without gloo"
)


def torchrun(out: Path, *extra: str, ranks: int = 2) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "-m",
        "ticketc",
        "find",
        "--out",
        str(out),
        *ARGS,
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dist")
    ddp = torchrun(base / "ddp")  # runs while the single-process run trains here
    cwd = os.getcwd()
    os.chdir(ROOT)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["find", "--out", str(base / "single"), *ARGS]) == 0
    finally:
        torch.set_num_threads(before)
        os.chdir(cwd)
    log = finish(ddp)
    (base / "ddp.log").write_text(log)
    return {"single": base / "single", "ddp": base / "ddp", "log": base / "ddp.log"}


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


def _masks(run: Path, level: int) -> dict[str, torch.Tensor]:
    return torch.load(run / f"level_{level:02d}" / "mask.pt", weights_only=True)


def _metrics(run: Path, level: int) -> dict:
    return json.loads((run / f"level_{level:02d}" / "metrics.json").read_text())


@pytest.mark.slow
def test_two_ranks_write_one_run_that_agrees_with_one_process(runs: dict[str, Path]) -> None:
    single, ddp = runs["single"], runs["ddp"]
    assert _files(ddp) == _files(single)  # one run directory, no per-rank or temporary files
    for level in LEVELS:
        a, b = _masks(single, level), _masks(ddp, level)
        agree = sum(int((a[n] == b[n]).sum()) for n in a) / sum(m.numel() for m in a.values())
        assert agree >= 0.995, (level, agree)
        ma, mb = _metrics(single, level), _metrics(ddp, level)
        assert (ma["ranks"], mb["ranks"]) == (1, 2)
        for key in ("final_val_acc", "final_test_acc"):
            diff = abs(ma["members"]["ticket"][key] - mb["members"]["ticket"][key])
            assert diff <= 0.003, (level, key, diff)  # 0.3 percentage points
    log = runs["log"].read_text()
    summary = [s for s in log.splitlines() if "ticket.pt: level" in s]
    assert len(summary) == 1 and "trained on 2 ranks" in summary[0]  # rank 0 alone prints
    assert load_ticket(ddp / "ticket.pt").metrics["ranks"] == [2]


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker process of `rank` among the children of the torchrun launcher."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_round_resumes_to_the_same_ticket(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    proc = torchrun(out)
    partial = out / "level_01" / "partial.pt"
    deadline = time.monotonic() + 300
    while not partial.exists():  # mid-round: level 1 has checkpointed, not finished
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint in level 1"
        time.sleep(0.005)
    pid = _rank_pid(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0  # torchrun stopped the job
    assert not (out / "level_01" / "metrics.json").exists() and not (out / "ticket.pt").exists()

    finish(torchrun(out, "--resume"))
    ref, got = load_ticket(runs["ddp"] / "ticket.pt"), load_ticket(out / "ticket.pt")
    assert ref.metrics["level"] == got.metrics["level"]
    for name in ref.masks:
        assert torch.equal(ref.masks[name], got.masks[name])
    for name in ref.state_dict:
        assert torch.allclose(ref.state_dict[name], got.state_dict[name], atol=1e-6), name
    for level in LEVELS:
        a, b = _metrics(runs["ddp"], level)["members"], _metrics(out, level)["members"]
        assert a["ticket"]["final_test_acc"] == b["ticket"]["final_test_acc"]


def test_a_torchrun_rank_ends_without_python_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """DDP keeps gloo's worker threads alive past destroy_process_group, and one of them freeing
    a collective's tensors during Python's shutdown aborted ranks (SIGABRT) after the search had
    finished: a rank of a multi-rank torchrun job ends by os._exit with the command's code."""
    from ticketc import cli
    from ticketc.find import distributed

    class Exited(Exception):
        pass

    def fake_exit(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert "ticketc.find.distributed" in sys.modules and not distributed.ends_without_shutdown()
    with pytest.raises(SystemExit) as plain:  # not under torchrun: Python's own exit
        cli.entry()
    assert plain.value.code == 3
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # what torchrun sets for its ranks
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited) as fast:
        cli.entry()
    assert fast.value.args == (3,)
