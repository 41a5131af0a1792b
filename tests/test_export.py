"""End to end: pruned torch models -> every format and value type -> the file's outputs in
onnxruntime match the user's own masked model, and the file is as small as its zeros allow."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import prune

from tests import models_for_tests as zoo
from tests.models_for_tests import (
    prune_global_,
    prune_random_,
    tied_lm,
    tiny_conv1d,
    tiny_convnet,
    tiny_mlp,
)
from tests.reference import reference_evaluator
from ticketc.errors import UserError
from ticketc.export import ExportConfig, export_model, export_onnx_file, read_metadata
from ticketc.inspect import decoded_weights

CASES = {
    "mlp": (tiny_mlp, (2, 20)),
    "conv2d": (tiny_convnet, (2, 4, 8, 8)),
    "conv1d": (tiny_conv1d, (2, 3, 11)),
}
# Output error allowed against the masked model, per value type (relative to its largest output)
LOSSY_RTOL = {"fp32": 1e-5, "fp16": 2e-2, "int8": 6e-2, "int4": 0.35}


def _model(name: str, density: float = 0.1):
    factory, shape = CASES[name]
    model = factory().eval()
    prune_random_(model, density)
    return model, torch.randn(shape)


def _ort(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _flat(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _flat(v)]
    if isinstance(output, list | tuple):
        return [t for v in output for t in _flat(v)]
    if hasattr(output, "to_tuple"):
        return [t for v in output.to_tuple() for t in _flat(v)]
    return []


def assert_matches_model(path, model, inputs: dict[str, torch.Tensor], values: str):
    """onnxruntime on the file against the user's own model (hooks and all), in float64.
    The inputs go to the model positionally and to the file in its inputs' order."""
    with torch.no_grad():
        expected = _flat(model(*inputs.values()))
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    got = _ort(path, {n: v.numpy() for n, v in zip(names, inputs.values(), strict=True)})
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        e64 = e.double().numpy()
        scale = max(float(np.abs(e64).max()), 1e-6)
        rel = float(np.abs(g.astype(np.float64) - e64).max()) / scale
        assert rel <= LOSSY_RTOL[values], (values, rel)


def assert_size_goal(result, dense) -> None:
    """The file is smaller than the dense export by at least 0.9 x what its zeros allow: the
    dense file over the same file with every float initializer at its entropy bound."""
    floor = dense.total_bytes - result.weight_bytes + result.bound_bytes
    allowed = dense.total_bytes / floor
    achieved = dense.total_bytes / result.total_bytes
    assert achieved >= 0.9 * allowed, (achieved, allowed)


LIVE_CASES = {
    "resnet_tiny": lambda: torch.randn(3, 3, 8, 8),
    "tied_lm": lambda: torch.randint(0, 50, (3, 7)),
    "recurrent": lambda: torch.randn(3, 5, 6),
    "upsampler": lambda: torch.randn(3, 3, 6, 6),
    "dict_output": lambda: torch.randn(3, 10),
}


@pytest.mark.parametrize("name", list(LIVE_CASES))
def test_the_test_models_still_answer_their_input_after_global_pruning(name):
    """The models the export tests prune with global magnitude pruning at 90 % still give
    different outputs for different inputs: where a layer is pruned away whole, every input
    gets the same answer, and "the file matches the masked model" proves nothing."""
    model = getattr(zoo, name)().eval()
    prune_global_(model, 0.9)
    with torch.no_grad():
        a, b = (_flat(model(LIVE_CASES[name]())) for _ in "ab")
    assert any(not torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("rate", [0.5, 0.9, 0.98])
@pytest.mark.parametrize("values", ["fp32", "fp16", "int8", "int4"])
def test_size_is_within_0_9_of_what_the_zeros_allow(tmp_path, rate, values):
    from ticketc.models import lenet300

    torch.manual_seed(0)
    model = lenet300().eval()
    prune_global_(model, rate)
    x = torch.randn(1, 1, 28, 28)
    dense = export_model(model, x, tmp_path / "d.onnx", ExportConfig(format="dense", verify=False))
    result = export_model(model, x, tmp_path / "p.onnx", ExportConfig(values=values))
    assert_size_goal(result, dense)


# --------------------------------------------------------------------------- basics
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["portable", "sparse-initializer", "dense"])
def test_lossless_formats_match_torch(tmp_path, case, fmt):
    model, x = _model(case)
    result = export_model(model, x, tmp_path / "m.onnx", ExportConfig(format=fmt))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=fmt != "sparse-initializer")
    assert result.verification is not None and result.verification.passed
    # a different batch size than the one traced: the batch dimension is dynamic
    x3 = torch.randn((3, *x.shape[1:]))
    name = proto.graph.input[0].name
    assert_matches_model(tmp_path / "m.onnx", model, {name: x3}, "fp32")
    if fmt == "portable":
        ref = reference_evaluator(proto).run(None, {name: x3.numpy()})[0]
        np.testing.assert_allclose(ref, model(x3).detach().numpy(), rtol=1e-5, atol=1e-6)
    card = (tmp_path / "m.card.md").read_text()
    # these files are small: smaller or larger than their weights, never "0.86x smaller"
    said = re.search(r"\n(.*) the graph's weights as dense fp32 \(", card)
    assert said is not None, card
    assert re.fullmatch(r"\d+\.\dx smaller than|\d+\.\d\dx the size of|About the size of", said[1])


