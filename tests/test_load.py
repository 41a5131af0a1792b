"""Every load path and every mask source ends as a dense module with the mask multiplied in."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from tests import models_for_tests as zoo
from tests.models_for_tests import prune_random_, tiny_convnet, tiny_mlp
from ticketc.checkpoint import Ticket, load_ticket, save_ticket
from ticketc.errors import UserError
from ticketc.load import load_model
from ticketc.masks import strip_pruning_

ARCH = "tests.models_for_tests:tiny_mlp"


def _pruned_mlp(density: float = 0.3) -> nn.Sequential:
    model = tiny_mlp()
    prune_random_(model, density)
    return model


def test_state_dict_needs_arch(tmp_path):
    torch.save(_pruned_mlp().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UserError, match="--arch"):
        load_model(tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", arch=ARCH)
    assert loaded.source == "state_dict"
    assert set(loaded.masks) == {"1.weight", "3.weight"}


def test_exact_zeros_become_masks(tmp_path):
    model = _pruned_mlp(0.25)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", arch=ARCH)
    for name, mask in loaded.masks.items():
        assert torch.equal(mask, dict(model.named_parameters())[name] != 0)


def test_pickled_module_refused_without_opt_in(tmp_path):
    torch.save(_pruned_mlp(), tmp_path / "full.pt")
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(tmp_path / "full.pt")
    assert load_model(tmp_path / "full.pt", trust_pickle=True).source == "pickle"


def _loaded_as_pickle_and_state_dict(model: nn.Module, tmp_path) -> list:
    """A hooked tiny_mlp saved whole (pickle) and as its state dict, each loaded back."""
    torch.save(model, tmp_path / "hooked.pt")
    torch.save(model.state_dict(), tmp_path / "hooked_sd.pt")
    return [
        load_model(tmp_path / "hooked.pt", trust_pickle=True),
        load_model(tmp_path / "hooked_sd.pt", arch=ARCH),
    ]


def test_prune_hooks_are_folded_and_removed(tmp_path):
    model = tiny_mlp()
    prune.l1_unstructured(model[1], "weight", amount=0.8)
    mask = model[1].weight_mask.bool().clone()
    x = torch.randn(3, 20)
    expected = model(x).detach()
    for loaded in _loaded_as_pickle_and_state_dict(model, tmp_path):
        layer = loaded.model[1]
        assert not layer._forward_pre_hooks
        assert torch.equal(loaded.masks["1.weight"], mask)
        assert torch.equal(layer.weight != 0, mask & (layer.weight != 0))
        assert int((layer.weight != 0).sum()) <= int(mask.sum())
        torch.testing.assert_close(loaded.model(x), expected)


def test_a_prune_mask_of_other_values_than_0_and_1_scales_the_weight(tmp_path):
    """prune's hook computes X_orig * X_mask: a scaled (soft) mask scales the weight. The
    state dict was read as if the mask were 0 / 1 (rel 0.14 against the user's model)."""
    model = tiny_mlp()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    prune.l1_unstructured(model[3], "weight", amount=0.5)
    model[1].weight_mask.mul_(0.5)
    x = torch.randn(3, 20)
    expected = model(x).detach()
    for loaded in _loaded_as_pickle_and_state_dict(model, tmp_path):
        torch.testing.assert_close(loaded.model(x), expected)
        assert torch.equal(loaded.masks["1.weight"], model[1].weight_mask != 0)


def test_a_prune_mask_of_another_shape_than_its_weight_is_refused(tmp_path):
    model = tiny_mlp()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    state = model.state_dict()
    state["1.weight_mask"] = state["1.weight_mask"][:, :10]
    torch.save(state, tmp_path / "sd.pt")
    with pytest.raises(UserError, match=r"1.weight_mask has shape \[16, 10\], its 1.weight_orig"):
        load_model(tmp_path / "sd.pt", arch=ARCH)  # was an internal RuntimeError, exit 1


def _ao_sparsified_mlp() -> tuple[nn.Sequential, torch.Tensor]:
    from torch.ao.pruning import WeightNormSparsifier

    model = tiny_mlp()
    sparsifier = WeightNormSparsifier(
        sparsity_level=0.75, sparse_block_shape=(1, 1), zeros_per_block=1
    )
    sparsifier.prepare(model, [{"tensor_fqn": "1.weight"}])
    sparsifier.step()
    return model, model[1].parametrizations.weight[0].mask.bool().clone()


def test_ao_pruning_parametrization_in_memory():
    model, mask = _ao_sparsified_mlp()
    found = strip_pruning_(model)
    assert torch.equal(found["1.weight"], mask)
    assert not hasattr(model[1], "parametrizations")
    assert bool((model[1].weight[~mask] == 0).all())


def test_ao_pruning_state_dict_takes_the_mask_file(tmp_path):
    # Parametrized modules only save through state_dict(), and that omits the mask.
    model, mask = _ao_sparsified_mlp()
    torch.save(model.state_dict(), tmp_path / "ao.pt")
    torch.save({"1.weight": mask}, tmp_path / "mask.pt")
    without = load_model(tmp_path / "ao.pt", arch=ARCH)
    assert any("--mask" in note for note in without.notes)
    loaded = load_model(tmp_path / "ao.pt", arch=ARCH, mask_path=tmp_path / "mask.pt")
    assert torch.equal(loaded.masks["1.weight"], mask)
    assert bool((loaded.model[1].weight[~mask] == 0).all())


class _SavedMask(nn.Module):
    """A user's own masking parametrization: its mask is a buffer, so state_dict() saves it
    (torch.ao.pruning's FakeSparsity does not)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def test_a_masking_parametrizations_saved_mask_is_applied(tmp_path):
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = tiny_mlp().eval()
    mask = torch.rand(model[1].weight.shape) < 0.3
    parametrize.register_parametrization(model[1], "weight", _SavedMask(mask.float()))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    assert "1.parametrizations.weight.0.mask" in torch.load(tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", arch=ARCH)
    assert torch.equal(loaded.masks["1.weight"], mask)
    assert any("saved mask applied" in note for note in loaded.notes)
    x = torch.randn(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), model(x))


@pytest.mark.parametrize("kind", ["spectral_norm", "not_binary", "other_buffer"])
def test_a_parametrization_buffer_ticketc_cannot_apply_is_refused(tmp_path, kind):
    """spectral_norm's `_u` / `_v`, a mask that is not 0 / 1, a buffer of another name:
    dropping them would export another model than the user's."""
    from torch.nn.utils import parametrize

    model = tiny_mlp()
    if kind == "spectral_norm":
        nn.utils.parametrizations.spectral_norm(model[1])
    else:
        values = torch.full(model[1].weight.shape, 0.5)
        buffer = _SavedMask(values)
        if kind == "other_buffer":
            buffer.register_buffer("scale", values)
            del buffer.mask
            buffer.forward = lambda weight: weight * buffer.scale  # type: ignore[method-assign]
        parametrize.register_parametrization(model[1], "weight", buffer)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UserError, match="1.parametrizations.weight.0.*--trust-pickle"):
        load_model(tmp_path / "sd.pt", arch=ARCH)


