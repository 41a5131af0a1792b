"""Pruning: the paper's schedule, exact per-layer counts, nesting, controls, config checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ticketc.find import pruning
from ticketc.find.config import FindConfig
from ticketc.models import conv2, lenet300


def _lenet_rates() -> tuple[dict[str, int], dict[str, float]]:
    model = lenet300()
    kinds = pruning.prunable_parameters(model)
    params = dict(model.named_parameters())
    sizes = {n: params[n].numel() for n in kinds}
    rates = {n: 0.1 if k == "output" else 0.2 for n, k in kinds.items()}
    return sizes, rates


def test_paper_schedule_lenet() -> None:
    sizes, rates = _lenet_rates()
    remaining = pruning.schedule(sizes, rates, 18)
    got = {r: round(100 * remaining[r], 1) for r in (3, 7, 9, 12, 15, 18)}
    assert got == {3: 51.3, 7: 21.1, 9: 13.5, 12: 7.0, 15: 3.6, 18: 1.9}
    assert pruning.rounds_to_density(sizes, rates, 0.036) == 15


def test_prunable_parameters_kinds() -> None:
    assert pruning.prunable_parameters(lenet300()) == {
        "1.weight": "fc",
        "3.weight": "fc",
        "5.weight": "output",
    }
    kinds = pruning.prunable_parameters(conv2())
    assert [k for k in kinds.values()].count("conv") == 2
    assert list(kinds.values())[-1] == "output"
    with_bias = pruning.prunable_parameters(lenet300(), biases=True)
    assert with_bias["5.bias"] == "output" and with_bias["1.bias"] == "fc"
    with pytest.raises(ValueError, match="no Linear or Conv"):
        pruning.prunable_parameters(torch.nn.ReLU())


def test_layerwise_round_removes_exact_fraction_of_smallest() -> None:
    sizes, rates = _lenet_rates()
    model = lenet300()
    params = {n: p.detach() for n, p in model.named_parameters()}
    masks = pruning.full_masks(model, {n: "fc" for n in sizes})
    for _ in range(4):
        new = pruning.prune_layerwise(params, masks, rates)
        for n in masks:
            alive = int(masks[n].sum())
            assert int(new[n].sum()) == alive - round(rates[n] * alive)
            removed = masks[n] & ~new[n]
            # every removed weight is no larger than every kept one
            assert params[n][removed].abs().max() <= params[n][new[n]].abs().min()
        assert pruning.is_nested(new, masks)
        masks = new


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 60), st.floats(0.0, 0.9), st.integers(0, 10_000))
def test_masks_never_grow_back(n: int, rate: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = {"w": torch.randn(n, 3, generator=g)}
    masks = {"w": torch.rand(n, 3, generator=g) > 0.3}
    # weights that change between rounds (training) still cannot revive pruned entries
    for _ in range(3):
        new = pruning.prune_layerwise(w, masks, {"w": rate})
        assert pruning.is_nested(new, masks)
        masks, w = new, {"w": torch.randn(n, 3, generator=g)}


def test_global_pruning_uses_one_threshold() -> None:
    w = {"a": torch.tensor([[0.1, 5.0], [0.2, 6.0]]), "b": torch.tensor([[0.3, 0.4, 7.0]])}
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in w.items()}
    new = pruning.prune_global(w, masks, 0.5)  # 7 weights -> remove round(3.5) = 4 smallest
    assert new["a"].tolist() == [[False, True], [False, True]]
    assert new["b"].tolist() == [[False, False, True]]


def test_random_masks_keep_layer_counts() -> None:
    masks = {"w": torch.rand(50, 40) > 0.8, "v": torch.rand(7) > 0.5}
    rnd = pruning.random_masks_like(masks, torch.Generator().manual_seed(1))
    for n in masks:
        assert int(rnd[n].sum()) == int(masks[n].sum())
    assert not torch.equal(rnd["w"], masks["w"])


def test_compound_rate_matches_rounds() -> None:
    assert pruning.compound_rate(0.2, 3) == pytest.approx(1 - 0.512)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rounds": -1}, "rounds"),
        ({"model": "resnet9000"}, "resnet9000"),
        ({"fc_rate": 1.0}, "fc_rate"),
        ({"rewind": "iter:3"}, "iter:3"),
        ({"controls": ("shuffle",)}, "shuffle"),
        ({"rounds": 3, "target_density": 0.1}, "not both"),
        ({"dataset": None}, "exactly one"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FindConfig(**kwargs)


def test_config_resolves_paper_defaults_and_round_trips() -> None:
    cfg = FindConfig(model="conv6").resolved()
    assert (cfg.lr, cfg.iterations, cfg.conv_rate, cfg.fc_rate, cfg.output_rate) == (
        3e-4,
        30_000,
        0.15,
        0.2,
        0.1,
    )
    lenet = FindConfig(controls=("reinit",)).resolved()
    assert (lenet.lr, lenet.iterations, lenet.rounds) == (1.2e-3, 50_000, 15)
    assert FindConfig.from_json(lenet.to_json()) == lenet