@pytest.mark.parametrize("case", list(CASES))
def test_portable_fp32_weights_are_bit_exact(tmp_path, case):
    model, x = _model(case, density=0.05)
    export_model(model, x, tmp_path / "m.onnx")
    dense = export_model(model, x, tmp_path / "d.onnx", ExportConfig(format="dense"))
    decoded = decoded_weights(tmp_path / "m.onnx")
    held = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(str(tmp_path / "d.onnx")).graph.initializer
    }
    assert decoded, "no pruned weight was stored compactly"
    assert dense.layers
    for name, weight in decoded.items():
        np.testing.assert_array_equal(weight, held[name])


@pytest.mark.parametrize("values", ["fp16", "int8", "int4"])
def test_lossy_values_are_close_and_smaller(tmp_path, values):
    model, x = _model("mlp", density=0.2)
    fp32 = export_model(model, x, tmp_path / "fp32.onnx")
    lossy = export_model(model, x, tmp_path / f"{values}.onnx", ExportConfig(values=values))
    onnx.checker.check_model(onnx.load(str(tmp_path / f"{values}.onnx")), full_check=True)
    assert sum(x.nbytes for x in lossy.layers) < sum(x.nbytes for x in fp32.layers)
    assert lossy.verification is not None and lossy.verification.passed  # reported, no tolerance
    x5 = torch.randn(5, 20)
    assert_matches_model(tmp_path / f"{values}.onnx", model, {"x": x5}, values)


def test_tolerance_failure_writes_nothing_and_keeps_old_file(tmp_path):
    model, x = _model("mlp", density=0.5)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(UserError, match="verification failed"):
        export_model(model, x, out, ExportConfig(values="int4", tolerance=1e-9))
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_metadata_records_version_value_type_and_sources(tmp_path):
    model, x = _model("conv2d")
    export_model(model, x, tmp_path / "m.onnx", ExportConfig(values="int8"))
    meta = read_metadata(onnx.load(str(tmp_path / "m.onnx")))
    assert meta is not None and meta["version"] and meta["values"] == "int8"
    assert {"0.weight", "3.weight", "6.weight"} <= set(meta["layers"])
    assert all(codec.endswith("int8") or "+" in codec for codec in meta["groups"].values())


def test_dead_units_shrink_the_file_and_keep_outputs(tmp_path):
    from ticketc.models import lenet300

    model = lenet300().eval()
    prune_random_(model, 0.3)
    with torch.no_grad():
        model[1].weight[:100] = 0  # 100 hidden units with no input: constant act(bias)
        model[3].weight[:, 200:] = 0  # 100 units nobody reads
    x = torch.randn(1, 1, 28, 28)
    plain = export_model(model, x, tmp_path / "plain.onnx")
    smaller = export_model(model, x, tmp_path / "dead.onnx", ExportConfig(dead_units=True))
    assert any("removed" in note for note in smaller.notes)
    assert smaller.verification is not None and smaller.verification.passed  # vs the original
    shapes = {layer.initializer: layer.shape for layer in smaller.layers}
    assert max(s[0] for s in shapes.values() if len(s) == 2) < 300 - 150 or any(
        s[1] < 300 - 150 for s in shapes.values() if len(s) == 2
    )
    assert smaller.total_bytes < plain.total_bytes


def test_a_dense_layer_is_never_stored_bigger(tmp_path):
    model, x = _model("mlp", density=1.0)
    dense = export_model(model, x, tmp_path / "d.onnx", ExportConfig(format="dense"))
    portable = export_model(model, x, tmp_path / "p.onnx")
    assert all(layer.codec == layer.dtype for layer in portable.layers)
    assert portable.total_bytes <= dense.total_bytes + 200  # the metadata entry


def test_lenet_at_3_6_percent_meets_the_size_goals(tmp_path):
    from ticketc.models import lenet300

    model = lenet300().eval()
    prune_random_(model, 0.036)
    x = torch.randn(1, 1, 28, 28)
    dense = export_model(model, x, tmp_path / "d.onnx", ExportConfig(format="dense", verify=False))
    for values, goal in {"fp32": 15, "fp16": 25, "int8": 45, "int4": 60}.items():
        portable = export_model(model, x, tmp_path / f"{values}.onnx", ExportConfig(values=values))
        assert dense.total_bytes / portable.total_bytes >= goal, values


# ------------------------------------------------------------------ what torch.onnx rewrites
def _masked_copy(model: nn.Module) -> nn.Module:
    """The user's masked model with its hooks folded in (prune.remove; in place)."""
    out = model
    for module in out.modules():
        for name in [n[:-5] for n, _ in module.named_buffers(recurse=False) if n.endswith("_mask")]:
            prune.remove(module, name)
    return out


