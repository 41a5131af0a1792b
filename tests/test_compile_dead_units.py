"""Dead-unit elimination: outputs unchanged, planted dead units really removed, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ticketc.transforms import eliminate_dead_units


def _check_same(old: nn.Module, new: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref, got = old.eval()(x), new(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_mlp_planted_units_are_removed_and_folded():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5)
    )
    with torch.no_grad():
        model[1].weight[:4] = 0  # 4 units of layer 1 output act(bias): folded into layer 3
        model[1].bias[:4] = torch.tensor([0.5, -0.5, 1.0, 2.0])
        model[3].weight[:, 10:13] = 0  # nobody reads units 10..12 of layer 1
        model[5].weight[:, 7] = 0  # nobody reads unit 7 of layer 3
    new, report = eliminate_dead_units(model)
    _check_same(model, new, torch.randn(9, 20))
    assert report.applied and report.reason == ""
    assert new[1].out_features == 16 - 4 - 3 and new[3].in_features == 9
    assert new[3].out_features == 11 and new[5].in_features == 11
    assert report.layers[0].constant_units == 4 and report.layers[0].unused_units == 3
    assert report.removed_units == 8
    assert report.params_after < report.params_before
    assert model[1].out_features == 16  # the input model is untouched


def test_removal_cascades_backwards():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[4].weight[:, 0] = 0  # unit 0 of layer 2 unused ...
        model[2].weight[1:, 2] = 0  # ... and unit 2 of layer 0 only feeds it
    new, report = eliminate_dead_units(model)
    _check_same(model, new, torch.randn(7, 6))
    assert new[2].out_features == 3 and new[0].out_features == 4


def test_conv_chain_with_batchnorm_pooling_and_flatten():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3),  # no padding: a constant channel folds exactly
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 4),
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[0].weight[:3] = 0
        model[4].weight[:, 5] = 0
        model[4].weight[1] = 0
        model[7].weight[:, 8:12] = 0  # channel 2 of conv 4, all its flattened positions
    new, report = eliminate_dead_units(model)
    _check_same(model, new, torch.randn(2, 3, 10, 10))
    assert new[0].out_channels == 4 and new[1].num_features == 4
    assert new[4].out_channels == 4 and new[7].in_features == 16


def test_padded_conv_keeps_nonzero_constant_units():
    # Zero padding makes a constant channel non-constant at the border: only act(bias) == 0
    # units may go.
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    with torch.no_grad():
        model[0].weight[:2] = 0
        model[0].bias[:2] = torch.tensor([1.0, -1.0])  # relu: 1.0 (kept) and 0.0 (removed)
    new, report = eliminate_dead_units(model)
    _check_same(model, new, torch.randn(2, 2, 8, 8))
    assert new[0].out_channels == 3


@pytest.mark.parametrize("seed", range(4))
def test_random_sparse_mlps_keep_their_outputs(seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(30, 40), nn.GELU(), nn.Linear(40, 40), nn.Sigmoid(), nn.Linear(40, 8)
    )
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < 0.05)
    new, report = eliminate_dead_units(model)
    _check_same(model, new, torch.randn(6, 30, generator=g))
    assert report.removed_units > 0


def test_refuses_a_model_that_is_not_a_chain():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc(x)

    model = Residual()
    with torch.no_grad():
        model.fc.weight.zero_()
    new, report = eliminate_dead_units(model)
    assert new is model and not report.applied
    assert "Residual" in report.reason and report.removed_units == 0


def test_skips_pairs_joined_by_unknown_ops():
    model = nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=1), nn.Linear(6, 2))
    with torch.no_grad():
        model[2].weight[:, 0] = 0
    new, report = eliminate_dead_units(model)
    assert report.applied and new[0].out_features == 6
    assert "Softmax" in report.skipped[0]
