"""BatchNorm and Dropout networks through find: train mode for training, eval mode for every
evaluation, normalisation state rewound with the weights, resume bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ticketc.checkpoint import load_ticket
from ticketc.data import Splits, TensorSplit
from ticketc.find import FindConfig, find_tickets
from ticketc.find.ensemble import Ensemble
from ticketc.find.train import BatchOrder

BN_CNN = "tests.test_find_modes:bn_cnn"
DROPOUT_MLP = "tests.test_find_modes:dropout_mlp"
BN_DROPOUT = "tests.test_find_modes:bn_dropout_cnn"


def bn_cnn(num_classes: int = 4) -> nn.Sequential:
    """Conv-BN-ReLU-Pool -> Linear: a user model with real running statistics."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, num_classes),
    )


def dropout_mlp(num_classes: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, num_classes)
    )


def bn_dropout_cnn(num_classes: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(4 * 4 * 4, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, num_classes),
    )


def image_data(n: int = 240) -> Splits:
    """8x8 one-channel images; the class is the brightest quadrant (learnable by a small CNN),
    shifted and scaled so BatchNorm's statistics are far from their initial 0 / 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 120, 1, 8, 8, generator=g)
    quadrants = x.unfold(2, 4, 4).unfold(3, 4, 4).sum((-1, -2)).flatten(1)  # [N, 4]
    y = quadrants.argmax(1)
    x = 3.0 + 2.0 * x
    return Splits(
        "quadrants",
        TensorSplit(x[:n], y[:n]),
        TensorSplit(x[n : n + 60], y[n : n + 60]),
        TensorSplit(x[n + 60 :], y[n + 60 :]),
        num_classes=4,
    )


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(model: str, **kw: object) -> FindConfig:
    base = dict(
        model=model,
        dataset=None,
        data="unused:loaded",
        rounds=1,
        iterations=12,
        batch_size=30,
        lr=3e-3,
        eval_every=4,
        checkpoint_every=4,
    )
    base.update(kw)
    return FindConfig(**base)  # type: ignore[arg-type]


def _load(p: Path) -> dict:
    return torch.load(p, weights_only=True)


def same(a: object, b: object) -> bool:
    """Bit-for-bit equality of nested dicts of tensors."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def deployed_accuracy(factory, state: dict, split: TensorSplit) -> float:  # type: ignore[no-untyped-def]
    """Accuracy of the saved state in a fresh copy of the user's model, in eval mode."""
    model = factory()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return float((model(split.x).argmax(1) == split.y).double().mean())


@pytest.mark.parametrize("model, factory", [(BN_CNN, bn_cnn), (DROPOUT_MLP, dropout_mlp)])
def test_recorded_accuracy_is_the_deployed_eval_mode_accuracy(
    tmp_path: Path, model: str, factory
) -> None:  # type: ignore[no-untyped-def]
    data = image_data()
    (res,) = find_tickets([config(model)], [tmp_path], data=data, log=None, progress=False)
    for level in (0, 1):
        d = tmp_path / f"level_{level:02d}"
        final = _load(d / "final.pt")
        ticket = json.loads((d / "metrics.json").read_text())["members"]["ticket"]
        assert ticket["final_test_acc"] == deployed_accuracy(factory, final, data.test)
        assert ticket["final_val_acc"] == deployed_accuracy(factory, final, data.val)
        if model == BN_CNN:
            # only the 12 training batches moved the statistics: 4 evaluations of 60 + 120
            # samples (in chunks) left them alone
            assert int(final["1.num_batches_tracked"]) == 12
            assert not torch.allclose(final["1.running_mean"], torch.zeros(4))
    t = load_ticket(res.ticket_path)
    assert t.metrics["selected_by"] == "val_acc"
    assert t.metrics["test_acc"] == deployed_accuracy(factory, t.state_dict, data.test)


def test_evaluation_leaves_batchnorm_statistics_alone() -> None:
    data = image_data()
    states = [bn_cnn().state_dict() for _ in range(2)]
    masks = [
        {"0.weight": torch.ones(4, 1, 3, 3, dtype=torch.bool), "5.weight": torch.rand(4, 64) > 0.5}
        for _ in states
    ]
    ens = Ensemble(bn_cnn(), states, masks, lr=1e-3)
    ens.step(torch.stack([data.train.x[:30]] * 2), torch.stack([data.train.y[:30]] * 2))
    before = {n: b.clone() for n, b in ens.buffers.items()}
    ens.evaluate(data.test.x, data.test.y, chunk=7)  # chunks of batch statistics would differ
    for n, b in ens.buffers.items():
        assert torch.equal(b, before[n]), n
    # eval mode: the result does not depend on how the data are chunked
    a = ens.evaluate(data.test.x, data.test.y, chunk=7)
    b = ens.evaluate(data.test.x, data.test.y, chunk=1000)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_batchnorm_ensemble_trains_as_plain_pytorch_does() -> None:
    """Each member of the vmap path equals the user's own model trained alone in train mode
    (masks applied after every step), running statistics included. SGD: the conv bias before
    BatchNorm has a gradient of ~1e-9 whose sign is noise, which Adam would turn into full
    steps of opposite signs."""
    data = image_data()
    g = torch.Generator().manual_seed(1)
    states = [bn_cnn().state_dict() for _ in range(2)]
    masks = [
        {
            "0.weight": torch.rand(4, 1, 3, 3, generator=g) > 0.3,
            "5.weight": torch.rand(4, 64, generator=g) > 0.3,
        }
        for _ in states
    ]
    ens = Ensemble(bn_cnn(), states, masks, lr=1e-2, optimizer="sgd")
    order = BatchOrder([0, 1], 0, len(data.train), 30)
    for t in range(6):
        idx = order.indices(t)
        ens.step(data.train.x[idx], data.train.y[idx], seed=order.step_seed(t))
    for i in range(2):
        model = bn_cnn()
        model.load_state_dict(states[i])
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, m in masks[i].items():
                params[n].mul_(m)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        model.train()
        for t in range(6):
            idx = order.indices(t)[i]
            opt.zero_grad()
            F.cross_entropy(model(data.train.x[idx]), data.train.y[idx]).backward()
            opt.step()
            with torch.no_grad():
                for n, m in masks[i].items():
                    params[n].mul_(m)
        mine = ens.member_state(i)
        for n, v in model.state_dict().items():
            torch.testing.assert_close(mine[n], v, rtol=1e-4, atol=1e-5, msg=n)