ZOO = {
    "resnet": (zoo.resnet_tiny, lambda: {"x": torch.randn(2, 3, 8, 8)}),
    "tied_lm": (zoo.tied_lm, lambda: {"ids": torch.randint(0, 50, (2, 7))}),
    "recurrent": (zoo.recurrent, lambda: {"x": torch.randn(2, 5, 6)}),
    "upsampler": (zoo.upsampler, lambda: {"x": torch.randn(2, 3, 6, 6)}),
    "dict_output": (zoo.dict_output, lambda: {"x": torch.randn(2, 10)}),
    "relpos_attention": (zoo.relpos_attention, lambda: {"x": torch.randn(2, 6, 16)}),
}


@pytest.mark.slow
@pytest.mark.parametrize("values", ["fp32", "fp16", "int8", "int4"])
@pytest.mark.parametrize("arch", list(ZOO))
def test_rewritten_graphs_export_and_match_the_masked_model(tmp_path, arch, values):
    factory, inputs = ZOO[arch]
    torch.manual_seed(0)
    model = factory().eval()
    prune_global_(model, 0.9)  # hooks still on, as the user holds it
    example = inputs()
    result = export_model(model, example, tmp_path / "m.onnx", ExportConfig(values=values))
    assert result.verification is not None and result.verification.passed
    stored = [layer for layer in result.layers if layer.codec not in (layer.dtype, "zeros")]
    assert stored, "nothing was stored compactly"
    assert_matches_model(tmp_path / "m.onnx", model, inputs(), values)