def test_mask_file_is_multiplied_in_not_trusted_from_zeros(tmp_path):
    model = tiny_mlp()  # dense weights: the mask file alone says what is pruned (as open_lth)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    mask = torch.rand(16, 20) < 0.2
    torch.save({"1.weight": mask}, tmp_path / "mask.pt")
    loaded = load_model(tmp_path / "sd.pt", arch=ARCH, mask_path=tmp_path / "mask.pt")
    assert torch.equal(loaded.model[1].weight != 0, mask)
    assert loaded.masks["3.weight"].all()


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ({"9.weight": torch.ones(16, 20, dtype=torch.bool)}, "not a parameter"),
        ({"1.weight": torch.ones(20, 16, dtype=torch.bool)}, "shape"),
    ],
)
def test_mask_file_mismatch_is_a_user_error(tmp_path, masks, message):
    torch.save(tiny_mlp().state_dict(), tmp_path / "sd.pt")
    torch.save(masks, tmp_path / "mask.pt")
    with pytest.raises(UserError, match=message):
        load_model(tmp_path / "sd.pt", arch=ARCH, mask_path=tmp_path / "mask.pt")


def test_ticket_checkpoint_loads_without_flags(tmp_path):
    from ticketc.models import lenet300

    model = lenet300(num_classes=4, in_features=20)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {"1.weight": torch.rand(300, 20) < 0.3, "3.weight": torch.rand(100, 300) < 0.5}
    ticket = Ticket(
        arch="ticketc.models:lenet300",
        arch_kwargs={"num_classes": 4, "in_features": 20},
        state_dict=model.state_dict(),
        masks=masks,
        rewind_state_dict=init,
        metrics={"test_accuracy": 0.5},
    )
    save_ticket(ticket, tmp_path / "ticket.pt")
    assert load_ticket(tmp_path / "ticket.pt").metrics == {"test_accuracy": 0.5}
    loaded = load_model(tmp_path / "ticket.pt")
    assert loaded.source == "ticket"
    for name, mask in masks.items():
        assert torch.equal(dict(loaded.model.named_parameters())[name] != 0, mask)


