"""Run folders a user can grow, move, restart and read: --resume extends a run and accepts
moved data of the same md5, settings that change results are refused by name, a failed start
leaves nothing behind, a small dataset works with the default options, and every data-shape
mismatch is one line with exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_find_run import tiny_config, tiny_data
from ticketc.checkpoint import load_ticket
from ticketc.cli import build_parser, main
from ticketc.errors import UserError
from ticketc.find import FindConfig, find_tickets
from ticketc.find.ensemble import Ensemble

SMALL = "tests.test_find_runs:small_rows"
SMALL_MLP = "tests.test_find_runs:small_mlp"
SHARED_MNIST = Path(__file__).resolve().parents[1].parent.parent / "shared" / "data" / "mnist"


def small_rows() -> tuple:
    """A user's own small dataset: 1,200 training rows of 20 features, 4 classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 20, generator=g)
    y = x[:, :4].argmax(1)
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


def small_rows_again() -> tuple:
    """The same data under another name (as if the module had moved)."""
    return small_rows()


def small_rows_other() -> tuple:
    """Same shapes, other values: other data."""
    (x, y), test = small_rows()
    return (x.flip(0), y.flip(0)), test


def one_hot_rows() -> tuple:
    (x, y), (xt, yt) = small_rows()
    return (x, nn.functional.one_hot(y, 4)), (xt, yt)


def fractional_labels() -> tuple:
    (x, y), test = small_rows()
    return (x, y.float() + 0.5), test


def small_mlp(in_features: int = 20, num_classes: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, num_classes))


def two_class_mlp() -> nn.Sequential:
    return small_mlp(num_classes=2)


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _find(out: Path, *argv: str, data: str = SMALL, rounds: int = 1) -> list[str]:
    return [
        "find",
        "--out",
        str(out),
        "--model",
        SMALL_MLP,
        "--data",
        data,
        "--rounds",
        str(rounds),
        "--iterations",
        "20",
        "--no-progress",
        *argv,
    ]


def test_small_user_dataset_with_default_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_find(out)) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    # stated in the run's config: 10% of 1,200 held out, a tenth of the iterations per evaluation
    assert saved["val_size"] == 120 and saved["eval_every"] == 2
    assert saved["iterations"] == 20 and saved["lr"] == 1.2e-3  # given / the paper's
    data = json.loads((out / "data.json").read_text())
    assert (data["train"], data["val"], data["test"]) == (1080, 120, 300)
    ticket = load_ticket(out / "ticket.pt")
    assert ticket.metrics["val_size"] == 120 and ticket.metrics["selected_by"] == "val_acc"
    assert main(_find(tmp_path / "frac", "--val-size", "0.25")) == 0
    assert json.loads((tmp_path / "frac" / "config.json").read_text())["val_size"] == 300


@pytest.mark.parametrize(
    "argv, needles",
    [
        (
            ["--model", "tests.test_find_run:tiny_mlp"],
            ["--model tests.test_find_run:tiny_mlp", "--data", "shape [N, 20]"],
        ),
        (["--model", "tests.test_find_runs:two_class_mlp"], ["2 class scores", "4 classes"]),
        (["--model", "conv2"], ["--model conv2", "square images"]),
        (["--val-size", "1200"], ["--val-size 1200", "1200 training samples"]),
        (["--batch-size", "5000"], ["--batch-size 5000", "1080 training samples"]),
        (["--eval-every", "50"], ["--eval-every 50", "--iterations 20"]),
        (["--rewind", "iteration:20"], ["--rewind iteration:20", "--iterations 20"]),
        (["--rewind", "epoch:30"], ["--rewind epoch:30", "iteration 540"]),
        (["--data", "tests.test_find_runs:one_hot_rows"], ["--data", "one-hot"]),
        (["--data", "tests.test_find_runs:fractional_labels"], ["--data", "whole numbers"]),
        (["--dataset", "cifar10", "--data-dir", "/no/such/dir"], ["/no/such/dir"]),
    ],
)
def test_data_that_does_not_fit_is_one_line_exit_2_and_leaves_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needles: list[str]
) -> None:
    out = tmp_path / "run"
    args = _find(out, *argv)
    if "--dataset" in argv:  # instead of --data
        i = args.index("--data")
        del args[i : i + 2]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
    assert not out.exists()