def test_folded_batchnorm_is_read_from_the_graph_not_the_parameter(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    model[1].running_var.fill_(4.0)
    prune_global_(model, 0.9)
    for values in ("fp32", "int4"):
        result = export_model(
            model, torch.randn(1, 3, 6, 6), tmp_path / "m.onnx", ExportConfig(values=values)
        )
        conv = next(layer for layer in result.layers if layer.shape == (8, 3, 3, 3))
        assert conv.sources and conv.sources[0].endswith("*")  # values rewritten by torch.onnx
        assert_matches_model(tmp_path / "m.onnx", model, {"x": torch.randn(3, 3, 6, 6)}, values)


def test_a_wrong_lossy_weight_fails_even_when_outputs_look_close(tmp_path, monkeypatch):
    """The decoded weights are checked against the graph's within the quantizer's bound."""
    from ticketc.formats import compact as compact_module

    model, x = _model("mlp", density=0.3)
    real = compact_module.Compact.entry_values

    def corrupt(self):
        values = real(self)
        values[3] += 0.1 * float(np.abs(values).max())
        return values

    from ticketc.formats import decode_check

    monkeypatch.setattr(decode_check, "check_decoded", _wrong_check(decode_check))
    with pytest.raises(UserError, match="no file written"):
        export_model(model, x, tmp_path / "m.onnx", ExportConfig(values="int4"))
    assert not (tmp_path / "m.onnx").exists()
    del corrupt


def _wrong_check(decode_check):
    """check_decoded as the exporter calls it, but on a decoded tensor with one wrong weight."""
    real = decode_check.check_decoded

    def check(compact, originals, decoded):
        bad = [d.copy() for d in decoded]
        flat = bad[0].reshape(-1)
        i = int(np.flatnonzero(originals[0].reshape(-1))[0])
        flat[i] += 0.1 * float(np.abs(originals[0]).max())
        return real(compact, originals, bad)

    return check


def test_fp16_model_is_exported_in_fp16_or_said(tmp_path):
    torch.manual_seed(0)
    model = tiny_mlp().eval()
    prune_global_(model, 0.8)
    half = _masked_copy(model).half()  # pruned, hooks removed, then cast
    result = export_model(half, torch.randn(2, 20, dtype=torch.float16), tmp_path / "m.onnx")
    assert result.verification is not None and result.verification.passed
    stored = [layer for layer in result.layers if "+" in layer.codec]
    assert stored
    if result.dtype == "float16":
        assert all(layer.dtype == "fp16" for layer in stored)
        x = torch.randn(3, 20, dtype=torch.float16)
    else:  # onnxruntime's CPU provider lacked an fp16 kernel: said in a note
        assert any("fp32" in note for note in result.notes)
        x = torch.randn(3, 20)
    assert_matches_model(tmp_path / "m.onnx", lambda t: half(t.half()), {"x": x}, "fp16")


def test_export_model_takes_a_model_with_prune_hooks_and_leaves_it_alone(tmp_path):
    model = tiny_mlp().eval()
    prune.global_unstructured(
        [(model[1], "weight"), (model[3], "weight")], prune.L1Unstructured, amount=0.9
    )
    before = {n: t.clone() for n, t in model.state_dict().items()}
    export_model(model, torch.randn(1, 20), tmp_path / "m.onnx")
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert hasattr(model[1], "weight_mask")
    assert_matches_model(tmp_path / "m.onnx", model, {"x": torch.randn(4, 20)}, "fp32")


def test_onnx_in_compresses_an_existing_file_and_keeps_outputs(tmp_path):
    model, x = _model("conv2d", density=0.1)
    dense = tmp_path / "dense.onnx"
    export_model(model, x, dense, ExportConfig(format="dense"))
    before = dense.stat().st_size + sum(p.stat().st_size for p in tmp_path.glob("dense.onnx.data"))
    result = export_onnx_file(dense, tmp_path / "small.onnx")
    assert result.total_bytes < before / 3
    name = onnx.load(str(dense)).graph.input[0].name
    x3 = torch.randn(3, 4, 8, 8)
    assert_matches_model(tmp_path / "small.onnx", model, {name: x3}, "fp32")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter writes them
def test_onnx_in_says_which_weights_listed_as_inputs_are_inputs_no_more(tmp_path):
    """An old-IR file lists its initializers as graph inputs too (overridable, as
    keep_initializers_as_inputs=True writes them); a weight the file computes cannot be one:
    its input slot goes, with a note naming it, and the other inputs stay."""
    model, x = _model("mlp", density=0.2)
    dense = tmp_path / "dense.onnx"
    torch.onnx.export(model, (x,), dense, dynamo=False, keep_initializers_as_inputs=True)
    listed = {i.name for i in onnx.load(str(dense)).graph.input}
    result = export_onnx_file(dense, tmp_path / "small.onnx")
    computed = {x.initializer for x in result.layers if "+" in x.codec}
    assert computed and computed <= listed
    left = {i.name for i in onnx.load(str(tmp_path / "small.onnx")).graph.input}
    assert left == listed - computed
    said = [n for n in result.notes if "inputs no more" in n]
    assert said and all(name in said[0] for name in computed)


@pytest.mark.parametrize(
    ("values", "positions"),
    [("int4", "bitmask"), ("int4", "rice"), ("int8", "auto"), ("fp32", "auto")],
)
def test_inspect_reads_codec_bytes_and_nnz_from_the_stored_streams(tmp_path, values, positions):
    from ticketc.inspect import inspect_file

    model, x = _model("mlp", density=0.3)
    config = ExportConfig(values=values, positions=positions)
    result = export_model(model, x, tmp_path / "m.onnx", config)
    seen = {layer.name: layer for layer in inspect_file(tmp_path / "m.onnx").layers}
    stored = [layer for layer in result.layers if "+" in layer.codec]
    assert stored
    for layer in stored:
        got = seen[layer.initializer]
        assert got.codec == layer.codec  # as stored, never re-encoded from decoded values
        if positions != "auto":
            assert got.codec.startswith(positions + "+")
        assert got.codec_bytes == layer.nbytes
        assert got.nnz == layer.nnz  # from the positions, not from decoded values
    params = dict(model.named_parameters())
    weights = [n for n in seen if n in params and params[n].dim() == 2]
    assert weights
    for name in weights:
        assert seen[name].nnz == int(params[name].count_nonzero())


def test_inspect_names_the_parameters_behind_renamed_initializers(tmp_path):
    """torch.onnx names a transposed weight val_N; inspect gives the PyTorch parameter the
    file's metadata records beside it, as the sparsity card does."""
    from ticketc.inspect import inspect_file

    torch.manual_seed(0)
    model = tied_lm().eval()
    prune_global_(model, 0.8)
    result = export_model(model, torch.randint(0, 50, (2, 7)), tmp_path / "m.onnx")
    seen = {layer.name: layer for layer in inspect_file(tmp_path / "m.onnx").layers}
    renamed = [x for x in result.layers if "+" in x.codec and x.sources != [x.initializer]]
    assert any(x.sources == ["mix.weight"] for x in renamed)  # torch.onnx's MatMul operand
    for layer in renamed:
        assert seen[layer.initializer].source == ",".join(layer.sources)


TRANSFORMERS = {
    "bert": (
        zoo.bert_tiny,
        lambda: {
            "input_ids": torch.randint(1, 99, (2, 8)),
            "attention_mask": torch.ones(2, 8, dtype=torch.int64),
        },
    ),
    "gpt2": (zoo.gpt2_tiny, lambda: {"input_ids": torch.randint(1, 99, (2, 8))}),
    "albert": (zoo.albert_tiny, lambda: {"input_ids": torch.randint(1, 99, (2, 8))}),
    "llama": (zoo.llama_tiny, lambda: {"input_ids": torch.randint(1, 99, (2, 8))}),
    "vit": (zoo.vit_tiny, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}),
    "whisper": (
        zoo.whisper_tiny,
        lambda: {
            "input_features": torch.randn(2, 8, 32),
            "decoder_input_ids": torch.tensor([[1, 5, 7]] * 2),
        },
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("values", ["fp32", "int4"])
@pytest.mark.parametrize("arch", list(TRANSFORMERS))
def test_transformers_from_tiny_configs_match_the_masked_model(tmp_path, arch, values):
    factory, inputs = TRANSFORMERS[arch]
    torch.manual_seed(0)
    model = factory().eval()
    prune_global_(model, 0.9)  # hooks on
    example = {k: v[:1] for k, v in inputs().items()}
    result = export_model(model, example, tmp_path / "m.onnx", ExportConfig(values=values))
    assert [layer for layer in result.layers if "+" in layer.codec]
    fresh = inputs()
    with torch.no_grad():
        logits = _flat(model(**fresh))[0].double().numpy()
    names = [i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input]
    got = _ort(tmp_path / "m.onnx", {n: fresh[n].numpy() for n in names})[0]
    rel = np.abs(got - logits).max() / np.abs(logits).max()
    assert rel <= LOSSY_RTOL[values], rel


def test_a_weight_shared_across_depth_is_stored_once(tmp_path):
    """torch.onnx folds a shared weight's transpose once per use in ALBERT (its one encoder
    layer came as one copy per layer: 6 copies, a 1.5x smaller file at 90 %); the file holds
    it once and matches the model."""
    torch.manual_seed(0)
    model, inputs = zoo.albert_tiny().eval(), {"input_ids": torch.randint(1, 99, (2, 8))}
    prune_global_(model, 0.8)
    result = export_model(model, inputs, tmp_path / "m.onnx")
    per_parameter: dict[str, int] = {}
    for layer in result.layers:
        for source in layer.sources:
            per_parameter[source] = per_parameter.get(source, 0) + 1
    assert any(name.endswith("query.weight") for name in per_parameter)
    assert all(count == 1 for count in per_parameter.values()), per_parameter
    assert any("stored once" in note for note in result.notes)
    assert_matches_model(tmp_path / "m.onnx", model, {"ids": torch.randint(1, 99, (3, 11))}, "fp32")


class _GRUTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0])


