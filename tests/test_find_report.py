"""`ticketc report`: one experiment at a time, its own output folder, plots that read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_find_run import tiny_config, tiny_data
from ticketc.cli import main
from ticketc.find import FindConfig, find_tickets
from ticketc.find.report import (
    NO_CONTROLS,
    collect,
    experiment,
    metric_figure,
    size_figure,
)


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeds 0 and 1 of one experiment (with a control), seed 2 with fewer iterations, and a
    run without controls."""
    root = tmp_path_factory.mktemp("runs")
    data = tiny_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tiny_config(rounds=2, iterations=20, controls=("reinit",))
    find_tickets(
        [base, FindConfig(**{**base.__dict__, "seed": 1})],
        [root / "seed0", root / "seed1"],
        data=data,
        log=None,
        progress=False,
    )
    find_tickets(
        [FindConfig(**{**base.__dict__, "seed": 2, "iterations": 30})],
        [root / "short"],
        data=data,
        log=None,
        progress=False,
    )
    find_tickets(
        [FindConfig(**{**base.__dict__, "controls": ()})],
        [root / "plain"],
        data=data,
        log=None,
        progress=False,
    )
    torch.set_num_threads(threads)
    return {p.name: p for p in root.iterdir()}


def test_runs_with_other_settings_or_the_same_seed_are_refused(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["report", str(runs["seed0"]), str(runs["short"]), "-o", str(tmp_path / "r"), "--no-export"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--iterations" in err and "20" in err and "30" in err and "separately" in err
    code = main(
        ["report", str(runs["seed0"]), str(runs["plain"]), "-o", str(tmp_path / "r"), "--no-export"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--controls" in err and "seed 0" not in err
    code = main(
        ["report", str(runs["seed0"]), str(runs["seed0"]), "-o", str(tmp_path / "r"), "--no-export"]
    )
    assert code == 2 and "both seed 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_report_writes_its_own_folder_and_leaves_no_stale_file(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in runs["plain"].iterdir())
    assert main(["report", str(runs["plain"]), "--no-export"]) == 0
    out = runs["plain"].parent / "plain-report"
    assert (out / "accuracy.png").stat().st_size > 0
    assert sorted(p.name for p in runs["plain"].iterdir()) == before  # the run is untouched
    assert NO_CONTROLS in capsys.readouterr().out
    assert NO_CONTROLS in (out / "report.md").read_text()
    (out / "export_size.png").write_bytes(b"an older report's plot")
    assert main(["report", str(runs["plain"]), "--no-export"]) == 0
    assert not (out / "export_size.png").exists()
    assert main(["report", str(runs["seed0"]), str(runs["seed1"])]) == 2  # several: -o needed
    assert "-o" in capsys.readouterr().err
    code = main(["report", str(runs["seed0"]), "-o", str(runs["seed0"] / "report")])
    assert code == 2 and "inside the run directory" in capsys.readouterr().err
    assert (
        main(
            [
                "report",
                str(runs["seed0"]),
                str(runs["seed1"]),
                "-o",
                str(tmp_path / "two"),
                "--no-export",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    level1 = report["levels"][1]
    assert level1["ticket"]["final_test_acc"]["n"] == 2 and level1["reinit"]["final_val_acc"]["n"]
    saved = json.loads((tmp_path / "two" / "report.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["settings"]["iterations"] == 20
    assert NO_CONTROLS not in (tmp_path / "two" / "report.md").read_text()


def test_plots_have_a_title_every_level_a_dense_baseline_and_plain_ticks(
    runs: dict[str, Path],
) -> None:
    import matplotlib.pyplot as plt

    dirs = [runs["seed0"], runs["seed1"]]
    rows, exp = collect(dirs), experiment(dirs)
    fig = metric_figure(rows, "final_test_acc", "test accuracy at the end of training (%)", exp)
    ax = fig.axes[0]
    assert "seed0, seed1" in ax.get_title() and "2 seeds" in ax.get_title()
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [f"{round(100 * r.density, 1):g}" for r in rows]  # one per level
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "dense network (level 0)" in labels
    assert any(label.startswith("control: same mask") for label in labels)
    dense = [ln for ln in ax.get_lines() if ln.get_label() == "dense network (level 0)"][0]
    assert dense.get_ydata()[0] == pytest.approx(100 * rows[0].stat("ticket", "final_test_acc")[0])
    plt.close(fig)
    for r, size in zip(rows, (1_070_000, 860_000, 700_000), strict=True):
        r.export_bytes = size
    fig = size_figure(rows, 1_080_000, exp)
    ax = fig.axes[0]
    yticks = [t.get_text() for t in ax.get_yticklabels()]
    assert len(yticks) >= 4 and all(t.replace(",", "").isdigit() for t in yticks), yticks
    assert any("dense ONNX export" in t.get_text() for t in ax.get_legend().get_texts())
    assert "seed0" in ax.get_title()
    plt.close(fig)


def test_levels_left_out_or_not_measured_are_said(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["plain"], run)
    levels = sorted(p.name for p in run.glob("level_*"))
    assert len(levels) >= 3, levels
    (run / levels[-1] / "final.pt").write_bytes(b"not a checkpoint")  # the size cannot be taken
    shutil.rmtree(run / levels[1])
    (run / levels[1]).write_text("a file where a level folder was")
    argv = ["report", str(run), "-o", str(tmp_path / "out"), "--json"]
    assert main([*argv, "--arch", "tests.test_find_run:tiny_mlp"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    last = int(levels[-1][len("level_") :])
    assert any(n.startswith("level 1: no readable") for n in notes), notes
    assert any(n.startswith(f"level {last}: export size not measured") for n in notes), notes
    assert "Note: level 1" in (tmp_path / "out" / "report.md").read_text()