def test_extending_a_run_equals_running_it_long_at_once(tmp_path: Path) -> None:
    data = tiny_data()
    cfg = tiny_config(controls=("reinit",))
    (long,) = find_tickets([cfg], [tmp_path / "long"], data=data, log=None, progress=False)
    short = FindConfig(**{**cfg.__dict__, "rounds": 1})
    find_tickets([short], [tmp_path / "grown"], data=data, log=None, progress=False)
    assert not (tmp_path / "grown" / "level_02").exists()
    with pytest.raises(UserError, match="--resume"):
        find_tickets([cfg], [tmp_path / "grown"], data=data, log=None, progress=False)
    (grown,) = find_tickets(
        [cfg], [tmp_path / "grown"], data=data, log=None, progress=False, resume=True
    )
    for level in range(4):
        a = tmp_path / "long" / f"level_{level:02d}"
        b = tmp_path / "grown" / f"level_{level:02d}"
        for name in ("mask.pt", "final.pt"):
            sa, sb = torch.load(a / name), torch.load(b / name)
            assert all(torch.equal(sa[k], sb[k]) for k in sa), (level, name)
        ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
        assert ma["members"] == mb["members"]
    assert (long.level, long.density) == (grown.level, grown.density)
    assert json.loads((tmp_path / "grown" / "config.json").read_text())["rounds"] == 3
    # a lower target density grows it further; fewer rounds than it finished is refused
    find_tickets(
        [FindConfig(**{**cfg.__dict__, "rounds": None, "target_density": 0.4})],
        [tmp_path / "grown"],
        data=data,
        log=None,
        progress=False,
        resume=True,
    )
    levels = sorted(p.name for p in (tmp_path / "grown").glob("level_*"))
    assert len(levels) > 4
    last = json.loads((tmp_path / "grown" / levels[-1] / "metrics.json").read_text())
    before = json.loads((tmp_path / "grown" / levels[-2] / "metrics.json").read_text())
    assert last["density"] <= 0.4 < before["density"]
    with pytest.raises(UserError, match="up to 5; --rounds 1 stops at level 1: give --rounds 5"):
        find_tickets(
            [short], [tmp_path / "grown"], data=data, log=None, progress=False, resume=True
        )


def test_resume_refuses_settings_that_change_results_and_takes_the_others(tmp_path: Path) -> None:
    data = tiny_data()
    cfg = tiny_config(rounds=2)
    find_tickets([cfg], [tmp_path], data=data, log=None, progress=False)
    for change, needle in (
        (dict(lr=2e-3), "--lr 0.001 (now 0.002)"),
        (dict(seed=3), "--seed 0 (now 3)"),
        (dict(controls=("reinit",)), "--controls none (now reinit)"),
        (dict(strategy="global"), "--strategy layerwise (now global)"),
    ):
        with pytest.raises(UserError, match="other settings") as e:
            find_tickets(
                [FindConfig(**{**cfg.__dict__, **change})],
                [tmp_path],
                data=data,
                log=None,
                progress=False,
                resume=True,
            )
        assert needle in str(e.value) and "--force" in str(e.value)
    # ticket selection and checkpointing do not change what a level trains to
    (res,) = find_tickets(
        [FindConfig(**{**cfg.__dict__, "accuracy_target": 1.0, "checkpoint_every": 7})],
        [tmp_path],
        data=data,
        log=None,
        progress=False,
        resume=True,
    )
    ticket = load_ticket(res.ticket_path)
    assert ticket.metrics["accuracy_target"] == 1.0 and not ticket.metrics["met_target"]
    assert res.level == 2  # none met: the last level, said so


def test_resume_accepts_the_same_data_from_elsewhere_and_refuses_other_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_find(out)) == 0
    moved = _find(out, "--resume", data="tests.test_find_runs:small_rows_again", rounds=2)
    assert main(moved) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["data"].endswith("small_rows_again")
    assert (out / "level_02" / "metrics.json").exists()
    capsys.readouterr()
    assert main(_find(out, "--resume", data="tests.test_find_runs:small_rows_other", rounds=2)) == 2
    err = capsys.readouterr().err
    assert "other data" in err and "md5" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST files not present")
def test_resume_after_the_mnist_folder_moved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "mnist"
    first.mkdir()
    for f in SHARED_MNIST.glob("*.gz"):
        shutil.copy(f, first / f.name)
    out = tmp_path / "run"
    base = [
        "find",
        "--out",
        str(out),
        "--dataset",
        "mnist",
        "--iterations",
        "10",
        "--batch-size",
        "100",
        "--no-progress",
    ]
    assert main([*base, "--data-dir", str(first), "--rounds", "1"]) == 0
    second = tmp_path / "elsewhere"
    first.rename(second)
    capsys.readouterr()
    assert main([*base, "--data-dir", str(second), "--rounds", "2", "--resume"]) == 0, (
        capsys.readouterr().err
    )
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(second)
    assert (out / "level_02" / "metrics.json").exists()