def _float_sequence_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return {
        "gru": (_GRUTagger(), (2, 5, 6)),  # [batch, time, features]
        "encoder": (nn.TransformerEncoder(layer, 1), (2, 5, 16)),
        "lstm": (zoo.recurrent(), (2, 5, 6)),
        "conv1d": (nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 1)), (2, 3, 9)),
        "one_feature": (nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 2)), (2, 1)),
    }


@pytest.mark.parametrize("arch", ["gru", "encoder", "lstm", "conv1d", "one_feature"])
def test_a_float_input_keeps_dim_1_dynamic_where_the_model_leaves_it_free(tmp_path, arch):
    """A batch-first float sequence [batch, time, features] was exported with its time fixed
    at the traced length, no note, against --input's help; now dim 1 of a 2-D / 3-D float
    input is dynamic where the model leaves it free, and fixed where the model fixes it (a
    Conv1d's channels, a Linear's single feature, never widened to trace). torch.onnx's LSTM
    fails at other lengths in onnxruntime: its length is fixed, with a note."""
    torch.manual_seed(0)
    model, shape = _float_sequence_models()[arch]
    model = model.eval()
    prune_global_(model, 0.5)
    result = export_model(model, torch.randn(shape), tmp_path / "m.onnx")
    (port,) = onnx.load(str(tmp_path / "m.onnx")).graph.input
    dims = [d.dim_param or d.dim_value for d in port.type.tensor_type.shape.dim]
    free = arch in ("gru", "encoder")
    assert dims == ["batch", "sequence" if free else shape[1], *shape[2:]], dims
    fixed_with_note = any(note.startswith("sequence length fixed") for note in result.notes)
    assert fixed_with_note == (arch == "lstm"), result.notes
    other = (3, shape[1] + 4 if free else shape[1], *shape[2:])
    assert_matches_model(tmp_path / "m.onnx", model, {"x": torch.randn(other)}, "fp32")