def test_ticket_of_a_user_architecture_needs_arch(tmp_path):
    model = tiny_mlp()
    masks = {"1.weight": torch.rand(16, 20) < 0.3}
    ticket = Ticket(
        arch=ARCH,
        state_dict=model.state_dict(),
        masks=masks,
        rewind_state_dict=model.state_dict(),
    )
    save_ticket(ticket, tmp_path / "ticket.pt")
    with pytest.raises(UserError, match=f"--arch {ARCH}"):
        load_model(tmp_path / "ticket.pt")
    loaded = load_model(tmp_path / "ticket.pt", arch=ARCH)
    assert torch.equal(loaded.model[1].weight != 0, masks["1.weight"])


def test_exported_program(tmp_path):
    model = tiny_convnet().eval()
    prune_random_(model, 0.2)
    x = torch.randn(2, 4, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    loaded = load_model(tmp_path / "m.pt2")
    assert loaded.source == "export"
    assert loaded.example_input is not None
    torch.testing.assert_close(loaded.model(x), model(x))


def test_nan_weights_are_refused(tmp_path):
    model = tiny_mlp()
    with torch.no_grad():
        model[3].bias[1] = float("nan")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UserError, match="NaN"):
        load_model(tmp_path / "sd.pt", arch=ARCH)


def test_a_buffer_of_minus_inf_loads_and_a_buffer_of_nan_is_refused(tmp_path):
    """-inf in a buffer is an additive attention mask (was refused as a "parameter" holding
    NaN or Inf); NaN in a buffer is refused, naming it a buffer."""
    model = zoo.causal_attention().eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", arch="tests.models_for_tests:causal_attention")
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(loaded.model(x), model(x))
    state = model.state_dict()
    state["mask"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(UserError, match="buffer 'mask' holds 1 NaN"):
        load_model(tmp_path / "nan.pt", arch="tests.models_for_tests:causal_attention")


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", None])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint cut in half
        torch.save(tiny_mlp().state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(UserError):
        load_model(path, arch=ARCH)


def test_atomic_writes_have_ordinary_permissions(tmp_path):
    import os

    from ticketc.atomic import atomic_path

    with atomic_path(tmp_path / "f.bin") as tmp:
        tmp.write_bytes(b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("form", ["hooks", "removed", "module_prefix"])
def test_module_versions_in_the_state_dict_reach_the_modules(tmp_path, form):
    """torchvision's MNASNet reads its version from the state dict's `_metadata`: folding the
    prune tensors or dropping a wrapper's `module.` prefix must keep it (it was lost: internal
    error)."""
    torch.manual_seed(0)
    model = zoo.versioned()
    prune.global_unstructured(
        [(model.body[0], "weight"), (model.body[2], "weight")], prune.L1Unstructured, amount=0.5
    )
    if form != "hooks":
        prune.remove(model.body[0], "weight")
        prune.remove(model.body[2], "weight")
    state = (nn.DataParallel(model) if form == "module_prefix" else model).state_dict()
    torch.save(state, tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", arch="tests.models_for_tests:versioned")
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_a_module_that_refuses_the_weights_is_a_user_error(tmp_path):
    torch.save(dict(zoo.versioned().state_dict()), tmp_path / "sd.pt")  # a plain dict: no versions
    with pytest.raises(UserError, match="version should be 2, not None"):
        load_model(tmp_path / "sd.pt", arch="tests.models_for_tests:versioned")


class _WeightNormNet(nn.Module):
    """A weight_norm parametrization (wav2vec2's positional conv): its state dict holds
    `conv.parametrizations.weight.original0` / `original1`, no pruning."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv1d(4, 4, 3, padding=1)
        self.conv = nn.utils.parametrizations.weight_norm(conv, dim=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(-1))


def weight_norm_net() -> nn.Module:
    return _WeightNormNet()


def test_a_weight_norm_state_dict_loads_with_its_arch(tmp_path):
    torch.manual_seed(0)
    model = _WeightNormNet().eval()
    prune.l1_unstructured(model.fc, "weight", amount=0.5)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", arch="tests.test_load:weight_norm_net")
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(loaded.model.eval()(x), model(x))


def test_a_plain_pickle_is_named_as_one(tmp_path):
    """pickle.dump's file was "not a readable torch file (Unsupported operand 149)"; torch's
    legacy (non-zip) files, which also open with a pickle header, still load."""
    import pickle

    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(tiny_mlp().state_dict(), f)
    with pytest.raises(UserError, match="a plain Python pickle, not a file torch.save wrote"):
        load_model(tmp_path / "plain.pkl", arch=ARCH)
    legacy = tmp_path / "legacy.pt"
    torch.save(tiny_mlp().state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert load_model(legacy, arch=ARCH).model is not None
