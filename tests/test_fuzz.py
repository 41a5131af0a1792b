"""Corrupted inputs of every kind through every reader: success, or exit 2 with one line.

A seeded sample of what `benchmarks/fuzz_readers.py` runs by the thousand: truncated,
bit-flipped, zeroed, swapped and appended bytes of tickets, state dicts, .pt2 programs
(torch.export and compiled by ticketc) and ONNX files (portable, sparse initializers, dense
with external data). Never exit 1, a traceback, a second stderr line, a hang, a partial output
or a stray staging folder.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.fuzzing import (
    CLEAN,
    MUTATIONS,
    build_artifacts,
    fuzz_case,
    run_in_process,
    run_subprocess,
)

KINDS = (
    "ticket",
    "state_dict",
    "pt2",
    "compiled",
    "onnx-portable",
    "onnx-sparse-initializer",
    "onnx-dense",
)
SIDE_FILES = ("mask", "sample")  # --mask / --sample files next to a sound model


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_artifacts(tmp_path_factory.mktemp("good"))


def _campaign(
    good: dict[str, Path],
    tmp_path: Path,
    kind: str,
    count: int,
    readers: list[str],
    seed: int,
    subprocess_every: int = 0,
) -> list[str]:
    rng = random.Random(f"{kind}-{seed}")
    bad = []
    runs = [0]

    def run(argv: list[str]) -> tuple[int, str]:
        runs[0] += 1
        if subprocess_every and runs[0] % subprocess_every == 0:
            return run_subprocess(argv, 120)
        return run_in_process(argv, 120, tmp_path / "stderr.txt")

    for i in range(count):
        case = tmp_path / f"{kind}-{i}"
        case.mkdir()
        mutation = MUTATIONS[i % len(MUTATIONS)]
        for reader, verdict, err in fuzz_case(
            kind, good[kind], good, case, mutation, rng, readers, run
        ):
            if verdict not in CLEAN:
                bad.append(f"{reader} {mutation} #{i}: {verdict} | {err.strip()[-400:]}")
    return bad


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_fuzzed(good: dict[str, Path], tmp_path: Path, kind: str) -> None:
    assert _campaign(good, tmp_path, kind, 15, ["inspect"], seed=1) == []


@pytest.mark.parametrize("kind", SIDE_FILES)
def test_side_files_fuzzed(good: dict[str, Path], tmp_path: Path, kind: str) -> None:
    assert _campaign(good, tmp_path, kind, 8, ["inspect", "export", "verify"], seed=4) == []


@pytest.mark.parametrize("kind", ("ticket", "state_dict", "pt2", "compiled"))
def test_zip_needing_an_unknown_version_is_one_line(
    good: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    """Found by the fuzz run: an archive saying it needs zip 9.0 made zipfile raise
    NotImplementedError, an internal error through compile's plan reader."""
    readers = ["inspect", "export", "compile"]
    run = lambda argv: run_in_process(argv, 120, tmp_path / "stderr.txt")  # noqa: E731
    case = tmp_path / "case"
    case.mkdir()
    verdicts = fuzz_case(
        kind, good[kind], good, case, "zip-version", random.Random(0), readers, run
    )
    assert [r for r, _, _ in verdicts] == readers
    assert [(r, v) for r, v, _ in verdicts if v not in CLEAN] == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_export_and_verify_fuzzed(good: dict[str, Path], tmp_path: Path, kind: str) -> None:
    assert _campaign(good, tmp_path, kind, 6, ["export", "verify"], seed=2) == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("ticket", "state_dict", "pt2", "compiled"))
def test_compile_fuzzed(good: dict[str, Path], tmp_path: Path, kind: str) -> None:
    assert _campaign(good, tmp_path, kind, 5, ["compile"], seed=5) == []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import contextlib
    import os

    from tests.fuzzing import FIND
    from ticketc.cli import main

    run = tmp_path_factory.mktemp("find") / "run"
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        assert main(["find", "--out", str(run), *FIND]) == 0
    return run


@pytest.mark.slow
def test_run_directories_fuzzed(finished_run: Path, tmp_path: Path) -> None:
    """A corrupted file in a run directory, read by `report` and by `find --resume`."""
    from tests.fuzzing import fuzz_run_dir

    rng = random.Random(6)
    bad = []
    for i in range(10):
        case = tmp_path / str(i)
        case.mkdir()
        mutation = MUTATIONS[i % len(MUTATIONS)]
        for reader, verdict, err in fuzz_run_dir(
            finished_run,
            case,
            mutation,
            rng,
            ["report", "resume"],
            lambda argv: run_in_process(argv, 120, tmp_path / "stderr.txt"),
        ):
            if verdict not in CLEAN:
                bad.append(f"{reader} {mutation} #{i}: {verdict} | {err.strip()[-400:]}")
    assert bad == []


@pytest.mark.slow
def test_fuzzed_in_real_processes(good: dict[str, Path], tmp_path: Path) -> None:
    """Exactly one stderr line and no traceback also when nothing captures Python's logging."""
    bad = []
    for kind in ("ticket", "pt2", "onnx-portable"):
        bad += _campaign(good, tmp_path, kind, 1, ["inspect"], seed=3, subprocess_every=1)
    assert bad == []


def test_good_artifacts_pass(good: dict[str, Path], tmp_path: Path) -> None:
    """The unmutated files succeed, so that a reader refusing everything cannot pass."""
    from tests.fuzzing import readers_for

    for kind in KINDS + SIDE_FILES:
        out = tmp_path / kind
        out.mkdir()
        readers = ["inspect", "verify"] + (["export"] if kind in SIDE_FILES else [])
        for reader, argv, _ in readers_for(kind, good[kind], good, out, readers):
            rc, err = run_in_process(argv, 120, tmp_path / "stderr.txt")
            assert rc == 0, (kind, reader, err)