def test_onnx_in_stores_equal_initializers_once_and_keeps_shapes_apart(tmp_path):
    """Two initializers of the same values are stored once, every use pointing at the one
    kept; a scalar 0 and a [1] tensor holding 0 are different tensors and both stay."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 16)) * (rng.random((16, 16)) < 0.2)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w1"),
        numpy_helper.from_array(w.copy(), "w2"),
        numpy_helper.from_array(np.array(0, np.int64), "scalar0"),
        numpy_helper.from_array(np.array([0], np.int64), "vector0"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "w2"], ["y"]),
        helper.make_node("Gather", ["y", "scalar0"], ["first"], axis=1),  # [batch, 16]
        helper.make_node("Gather", ["y", "vector0"], ["kept"], axis=1),  # [batch, 1, 16]
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 16])],
        [
            helper.make_tensor_value_info("first", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("kept", TensorProto.FLOAT, None),
        ],
        inits,
    )
    dense = tmp_path / "dense.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), dense)
    result = export_onnx_file(dense, tmp_path / "small.onnx")
    assert sum(1 for x in result.layers if x.initializer in ("w1", "w2")) == 1
    assert any("stored once" in note for note in result.notes)
    x = rng.standard_normal((3, 4, 16)).astype(np.float32)
    want = _ort(dense, {"x": x})
    got = _ort(tmp_path / "small.onnx", {"x": x})
    assert [g.shape for g in got] == [(3, 16), (3, 1, 16)]
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("same_mask", [True, False])
def test_a_tied_weight_pruned_through_two_modules_keeps_each_modules_mask(tmp_path, same_mask):
    """Global pruning lists a tied weight once per module; at the threshold the two masks can
    differ (Whisper's embedding and head did). Each module must keep its own product."""
    torch.manual_seed(0)
    model = tied_lm().eval()
    keep = torch.rand(50, 16) < 0.2
    other = keep if same_mask else keep & (torch.rand(50, 16) < 0.7)
    prune.custom_from_mask(model.embed, "weight", keep)
    prune.custom_from_mask(model.head, "weight", other)
    result = export_model(model, torch.randint(0, 50, (1, 7)), tmp_path / "m.onnx")
    assert result.verification is not None and result.verification.passed
    tied = [layer for layer in result.layers if sorted(layer.shape) == [16, 50]]
    assert tied and all(layer.nnz <= 160 for layer in tied)  # compact, whatever form it takes
    ids = torch.randint(0, 50, (3, 9))
    assert_matches_model(tmp_path / "m.onnx", model, {"ids": ids}, "fp32")


class _LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("values", ["fp16", "int8", "int4"])
def test_a_mixed_density_group_matches_the_masked_model(tmp_path, values):
    """90 %-pruned LSTM matrices and their fully dense packed biases (ONNX B [1, 8 h]): the
    biases ride in the sparse group's dense tail, and onnxruntime matches the masked model."""
    torch.manual_seed(0)
    model = _LSTMHead().eval()
    prune.global_unstructured(
        [(model.lstm, f"weight_{w}_l{i}") for w in ("ih", "hh") for i in (0, 1)]
        + [(model.fc, "weight")],
        prune.L1Unstructured,
        amount=0.9,
    )
    path = tmp_path / "m.onnx"
    result = export_model(model, torch.randn(1, 5, 16), path, ExportConfig(values=values))
    assert result.verification is not None and result.verification.passed
    codecs = {layer.codec for layer in result.layers}
    assert f"rice+{values}" in codecs, codecs
    if values == "fp16":  # the integer types leave biases exact (below)
        assert f"dense+{values}" in codecs, codecs
        groups = read_metadata(onnx.load(str(path)))["groups"]
        assert any("/" in codec for codec in groups.values()), groups  # a dense tail
    assert_matches_model(path, model, {"x": torch.randn(3, 5, 16)}, values)


@pytest.mark.parametrize("values", ["int8", "int4"])
def test_integer_values_quantize_weights_and_leave_biases_and_norms_exact(tmp_path, values):
    """Biases, norm scales and BatchNorm statistics (vector-like: at most 2 entries per entry
    of the longest axis) keep their values; quantizing them was what broke outputs."""
    torch.manual_seed(0)
    model = _LSTMHead().eval()
    prune.global_unstructured(
        [(model.lstm, f"weight_{w}_l{i}") for w in ("ih", "hh") for i in (0, 1)],
        prune.L1Unstructured,
        amount=0.9,
    )
    x = torch.randn(1, 5, 16)
    result = export_model(model, x, tmp_path / "q.onnx", ExportConfig(values=values))
    export_model(model, x, tmp_path / "exact.onnx")

    def held(path) -> dict[str, np.ndarray]:
        graph = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        return {**graph, **decoded_weights(path)}

    quantized, exact = held(tmp_path / "q.onnx"), held(tmp_path / "exact.onnx")
    vectors = [layer for layer in result.layers if np.prod(layer.shape) <= 2 * max(layer.shape)]
    assert vectors and any(layer.codec.endswith(values) for layer in result.layers)
    for layer in vectors:
        assert not layer.codec.endswith(values), layer
        np.testing.assert_array_equal(quantized[layer.initializer], exact[layer.initializer])


@torch.library.custom_op("ticketc_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _twice_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Untranslatable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _twice(self.fc(x))


def test_an_operator_torch_onnx_cannot_translate_is_named_with_its_layer_and_why(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), _Untranslatable())
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError) as error:
        export_model(model, torch.randn(1, 4), out)
    message = str(error.value)
    layer = "layer '1' (tests.test_export._Untranslatable)"
    assert f"{layer} uses ticketc_test.twice.default" in message
    assert "No ONNX function found" in message  # torch.onnx's own reason, after the layer
    assert "\n" not in message and not out.exists()