def test_dropout_differs_per_member_and_is_reproducible_from_the_seed() -> None:
    data = image_data()
    state = dropout_mlp().state_dict()
    masks = {"1.weight": torch.ones(32, 64, dtype=torch.bool)}
    x = torch.stack([data.train.x[:30]] * 2)
    y = torch.stack([data.train.y[:30]] * 2)

    base = dropout_mlp()

    def trained(seed: int) -> Ensemble:
        ens = Ensemble(base, [state, state], [masks, masks], lr=1e-2)
        ens.step(x, y, seed=seed)
        return ens

    rng = torch.get_rng_state()
    a, b = trained(5), trained(5)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's generator is left alone
    # identical members on identical batches: only their dropout masks differ
    assert not torch.equal(a.params["1.weight"][0], a.params["1.weight"][1])
    assert torch.equal(a.params["1.weight"], b.params["1.weight"])
    assert not torch.equal(a.params["1.weight"], trained(6).params["1.weight"])


def test_normalisation_state_is_rewound_with_the_weights_and_never_pruned(tmp_path: Path) -> None:
    data = image_data()
    cfg = config(BN_DROPOUT, rounds=2, rewind="iteration:3", controls=("reinit", "random-mask"))
    find_tickets([cfg], [tmp_path], data=data, log=None, progress=False)
    point = _load(tmp_path / "rewind_point.pt")
    assert int(point["1.num_batches_tracked"]) == 3  # the statistics at iteration 3
    assert not torch.allclose(point["1.running_var"], torch.ones(4))
    for level in (1, 2):
        d = tmp_path / f"level_{level:02d}"
        rewind, mask = _load(d / "rewind.pt"), _load(d / "mask.pt")
        assert set(mask) == {"0.weight", "6.weight", "9.weight"}  # no BN parameter or buffer
        for name, value in point.items():
            assert torch.equal(rewind[name], value), name  # buffers and BN affine too
        final = _load(d / "final.pt")
        assert int(final["7.num_batches_tracked"]) == 12  # 3 rewound + 9 trained
        assert not bool((final["1.weight"] == 0).any())  # BN scale never pruned
        controls = _load(d / "controls.pt")
        assert set(controls["reinit"]["masks"]) == set(mask)


def test_prune_norms_prunes_the_affine_weights_only_when_asked(tmp_path: Path) -> None:
    data = image_data()
    find_tickets(
        [config(BN_CNN, prune_norms=True, fc_rate=0.5)],
        [tmp_path],
        data=data,
        log=None,
        progress=False,
    )
    mask = _load(tmp_path / "level_01" / "mask.pt")
    assert {"1.weight", "1.bias"} <= set(mask) and "1.running_mean" not in mask
    assert int(mask["1.weight"].sum()) == 2  # the fully connected rate: half of 4


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_a_kill_is_bit_exact_with_batchnorm_and_dropout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_data()
    cfg = config(
        BN_DROPOUT, rounds=2, rewind="iteration:2", controls=("reinit",), checkpoint_every=5
    )
    (ref,) = find_tickets([cfg], [tmp_path / "ref"], data=data, log=None, progress=False)
    real = Ensemble._step
    calls = {"n": 0}

    def dying(self: Ensemble, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 19:  # level 1, after its checkpoint at iteration 5
            raise _Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Ensemble, "_step", dying)
    with pytest.raises(_Killed):
        find_tickets([cfg], [tmp_path / "b"], data=data, log=None, progress=False)
    monkeypatch.setattr(Ensemble, "_step", real)
    assert (tmp_path / "b" / "level_01" / "partial.pt").exists()
    torch.manual_seed(123)  # the global generator's state must not matter
    (res,) = find_tickets([cfg], [tmp_path / "b"], data=data, log=None, progress=False, resume=True)
    for level in range(3):
        for name in ("final.pt", "controls.pt") if level else ("final.pt",):
            a = _load(tmp_path / "ref" / f"level_{level:02d}" / name)
            b = _load(tmp_path / "b" / f"level_{level:02d}" / name)
            assert same(a, b), (level, name)
        ma = json.loads((tmp_path / "ref" / f"level_{level:02d}" / "metrics.json").read_text())
        mb = json.loads((tmp_path / "b" / f"level_{level:02d}" / "metrics.json").read_text())
        assert ma["members"] == mb["members"]
    ta, tb = load_ticket(ref.ticket_path), load_ticket(res.ticket_path)
    assert same(ta.state_dict, tb.state_dict) and same(ta.masks, tb.masks)
