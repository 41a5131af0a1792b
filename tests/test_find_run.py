"""The lottery loop end to end on a tiny problem: masks, rewinding, zeros, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ticketc.checkpoint import load_ticket
from ticketc.cli import main
from ticketc.data import Splits, TensorSplit
from ticketc.find import FindConfig, find_tickets
from ticketc.find import run as run_module
from ticketc.find.ensemble import Ensemble
from ticketc.find.train import BatchOrder
from ticketc.models import conv2, lenet300

TINY = "tests.test_find_run:tiny_mlp"
PRUNED = ("1.weight", "3.weight", "5.weight")


def tiny_mlp(in_features: int = 12, num_classes: int = 10) -> torch.nn.Sequential:
    """A user model referenced as module.path:factory (small, so the tests stay fast)."""
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(in_features, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, num_classes),
    )


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    # Tiny matmuls: threads only add overhead (and thrash on a shared CPU).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_data(features: int = 12, n: int = 360) -> Splits:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 120, features, generator=g)
    y = (x[:, :3].argmax(1)).long()  # learnable: the largest of the first three features
    return Splits(
        "tiny",
        TensorSplit(x[:n], y[:n]),
        TensorSplit(x[n : n + 60], y[n : n + 60]),
        TensorSplit(x[n + 60 :], y[n + 60 :]),
        num_classes=10,
    )


def tiny_config(**kw: object) -> FindConfig:
    # csr_below=0.9: levels >= 1 train the hidden layers in CSR form (the output layer from
    # level 2), so every test covers the CSR path and a mixed dense/CSR MLP
    base = dict(
        model=TINY,
        rounds=3,
        iterations=40,
        batch_size=30,
        lr=1e-3,
        eval_every=10,
        checkpoint_every=10,
        csr_below=0.9,
    )
    base.update(kw)
    return FindConfig(**base)  # type: ignore[arg-type]


def _load(p: Path) -> dict:
    return torch.load(p, weights_only=True)


def test_levels_masks_rewind_and_zeros(tmp_path: Path) -> None:
    cfg = tiny_config(controls=("reinit", "random-mask"))
    (res,) = find_tickets([cfg], [tmp_path], data=tiny_data(), log=None, progress=False)
    init = _load(tmp_path / "init.pt")
    prev = None
    for level in range(4):
        d = tmp_path / f"level_{level:02d}"
        mask, final, rewind = _load(d / "mask.pt"), _load(d / "final.pt"), _load(d / "rewind.pt")
        for name, m in mask.items():
            assert torch.equal(rewind[name], init[name])  # reset to the original init, bit for bit
            assert bool((final[name][~m] == 0).all())  # pruned weights exactly zero after training
            assert not torch.equal(final[name][m], init[name][m])  # survivors did train
            if prev is not None:
                assert not bool((m & ~prev[name]).any())  # nested
                assert int(m.sum()) < int(prev[name].sum())
        prev = mask
        metrics = json.loads((d / "metrics.json").read_text())
        kinds = set(metrics["members"])
        assert kinds == ({"ticket"} if level == 0 else {"ticket", "reinit", "random-mask"})
        assert [r["iteration"] for r in metrics["members"]["ticket"]["history"]] == [10, 20, 30, 40]
        if level:
            controls = _load(d / "controls.pt")
            assert torch.equal(controls["reinit"]["masks"]["1.weight"], mask["1.weight"])
            rnd = controls["random-mask"]["masks"]["1.weight"]
            assert int(rnd.sum()) == int(mask["1.weight"].sum()) and not torch.equal(
                rnd, mask["1.weight"]
            )
    ticket = load_ticket(res.ticket_path)
    assert ticket.arch == TINY and ticket.rewind_point == "init"
    for name, m in ticket.masks.items():
        assert torch.equal(ticket.rewind_state_dict[name], init[name] * m)
    model = ticket.build(TINY)  # a user architecture: built only from the caller's own reference
    assert model(torch.randn(2, 12)).shape == (2, 10)


def test_ensemble_starts_from_masked_rewind_point() -> None:
    data = tiny_data()
    state = tiny_mlp().state_dict()
    masks = {n: torch.rand_like(state[n]) > 0.5 for n in PRUNED}
    ens = Ensemble(tiny_mlp(), [state], [masks], lr=1e-3)
    start = ens.member_state(0)
    for n, m in masks.items():
        assert torch.equal(start[n][m], state[n][m]) and bool((start[n][~m] == 0).all())
    order = BatchOrder([0], 0, len(data.train), 30)
    for t in range(5):
        idx = order.indices(t)
        ens.step(data.train.x[idx], data.train.y[idx])
    after = ens.member_state(0)
    assert all(bool((after[n][~m] == 0).all()) for n, m in masks.items())


def test_rewind_to_iteration_snapshot(tmp_path: Path) -> None:
    data = tiny_data()
    cfg = tiny_config(rewind="iteration:7", rounds=1)
    find_tickets([cfg], [tmp_path], data=data, log=None, progress=False)
    snap = _load(tmp_path / "rewind_point.pt")
    # replay level 0 for 7 iterations independently: the snapshot must match bit for bit
    init = _load(tmp_path / "init.pt")
    full = {n: torch.ones_like(init[n], dtype=torch.bool) for n in PRUNED}
    ens = Ensemble(tiny_mlp(), [init], [full], lr=1e-3)
    order = BatchOrder([0], 0, len(data.train), 30)
    for t in range(7):
        idx = order.indices(t)
        ens.step(data.train.x[idx], data.train.y[idx])
    for n, v in ens.member_state(0).items():
        assert torch.equal(v, snap[n])
    level1 = tmp_path / "level_01"
    assert all(torch.equal(_load(level1 / "rewind.pt")[n], snap[n]) for n in snap)
    hist = json.loads((level1 / "metrics.json").read_text())["members"]["ticket"]["history"]
    assert hist[0]["iteration"] == 10 and hist[-1]["iteration"] == 40
    assert load_ticket(tmp_path / "ticket.pt").rewind_point == "iteration:7"


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at_step", [25, 57, 95])
def test_resume_gives_the_same_ticket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_at_step: int
) -> None:
    data = tiny_data()
    cfg = tiny_config(controls=("reinit",), checkpoint_every=15)
    (ref,) = find_tickets([cfg], [tmp_path / "ref"], data=data, log=None, progress=False)

    calls = {"n": 0}
    real_step = Ensemble._step  # every training step goes through it

    def dying_step(self: Ensemble, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == kill_at_step:
            raise _Killed
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Ensemble, "_step", dying_step)
    with pytest.raises(_Killed):
        find_tickets([cfg], [tmp_path / "b"], data=data, log=None, progress=False)
    monkeypatch.setattr(Ensemble, "_step", real_step)
    with pytest.raises(Exception, match="--resume"):
        find_tickets([cfg], [tmp_path / "b"], data=data, log=None, progress=False)
    (res,) = find_tickets([cfg], [tmp_path / "b"], data=data, log=None, progress=False, resume=True)
    a, b = load_ticket(ref.ticket_path), load_ticket(res.ticket_path)
    for name in a.state_dict:
        assert torch.equal(a.state_dict[name], b.state_dict[name])
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name])
    for level in range(4):
        ma = json.loads((tmp_path / "ref" / f"level_{level:02d}" / "metrics.json").read_text())
        mb = json.loads((tmp_path / "b" / f"level_{level:02d}" / "metrics.json").read_text())
        assert ma["members"] == mb["members"]


def test_seeds_trained_together_match_alone(tmp_path: Path) -> None:
    data = tiny_data()
    cfgs = [tiny_config(rounds=1, seed=s) for s in (0, 1)]
    together = find_tickets(
        cfgs, [tmp_path / "a0", tmp_path / "a1"], data=data, log=None, progress=False
    )
    (alone,) = find_tickets([cfgs[1]], [tmp_path / "b1"], data=data, log=None, progress=False)
    ta, tb = load_ticket(together[1].ticket_path), load_ticket(alone.ticket_path)
    for name in ta.state_dict:
        torch.testing.assert_close(ta.state_dict[name], tb.state_dict[name], rtol=1e-4, atol=1e-5)


def test_mlp_fast_path_matches_autograd() -> None:
    g = torch.Generator().manual_seed(3)
    states = [lenet300(in_features=12).state_dict() for _ in range(2)]
    masks = [
        {n: torch.rand(s[n].shape, generator=g) > 0.3 for n in ("1.weight", "3.weight", "5.weight")}
        for s in states
    ]
    fast = Ensemble(lenet300(in_features=12), states, masks, lr=1e-3)
    slow = Ensemble(lenet300(in_features=12), states, masks, lr=1e-3)
    slow.mlp = None  # force the torch.func path
    x, y = torch.randn(2, 30, 12, generator=g), torch.randint(0, 10, (2, 30), generator=g)
    for _ in range(3):
        lf, cf = fast.step(x, y)
        ls, cs = slow.step(x, y)
        torch.testing.assert_close(lf, ls)
        assert torch.equal(cf, cs)
    for i in range(2):
        for n, v in fast.member_state(i).items():
            torch.testing.assert_close(v, slow.member_state(i)[n], rtol=1e-4, atol=1e-6)


def test_conv_model_through_vmap(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (120,), generator=g)
    data = Splits(
        "img",
        TensorSplit(x[:90], y[:90]),
        TensorSplit(x[:0], y[:0]),
        TensorSplit(x[90:], y[90:]),
        10,
    )
    cfg = FindConfig(
        model="conv2",
        rounds=1,
        iterations=4,
        batch_size=30,
        eval_every=2,
        checkpoint_every=2,
        val_size=0,
        controls=("reinit",),
    )
    (res,) = find_tickets([cfg], [tmp_path], data=data, log=None, progress=False)
    ticket = load_ticket(res.ticket_path)
    assert ticket.arch_kwargs == {"num_classes": 10, "in_channels": 3, "image_size": 8}
    assert isinstance(ticket.build(), type(conv2()))
    mask = _load(tmp_path / "level_01" / "mask.pt")
    assert mask["0.weight"].float().mean().item() == pytest.approx(0.9, abs=1e-3)  # conv: 10%
    assert mask["6.weight"].float().mean().item() == pytest.approx(0.8, abs=1e-3)  # fc: 20%
    final = _load(tmp_path / "level_01" / "final.pt")
    assert bool((final["0.weight"][~mask["0.weight"]] == 0).all())


def test_target_density_and_one_shot(tmp_path: Path) -> None:
    data = tiny_data()
    (res,) = find_tickets(
        [tiny_config(rounds=None, target_density=0.55, iterations=10)],
        [tmp_path / "t"],
        data=data,
        log=None,
        progress=False,
    )
    assert sorted(p.name for p in (tmp_path / "t").glob("level_*")) == [
        "level_00",
        "level_01",
        "level_02",
        "level_03",
    ]
    (one,) = find_tickets(
        [tiny_config(one_shot=True, iterations=10)],
        [tmp_path / "o"],
        data=data,
        log=None,
        progress=False,
    )
    assert sorted(p.name for p in (tmp_path / "o").glob("level_*")) == ["level_00", "level_01"]
    m = json.loads((tmp_path / "o" / "level_01" / "metrics.json").read_text())
    assert m["layer_density"]["1.weight"] == pytest.approx(0.512, abs=3e-3)


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    data = tiny_data()
    find_tickets(
        [tiny_config(rounds=0, iterations=5, eval_every=5)],
        [tmp_path],
        data=data,
        log=None,
        progress=False,
    )
    with pytest.raises(Exception, match=r"other settings: --iterations 5 \(now 6\)"):
        find_tickets(
            [tiny_config(rounds=0, iterations=6, eval_every=5)],
            [tmp_path],
            data=data,
            log=None,
            progress=False,
            resume=True,
        )


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--rounds", "-2"], "rounds"),
        (["--model", "nosuchnet"], "nosuchnet"),
        (["--controls", "reinit,shuffle"], "shuffle"),
        (["--rewind", "later"], "later"),
        (["--dataset", "cifar10"], "cifar10"),
        (["--model", "nosuchmodule.x:f"], "nosuchmodule"),
    ],
)
def test_cli_bad_arguments_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code = main(
        [
            "find",
            "--out",
            str(tmp_path / "r"),
            "--iterations",
            "2",
            "--rounds",
            "0",
            "--no-progress",
            *argv,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err


def test_cli_find_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_data()
    monkeypatch.setattr(run_module, "load_data", lambda cfg: data)
    out = tmp_path / "run"
    code = main(
        [
            "find",
            "--out",
            str(out),
            "--rounds",
            "2",
            "--iterations",
            "20",
            "--batch-size",
            "30",
            "--eval-every",
            "10",
            "--controls",
            "reinit",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert Path(result["ticket"]) == out / "ticket.pt" and 0 < result["density"] <= 1
    assert main(["find", "--out", str(out), "--rounds", "2", "--iterations", "20"]) == 2
    code = main(["report", str(out), "--no-export", "--json"])
    report = json.loads(capsys.readouterr().out)
    rows = report["levels"]
    assert code == 0 and [r["level"] for r in rows] == [0, 1, 2]
    assert rows[1]["reinit"]["final_test_acc"]["n"] == 1
    assert Path(report["out"]) == tmp_path / "run-report"  # beside the run, never inside it
    for name in ("report.md", "report.json", "accuracy.png", "early_stop.png"):
        assert (tmp_path / "run-report" / name).stat().st_size > 0
    assert not (out / "report").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("kept", [(0.4, 0.4, 0.4), (0.7, 0.4, 0.7), (0.4, 0.7, 0.4)])
def test_csr_layers_match_dense_and_round_trip(kept: tuple[float, ...]) -> None:
    g = torch.Generator().manual_seed(5)
    states = [tiny_mlp().state_dict() for _ in range(3)]

    def exactly(shape: torch.Size, k: float) -> torch.Tensor:  # round(k * numel) survivors
        rank = torch.rand(shape, generator=g).flatten().argsort().argsort()
        return (rank < round(k * rank.numel())).view(shape)

    masks = [{n: exactly(s[n].shape, k) for n, k in zip(PRUNED, kept, strict=True)} for s in states]
    # SGD: the trajectories stay as close as the gradients (Adam turns a 1e-9 difference in a
    # near-zero gradient into a step of ~lr/10, so its trajectories drift apart legitimately)
    dense = Ensemble(tiny_mlp(), states, masks, lr=1e-2, optimizer="sgd")
    sparse = Ensemble(tiny_mlp(), states, masks, lr=1e-2, optimizer="sgd", sparse_below=0.5)
    in_csr = {n for n, k in zip(PRUNED, kept, strict=True) if k < 0.5}
    assert not dense.sparse and set(sparse.sparse) == in_csr
    for _ in range(4):
        x, y = torch.randn(3, 30, 12, generator=g), torch.randint(0, 10, (3, 30), generator=g)
        ld, _ = dense.step(x, y)
        ls, _ = sparse.step(x, y)
        torch.testing.assert_close(ld, ls)
    for i in range(3):
        sd, ss = dense.member_state(i), sparse.member_state(i)
        for n in sd:
            torch.testing.assert_close(sd[n], ss[n], rtol=1e-4, atol=1e-6)
        assert all(bool((ss[n][~masks[i][n]] == 0).all()) for n in PRUNED)
    torch.testing.assert_close(dense.evaluate(x[0], y[0])[0], sparse.evaluate(x[0], y[0])[0])
    sparse = Ensemble(tiny_mlp(), states, masks, lr=1e-3, sparse_below=0.5)
    for _ in range(3):
        sparse.step(x, y)
    assert all(
        bool((sparse.member_state(i)[n][~masks[i][n]] == 0).all()) for i in range(3) for n in PRUNED
    )
    # checkpoint of members 0 and 1..2 separately, reloaded: the next step is identical
    copy = Ensemble(tiny_mlp(), states, masks, lr=1e-3, sparse_below=0.5)
    copy.load_states([sparse.state([0]), sparse.state([1, 2])])
    a, _ = sparse.step(x, y)
    b, _ = copy.step(x, y)
    assert torch.equal(a, b)
    assert all(torch.equal(sparse.member_state(1)[n], copy.member_state(1)[n]) for n in PRUNED)


def tiny_pairs() -> tuple:
    """A user dataset factory: (train, test) pairs of tensors."""
    data = tiny_data()
    return (data.train.x, data.train.y), (data.test.x, data.test.y)


def test_cli_user_model_and_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "find",
            "--out",
            str(out),
            "--model",
            TINY,
            "--data",
            "tests.test_find_run:tiny_pairs",
            "--rounds",
            "1",
            "--iterations",
            "10",
            "--batch-size",
            "30",
            "--eval-every",
            "5",
            "--val-size",
            "60",
            "--json",
        ]
    )
    assert code == 0, capsys.readouterr().err
    ticket = load_ticket(out / "ticket.pt")
    assert ticket.arch == TINY and ticket.metrics["dataset"] == "tests.test_find_run:tiny_pairs"
    saved = json.loads((out / "config.json").read_text())
    assert saved["dataset"] is None and saved["val_size"] == 60