class _SequenceFirstLSTM(nn.Module):
    """An LSTM fed [time, batch, features] (batch_first=False): torch.onnx keeps the traced
    time length inside the graph, so axis 0 cannot stay dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0])


@pytest.mark.parametrize("given_sample", [False, True])
def test_dynamic_axes_that_fail_at_another_size_are_fixed_and_said(tmp_path, given_sample):
    torch.manual_seed(0)
    model = _SequenceFirstLSTM().eval()
    prune.global_unstructured(
        [(model.lstm, n) for n, _ in model.lstm.named_parameters() if n.startswith("weight")],
        prune.L1Unstructured,
        amount=0.9,
    )
    x = torch.randn(7, 3, 8)
    sample = x if given_sample else None
    result = export_model(model, x, tmp_path / "m.onnx", sample=sample)
    assert any(note.startswith("input shapes fixed at") for note in result.notes), result.notes
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [7, 3, 8]  # what the graph can take, and only that
    assert_matches_model(tmp_path / "m.onnx", model, {"x": torch.randn(7, 3, 8)}, "fp32")


class _EncoderDecoder(nn.Module):
    """Source and target token ids of independent lengths (an encoder-decoder's inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        memory = self.embed(source).mean(dim=1, keepdim=True)
        return self.head(self.embed(target) + memory)


def test_a_sequence_free_of_another_gets_its_own_name(tmp_path):
    """One dim name for the source's and the target's lengths told onnxruntime they are
    equal (it warned at every run where they were not): the target's is named after it."""
    torch.manual_seed(0)
    model = _EncoderDecoder().eval()
    prune.global_unstructured([(model.head, "weight")], prune.L1Unstructured, amount=0.5)
    out = tmp_path / "m.onnx"
    ids = {"source": torch.randint(0, 50, (1, 9)), "target": torch.randint(0, 50, (1, 4))}
    export_model(model, ids, out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes == {"source": ["batch", "sequence"], "target": ["batch", "target_sequence"]}
    assert session.get_outputs()[0].shape == ["batch", "target_sequence", 5]
    inputs = {"source": torch.randint(0, 50, (2, 11)), "target": torch.randint(0, 50, (2, 3))}
    assert_matches_model(out, model, inputs, "fp32")


class _TokensLstmGru(nn.Module):
    """Token ids -> Embedding -> LSTM -> GRU -> Linear: torch.onnx keeps the traced length
    in a Reshape between the two, so the graph fails at any other sequence length."""

    def __init__(self, gru: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, batch_first=True)
        self.gru = nn.GRU(24, 12, batch_first=True) if gru else None
        self.fc = nn.Linear(12 if gru else 24, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.lstm(self.embed(ids))[0]
        return self.fc(self.gru(y)[0] if self.gru is not None else y)


@pytest.mark.parametrize("gru", [True, False])
def test_a_sequence_axis_is_checked_at_another_length_and_fixed_alone_where_it_fails(tmp_path, gru):
    """Token ids get dynamic batch and sequence axes; the file is checked at another batch
    and another length. Where only the length fails, the batch stays dynamic."""
    torch.manual_seed(0)
    model = _TokensLstmGru(gru).eval()
    prune.global_unstructured(
        [(model.fc, "weight"), (model.embed, "weight")], prune.L1Unstructured, amount=0.5
    )
    out = tmp_path / "m.onnx"
    result = export_model(model, torch.randint(0, 50, (1, 7)), out)
    fixed = [n for n in result.notes if n.startswith("sequence length fixed at")]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 7 if gru else "sequence"]
    # the output declares the same axes (was [s23, 7, 3]: onnxruntime warned at every other
    # length that the declared shape does not match)
    assert session.get_outputs()[0].shape == ["batch", 7 if gru else "sequence", 3]
    assert bool(fixed) == gru, result.notes
    for shape in [(3, 7)] + ([] if gru else [(2, 12), (4, 1)]):
        ids = torch.randint(0, 50, shape)
        assert_matches_model(out, model, {"ids": ids}, "fp32")


def test_an_lstm_with_a_projection_is_refused_naming_the_layer(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(8, 16, proj_size=4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match=r"layer 'rnn' \(torch.nn.modules.rnn.LSTM\).*proj_size=4"):
        export_model(Net().eval(), torch.randn(2, 5, 8), out)
    assert not list(tmp_path.iterdir())


def test_a_failure_on_the_staged_file_names_the_output_not_the_staging_folder(
    tmp_path, monkeypatch
):
    def failing(path, *args, **kwargs):
        raise UserError(f"{path}: onnxruntime failed on the sample (a kernel's error)")

    monkeypatch.setattr("ticketc.export.onnx_export.verify", failing)
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError) as caught:
        export_model(nn.Linear(4, 2).eval(), torch.randn(1, 4), out)
    assert str(caught.value) == f"{out}: onnxruntime failed on the sample (a kernel's error)"
    assert not list(tmp_path.iterdir())


class _WithScalar(nn.Module):
    """Logits and a 0-d output beside them (a loss, a sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x)
        return y, y.sum()


@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_a_zero_dimensional_output_is_compared_like_any_other(tmp_path, values):
    """A 0-d output was an internal error in the output check (a numpy scalar difference)."""
    torch.manual_seed(0)
    model = _WithScalar().eval()
    prune.global_unstructured([(model.fc, "weight")], prune.L1Unstructured, amount=0.9)
    out = tmp_path / "m.onnx"
    result = export_model(model, torch.randn(1, 16), out, ExportConfig(values=values))
    assert [o.name for o in result.verification.outputs] == ["output0", "output1"]
    assert_matches_model(out, model, {"x": torch.randn(5, 16)}, values)


def test_a_bf16_program_is_not_cast_and_says_how_to_get_a_file(tmp_path):
    """A program's guards and graph keep the dtype it was traced in: casting it to fp32 (the
    fallback where onnxruntime's CPU provider cannot run bf16, or --dtype fp32) failed in
    torch.export with "Tensor dtype mismatch", and the message then advised --dtype fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    prune.global_unstructured([(model[0], "weight")], prune.L1Unstructured, amount=0.9)
    prune.remove(model[0], "weight")
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    program = torch.export.export(model, (x,))
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="keeps the float type it was traced in .bf16.: export"):
        export_model(program, x, out)
    with pytest.raises(UserError, match="--dtype fp32: a torch.export program keeps"):
        export_model(program, x, out, ExportConfig(dtype="fp32"))
    assert not list(tmp_path.iterdir())
    export_model(program, x, out, ExportConfig(verify=False))
    assert read_metadata(onnx.load(str(out)))["dtype"] == "bfloat16"


def test_a_program_keeps_the_axes_it_made_dynamic_and_no_other(tmp_path):
    """A .pt2 program of a sequence-first LSTM made dynamic in its batch (axis 1): the file
    takes any batch at the traced length."""
    torch.manual_seed(0)
    model = _SequenceFirstLSTM().eval()
    prune.global_unstructured([(model.fc, "weight")], prune.L1Unstructured, amount=0.9)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (torch.randn(7, 3, 8),), dynamic_shapes=({1: batch},))
    out = tmp_path / "m.onnx"
    export_model(program, torch.randn(7, 3, 8), out)
    length, size, features = ort.InferenceSession(str(out)).get_inputs()[0].shape
    assert (length, features) == (7, 8) and isinstance(size, str)
    assert_matches_model(out, model, {"x": torch.randn(7, 5, 8)}, "fp32")


