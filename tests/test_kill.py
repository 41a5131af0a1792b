"""SIGKILL at random moments of `export` and `find`: the output path holds the old or the new
file, nothing a killed run left accumulates, and `find --resume` ends bit-identical."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ticketc.atomic import atomic_path, remove_stale, staging_dir
from ticketc.checkpoint import Ticket, load_ticket, save_ticket
from ticketc.models import lenet300

REPO = Path(__file__).resolve().parents[1]
FIND_ARGS = [
    "--model",
    "tests.test_find_run:tiny_mlp",
    "--data",
    "tests.test_find_run:tiny_pairs",
    "--rounds",
    "2",
    "--iterations",
    "30",
    "--batch-size",
    "30",
    "--eval-every",
    "10",
    "--checkpoint-every",
    "10",
    "--val-size",
    "60",
    "--controls",
    "reinit",
    "--no-progress",
    "--threads",
    "1",
]


def _leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".ticketc-" in n)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_entries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    from ticketc import atomic

    host = atomic._host()
    dead = _dead_pid()
    stale_dir = tmp_path / f".out.onnx.ticketc-{host}-{dead}-0-abcd.tmp"
    stale_dir.mkdir()
    (stale_dir / "out.onnx").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".t.pt.ticketc-{host}-{dead}-0-ef01.tmp"
    stale_file.write_bytes(b"y")
    # kept: a live process (ours, with its true start time), another host, foreign names
    live = tmp_path / f".a.ticketc-{host}-{os.getpid()}-{atomic._start_time(os.getpid())}-1.tmp"
    live.write_bytes(b"z")
    other_host = tmp_path / f".b.ticketc-elsewhere-{dead}-0-2.tmp"
    other_host.write_bytes(b"z")
    foreign = [tmp_path / ".out.onnx.abc123", tmp_path / f".c.ticketc-{host}-x-0-3.tmp"]
    for f in foreign:
        f.write_bytes(b"z")
    with atomic_path(tmp_path / "t.pt") as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "t.pt").read_bytes() == b"new"
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and other_host.exists() and all(f.exists() for f in foreign)


def test_reused_pid_with_another_start_time_is_stale(tmp_path: Path) -> None:
    from ticketc import atomic

    if atomic._start_time(os.getpid()) is None:
        pytest.skip("no /proc: start times are unknown")
    # our own pid, but a start time that is not ours: the pid was reused by this process
    entry = tmp_path / f".t.ticketc-{atomic._host()}-{os.getpid()}-1-aa.tmp"
    entry.write_bytes(b"old")
    assert remove_stale(tmp_path) == [entry]


def test_staging_folder_is_removed_on_failure_and_old_file_kept(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), staging_dir(out) as stage:
        (stage / "m.onnx").write_bytes(b"half")
        raise RuntimeError("boom")
    assert out.read_bytes() == b"old" and _leftovers(tmp_path) == []


def _ticket(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = lenet300(num_classes=4, in_features=20)
    masks = {n: torch.rand_like(p) < 0.2 for n, p in model.named_parameters() if "weight" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    save_ticket(
        Ticket(
            "ticketc.models:lenet300",
            model.state_dict(),
            masks,
            model.state_dict(),
            arch_kwargs={"num_classes": 4, "in_features": 20},
        ),
        path,
    )


def _ticketc(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ticketc", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], delay: float, limit: float = 120
) -> None:
    """SIGKILL `proc` `delay` seconds after `ready()` first holds (or when it ends)."""
    start = time.monotonic()
    while proc.poll() is None and not ready() and time.monotonic() - start < limit:
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "kills"), [("portable", 4), ("dense", 2)])
def test_export_killed_at_random_moments(tmp_path: Path, fmt: str, kills: int) -> None:
    from ticketc.cli import main

    old_src, new_src = tmp_path / "old.pt", tmp_path / "new.pt"
    _ticket(old_src, 0)
    _ticket(new_src, 1)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.onnx"
    common = ["--format", fmt, "--input-shape", "1,20", "--json"]
    # the new file as an uninterrupted run writes it (export is deterministic)
    ref = tmp_path / "ref"
    ref.mkdir()
    assert main(["export", str(new_src), "-o", str(ref / "m.onnx"), *common]) == 0
    new = {f.name: f.read_bytes() for f in ref.iterdir()}
    assert main(["export", str(old_src), "-o", str(out), *common]) == 0
    old = {f.name: f.read_bytes() for f in out_dir.iterdir()}
    assert new != old
    rng = random.Random(fmt)
    # Half the kills land anywhere, half just after the staging folder appears: the window
    # between writing the stage and moving it into place is short.
    for i in range(kills):
        proc = _ticketc("export", str(new_src), "-o", str(out), *common)
        if i % 2:
            _kill_when(proc, lambda: bool(_leftovers(out_dir)), rng.uniform(0.0, 0.3))
        else:
            _kill_when(proc, lambda: True, rng.uniform(0.5, 6.0))
        files = {f.name: f.read_bytes() for f in out_dir.iterdir() if not f.name.startswith(".")}
        assert files in (old, new), sorted(files)
        if files == new:  # start again from the old file, to test the swap once more
            for f in out_dir.iterdir():
                if not f.name.startswith("."):
                    f.unlink()
            for name, data in old.items():
                (out_dir / name).write_bytes(data)
        assert len(_leftovers(out_dir)) <= 1  # at most the one the last kill left
    assert main(["export", str(new_src), "-o", str(out), *common]) == 0
    assert {f.name: f.read_bytes() for f in out_dir.iterdir()} == new  # nothing left behind


def _ticket_bits(path: Path) -> dict[str, torch.Tensor]:
    t = load_ticket(path)
    return {
        **{f"w.{k}": v for k, v in t.state_dict.items()},
        **{f"m.{k}": v for k, v in t.masks.items()},
        **{f"r.{k}": v for k, v in t.rewind_state_dict.items()},
    }


@pytest.mark.slow
def test_find_killed_at_random_moments_resumes_bit_identical(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    proc = _ticketc("find", "--out", str(ref), *FIND_ARGS)
    assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
    run = tmp_path / "run"
    rng = random.Random(0)
    args = ["find", "--out", str(run), *FIND_ARGS, "--resume"]  # --resume also starts a run
    for _ in range(4):
        _kill_when(_ticketc(*args), lambda: (run / "config.json").exists(), rng.uniform(0, 1.5))
        if (run / "ticket.pt").exists():
            break
    proc = _ticketc(*args)
    assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
    a, b = _ticket_bits(ref / "ticket.pt"), _ticket_bits(run / "ticket.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for level in ("level_00", "level_01", "level_02"):
        ma = json.loads((ref / level / "metrics.json").read_text())
        mb = json.loads((run / level / "metrics.json").read_text())
        assert ma["members"] == mb["members"]
    for folder, _, files in os.walk(run):
        assert not [f for f in files if ".ticketc-" in f], folder
        assert not [f for f in files if f == "partial.pt"], folder
