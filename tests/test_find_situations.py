"""Lottery-ticket situations users report, each as the paper (Frankle & Carbin 2019; Frankle et
al. 2020) and open_lth have it: optimizer state never revives a pruned weight, magnitude means
|w| (negative weights), global vs per-kind rates, rewinding to iteration / epoch k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_find_modes import BN_DROPOUT, bn_dropout_cnn, image_data
from tests.test_find_run import PRUNED, tiny_config, tiny_data, tiny_mlp
from ticketc.checkpoint import load_ticket
from ticketc.data import Splits, TensorSplit
from ticketc.find import FindConfig, find_tickets, pruning
from ticketc.find.ensemble import Ensemble
from ticketc.find.train import BatchOrder


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(p: Path) -> dict:
    return torch.load(p, weights_only=True)


# -- optimizer state never revives a pruned weight ------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("path", ["mlp", "csr", "vmap"])
def test_pruned_weights_stay_zero_after_every_step(optimizer: str, path: str) -> None:
    """Momentum and Adam moments keep moving a weight whose gradient was once large; the
    mask is enforced after every step, so it never comes back (open_lth: PrunedModel)."""
    g = torch.Generator().manual_seed(0)
    if path == "vmap":
        data, factory, names = image_data(), bn_dropout_cnn, ("0.weight", "6.weight", "9.weight")
    else:
        data, factory, names = tiny_data(), tiny_mlp, PRUNED
    states = [factory().state_dict() for _ in range(2)]
    masks = [{n: torch.rand(s[n].shape, generator=g) > 0.6 for n in names} for s in states]
    ens = Ensemble(
        factory(),
        states,
        masks,
        lr=5e-2,
        optimizer=optimizer,
        sparse_below=0.9 if path == "csr" else 0.0,
    )
    assert bool(ens.sparse) == (path == "csr") and (ens.mlp is None) == (path == "vmap")
    # the gradients at pruned positions are not zero, so the moments there grow every step
    order = BatchOrder([0, 1], 0, len(data.train), 30)
    for t in range(8):
        idx = order.indices(t)
        ens.step_on(data.train.x, data.train.y, idx, seed=t)
        for i in range(2):
            state = ens.member_state(i)
            for n in names:
                assert bool((state[n][~masks[i][n]] == 0).all()), (t, i, n)
                assert bool((state[n][masks[i][n]] != 0).any())


def test_a_whole_run_keeps_every_pruned_weight_at_zero(tmp_path: Path) -> None:
    cfg = tiny_config(optimizer="sgd", lr=5e-2, rounds=3, rewind="iteration:5")
    find_tickets([cfg], [tmp_path], data=tiny_data(), log=None, progress=False)
    previous = None
    for level in range(4):
        d = tmp_path / f"level_{level:02d}"
        mask, final = _load(d / "mask.pt"), _load(d / "final.pt")
        for n, m in mask.items():
            assert bool((final[n][~m] == 0).all())
            if previous is not None:
                assert not bool((m & ~previous[n]).any())  # masks never grow back
        previous = mask


# -- magnitude is |w| -------------------------------------------------------------------------


def test_negative_weights_are_ranked_by_magnitude() -> None:
    w = {"a": torch.tensor([[-5.0, 0.1, -0.2, 3.0, -0.05]])}
    full = {"a": torch.ones(1, 5, dtype=torch.bool)}
    kept = pruning.prune_layerwise(w, full, {"a": 0.4})["a"]
    assert kept.tolist() == [[True, False, True, True, False]]  # -5 is the largest weight
    w2 = {"a": torch.tensor([[-9.0, -0.3]]), "b": torch.tensor([[0.2, -0.1, 4.0]])}
    full2 = {k: torch.ones_like(v, dtype=torch.bool) for k, v in w2.items()}
    new = pruning.prune_global(w2, full2, 0.4)  # 5 weights: the 2 of smallest |w| go
    assert new["a"].tolist() == [[True, True]] and new["b"].tolist() == [[False, False, True]]


@pytest.mark.parametrize("strategy", ["layerwise", "global"])
def test_every_removed_weight_is_no_larger_in_magnitude_than_every_kept_one(strategy: str) -> None:
    g = torch.Generator().manual_seed(2)
    w = {"a": torch.randn(30, 20, generator=g) - 1.0, "b": 3 * torch.randn(10, 30, generator=g)}
    masks = {k: torch.rand(v.shape, generator=g) > 0.2 for k, v in w.items()}
    if strategy == "global":
        new = pruning.prune_global(w, masks, 0.3)
        removed = torch.cat([w[k][masks[k] & ~new[k]].abs() for k in w])
        kept = torch.cat([w[k][new[k]].abs() for k in w])
        assert removed.max() <= kept.min()
    else:
        new = pruning.prune_layerwise(w, masks, {"a": 0.3, "b": 0.5})
        for k in w:
            assert w[k][masks[k] & ~new[k]].abs().max() <= w[k][new[k]].abs().min()
    assert pruning.is_nested(new, masks)


# -- global and per-kind rates ----------------------------------------------------------------


def _conv_data() -> Splits:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (150,), generator=g)
    return Splits(
        "img",
        TensorSplit(x[:90], y[:90]),
        TensorSplit(x[90:120], y[90:120]),
        TensorSplit(x[120:], y[120:]),
        10,
    )


def test_per_kind_rates_prune_conv_fc_and_output_layers_at_their_own_rate(tmp_path: Path) -> None:
    cfg = FindConfig(
        model="conv2",
        rounds=2,
        iterations=2,
        batch_size=30,
        eval_every=1,
        conv_rate=0.15,
        fc_rate=0.25,
        output_rate=0.05,
    )
    find_tickets([cfg], [tmp_path], data=_conv_data(), log=None, progress=False)
    init = _load(tmp_path / "init.pt")
    mask = _load(tmp_path / "level_02" / "mask.pt")
    kinds = {
        "0.weight": 0.15,
        "2.weight": 0.15,
        "6.weight": 0.25,
        "8.weight": 0.25,
        "10.weight": 0.05,
    }
    assert set(mask) == set(kinds)  # weights of conv and linear layers only
    for name, rate in kinds.items():
        alive = init[name].numel()
        for _ in range(2):
            alive -= round(rate * alive)
        assert int(mask[name].sum()) == alive, name


def test_global_rate_prunes_one_threshold_across_layers(tmp_path: Path) -> None:
    data = tiny_data()
    cfg = tiny_config(
        strategy="global", global_rate=0.3, rounds=None, target_density=0.3, iterations=10
    )
    find_tickets([cfg], [tmp_path], data=data, log=None, progress=False)
    levels = sorted(tmp_path.glob("level_*"))
    densities = [json.loads((d / "metrics.json").read_text())["density"] for d in levels]
    # exactly round(0.3 * alive) of all survivors go each round, and the run stops at the
    # first level at or below the target
    alive, total = 1056, 1056  # 12*32 + 32*16 + 16*10
    for d in densities[1:]:
        alive -= round(0.3 * alive)
        assert d == pytest.approx(alive / total)
    assert densities[-1] <= 0.3 < densities[-2]
    # one threshold: per-layer densities differ, and the weights removed at the last round
    # are no larger in magnitude than every weight kept, across layers
    last = json.loads((levels[-1] / "metrics.json").read_text())["layer_density"]
    assert len({round(v, 3) for v in last.values()}) > 1
    weights = _load(levels[-2] / "final.pt")
    before, after = _load(levels[-2] / "mask.pt"), _load(levels[-1] / "mask.pt")
    removed = torch.cat([weights[n][before[n] & ~after[n]].abs() for n in after])
    kept = torch.cat([weights[n][after[n]].abs() for n in after])
    assert removed.max() <= kept.min()


# -- late resetting / rewinding ---------------------------------------------------------------


def test_rewind_to_an_epoch_counts_the_epoch_in_iterations(tmp_path: Path) -> None:
    data = tiny_data()  # 360 training samples, batch 30: 12 iterations per epoch
    cfg = tiny_config(rewind="epoch:2", rounds=1, controls=("random-mask",))
    (res,) = find_tickets([cfg], [tmp_path], data=data, log=None, progress=False)
    metrics = json.loads((tmp_path / "level_01" / "metrics.json").read_text())
    assert metrics["start_iteration"] == 24
    history = metrics["members"]["ticket"]["history"]
    assert history[0]["iteration"] == 30 and history[-1]["iteration"] == 40
    assert load_ticket(res.ticket_path).rewind_point == "iteration:24"
    point = _load(tmp_path / "rewind_point.pt")
    init = _load(tmp_path / "init.pt")
    assert not torch.equal(point["1.weight"], init["1.weight"])
    # the random-mask control starts from the same rewind point, under its own mask
    rewind = _load(tmp_path / "level_01" / "rewind.pt")
    assert all(torch.equal(rewind[n], point[n]) for n in point)


def test_late_rewinding_with_batchnorm_and_dropout_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ticketc.cli import main
    from ticketc.find import run as run_module

    data = image_data()
    monkeypatch.setattr(run_module, "load_data", lambda cfg: data)
    out = tmp_path / "run"
    code = main(
        [
            "find",
            "--out",
            str(out),
            "--model",
            BN_DROPOUT,
            "--rounds",
            "1",
            "--iterations",
            "8",
            "--batch-size",
            "30",
            "--rewind",
            "iteration:2",
            "--strategy",
            "global",
            "--controls",
            "reinit",
            "--json",
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    ticket = load_ticket(result["ticket"])
    model = ticket.build(arch=BN_DROPOUT).eval()  # the user names the code to run
    assert isinstance(model, nn.Sequential) and ticket.rewind_point == "iteration:2"
    with torch.no_grad():
        acc = float((model(data.test.x).argmax(1) == data.test.y).double().mean())
    assert acc == result["test_acc"] == ticket.metrics["test_acc"]