class _IllConditioned(nn.Module):
    """Many layers without normalisation: fp32 rounding grows layer by layer past 1e-5."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(64, 64) for _ in range(24)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_rounding_the_network_amplifies_is_accepted_and_said_more_is_not(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _IllConditioned().eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.mul_(3.0)  # gain ~1.7 per layer: rounding grows along the chain
    from ticketc.inputs import ExampleInputs
    from ticketc.verify import fp32_rounding

    x = torch.randn(2, 64)
    rounding = fp32_rounding(model, ExampleInputs((x,)))
    config = ExportConfig(tolerance=rounding / 3)  # PyTorch's own rounding exceeds it
    result = export_model(model, x, tmp_path / "m.onnx", config, sample=x)
    assert any("PyTorch's own fp32 rounding" in n for n in result.notes), result.notes
    # a difference beyond what PyTorch's rounding explains still fails
    monkeypatch.setattr("ticketc.export.onnx_export.fp32_rounding", lambda *a: rounding / 1000)
    with pytest.raises(UserError, match="verification failed"):
        export_model(model, x, tmp_path / "tight.onnx", config, sample=x)
    assert not (tmp_path / "tight.onnx").exists()


@pytest.mark.parametrize(("opset", "message"), [(17, "below the minimum"), (99, "past the latest")])
def test_an_opset_outside_what_onnx_knows_is_refused(tmp_path, capsys, opset, message):
    # torch.onnx wrote opset 18 for --opset 99, without a word
    with pytest.raises(ValueError, match=message):
        ExportConfig(opset=opset)
    from ticketc.cli import main

    torch.save(tiny_mlp().state_dict(), tmp_path / "sd.pt")
    arch = "--arch=tests.models_for_tests:tiny_mlp"
    argv = [
        "export",
        str(tmp_path / "sd.pt"),
        arch,
        f"--opset={opset}",
        "-o",
        str(tmp_path / "m.onnx"),
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


class _WithFlag(nn.Module):
    """A keyword input that is no tensor (as transformers' use_cache=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, *, doubled: bool = True) -> torch.Tensor:
        return self.fc(x) * (2 if doubled else 1)


def test_a_program_with_a_constant_keyword_input_exports_with_that_value(tmp_path):
    """torch.export records `doubled=False` as a constant input its guards require: the
    file computes the program as traced, from its tensor inputs alone."""
    from ticketc.cli import main

    torch.manual_seed(0)
    model = _WithFlag().eval()
    prune.l1_unstructured(model.fc, "weight", amount=0.5)
    prune.remove(model.fc, "weight")
    program = torch.export.export(model, (), {"x": torch.randn(2, 8), "doubled": False})
    torch.export.save(program, tmp_path / "m.pt2")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.pt2"), "-o", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x, doubled=False).numpy()
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, rtol=1e-5)


@pytest.mark.parametrize(("values", "small"), [("fp16", 1e-8), ("int8", 1e-3)])
def test_kept_weights_that_decode_to_zero_are_counted_in_a_note(tmp_path, values, small):
    """fp16 flushes a kept 1e-8 to 0; int8 with an outlier in the row rounds a kept 1e-3 to
    0: both within the value type's bound, but the file holds a zero the mask does not."""
    layer = nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, :8] = torch.tensor([1000.0, small, small, small, 500, -700, 200, 100])
        layer.weight[1:, 8:] = 1.0
    result = export_model(
        layer.eval(), torch.randn(1, 16), tmp_path / "m.onnx", ExportConfig(values=values)
    )
    notes = [n for n in result.notes if "decode to 0" in n]
    assert notes == [
        f"weight: 3 kept weight(s) decode to 0 in {values} (below its resolution there)"
    ]
    exact = export_model(layer.eval(), torch.randn(1, 16), tmp_path / "e.onnx")
    assert not [n for n in exact.notes if "decode to 0" in n]