class _Killed(Exception):
    pass


def test_a_failed_start_leaves_nothing_and_a_run_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_data()
    cfg = tiny_config(rounds=1)
    real = Ensemble._step

    def dying(self: Ensemble, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise _Killed

    monkeypatch.setattr(Ensemble, "_step", dying)
    with pytest.raises(_Killed):  # dies before its first checkpoint
        find_tickets([cfg], [tmp_path / "new"], data=data, log=None, progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(_Killed):
        find_tickets([cfg], [tmp_path / "empty"], data=data, log=None, progress=False)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    monkeypatch.setattr(Ensemble, "_step", real)

    # a folder an older version left after a failed start (config.json, nothing trained)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "config.json").write_text(json.dumps({**cfg.to_json(), "iterations": 999}))
    said: list[str] = []
    find_tickets([cfg], [stale], data=data, log=said.append, progress=False)
    assert any("starting the run over" in s for s in said)
    assert json.loads((stale / "config.json").read_text())["iterations"] == 40

    with pytest.raises(UserError, match="--resume .*--force"):
        find_tickets([cfg], [stale], data=data, log=None, progress=False)
    marker = stale / "level_01" / "extra.txt"
    marker.write_text("x")
    find_tickets(
        [FindConfig(**{**cfg.__dict__, "lr": 2e-3})],
        [stale],
        data=data,
        log=None,
        progress=False,
        force=True,
    )
    assert not marker.exists()
    assert json.loads((stale / "config.json").read_text())["lr"] == 2e-3

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a ticketc find run"):
        find_tickets([cfg], [foreign], data=data, log=None, progress=False, force=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_progress_lines_when_not_a_terminal_and_labelled_accuracies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main([a for a in _find(out) if a != "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    evals = [i for i, s in enumerate(lines) if "iteration 2/20" in s]
    done = [i for i, s in enumerate(lines) if s.startswith("seed 0 level 0")]
    assert evals and done and evals[0] < done[0]  # a line per evaluation, before the level ends
    assert sum("level 0 (100.0% of weights): iteration" in s for s in lines) == 10
    assert "validation accuracy" in lines[evals[0]] and "left" in lines[evals[0]]
    last = lines[-1]
    assert "validation accuracy" in last and "its test accuracy" in last
    assert "dense" in last and "points" in last


def test_a_long_stretch_between_evaluations_still_prints_a_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ticketc.find import progress

    now = {"t": 0.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now["t"])
    lines: list[str] = []
    with progress.LevelProgress("lines", "level 3", 0, 1000, lines.append, [0]) as p:
        for it in range(1, 400):
            now["t"] = it * 0.5  # 2 iterations a second
            p.iteration(it)
    # a line every HEARTBEAT_S seconds (60 s: every 120 iterations), none in between
    assert [s.split(",")[0] for s in lines] == [
        f"level 3: iteration {it}/1000" for it in (120, 240, 360)
    ]
    assert lines[0].endswith("60 s elapsed, 7 min left")  # 880 iterations at 2/s


def _find_help() -> dict[str, str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    find = sub.choices["find"]  # type: ignore[union-attr,index]
    return {a.option_strings[-1]: a.help or "" for a in find._actions if a.option_strings}


def test_find_help_comes_from_the_config_dataclass() -> None:
    import dataclasses

    helps = _find_help()
    for f in dataclasses.fields(FindConfig):
        if "help" not in f.metadata:
            continue
        text = helps["--" + f.name.replace("_", "-")]
        assert text.startswith(f.metadata["help"].replace("%", "%%"))
        if f.type != "bool":
            shown = f.metadata["shown"] or ("none" if f.default is None else str(f.default))
            assert text.endswith(f"(default: {shown.replace('%', '%%')})"), f.name
    assert "percentage points" in helps["--max-accuracy-drop"]
    assert helps["--max-accuracy-drop"].endswith("(default: 0.005)")
    assert helps["--controls"].endswith("(default: none)")
    assert "(default: 0.1 (the paper's; conv6 0.15))" in helps["--conv-rate"]
