"""`--input`: one parser (`InputSpec.parse`) for every command, both shape spellings, optional
name, dtype and value range; example inputs built from specs; `ExampleInputs` carrying
positional and keyword arguments of any kind."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from tests.models_for_tests import prune_random_, tiny_mlp
from ticketc.cli import main
from ticketc.compile import load_program
from ticketc.errors import UserError
from ticketc.inputs import ExampleInputs, InputSpec, inputs_from_specs, parse_shape

ARCH = "tests.models_for_tests:tiny_mlp"


@pytest.mark.parametrize(
    "text, name, dtype, shape, bounds",
    [
        ("input_ids:int64:1,128", "input_ids", torch.int64, (1, 128), (None, None)),
        ("input_ids:int64:1x128", "input_ids", torch.int64, (1, 128), (None, None)),
        ("input_ids:INT64:1X128:0-999", "input_ids", torch.int64, (1, 128), (0, 1000)),
        ("int64:2,7", None, torch.int64, (2, 7), (None, None)),
        ("x:1x3x32x32", "x", torch.float32, (1, 3, 32, 32), (None, None)),
        ("pixels:fp16:1,3,8,8", "pixels", torch.float16, (1, 3, 8, 8), (None, None)),
        ("1,784", None, torch.float32, (1, 784), (None, None)),
    ],
)
def test_every_spelling_parses(text, name, dtype, shape, bounds):
    spec = InputSpec.parse(text)
    assert (spec.name, spec.dtype, spec.shape, (spec.low, spec.high)) == (
        name, dtype, shape, bounds
    )  # fmt: skip


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "expected NAME:DTYPE:SHAPE"),
        ("a:b:c:d:e", "expected NAME:DTYPE:SHAPE"),
        ("ids::1x8", "expected NAME:DTYPE:SHAPE"),
        ("ids:int64", "no shape"),
        ("ids:int64:1,-8", "shape '1,-8' is not like 1x128"),
        ("ids:int64:1x8:0-", "range '0-' is not like 0-999"),
        ("mask:bool:1x8:0-1", "integer inputs only"),
        ("ids:text:1x8", "unknown dtype 'text'"),
        ("my-ids:int64:1x8", "input name 'my-ids' is not an identifier"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_bad_part(text, message):
    with pytest.raises(UserError, match=message) as raised:
        InputSpec.parse(text)
    assert "\n" not in str(raised.value) and repr(text) in str(raised.value)


def test_input_shape_takes_both_spellings_and_names_itself_in_errors():
    assert parse_shape("1,20") == parse_shape("1x20") == (1, 20)
    with pytest.raises(UserError, match="input shape '1,x'"):
        parse_shape("1,x")
    with pytest.raises(UserError, match=r"'100000,100000' has 10,000,000,000 elements, over 2\^31"):
        parse_shape("100000,100000")


def test_specs_become_positional_or_keyword_inputs_with_the_given_values():
    positional = inputs_from_specs([InputSpec.parse("2,20"), InputSpec.parse("int64:2")])
    assert [t.shape for t in positional.args] == [(2, 20), (2,)] and not positional.kwargs
    named = inputs_from_specs(
        [InputSpec.parse("ids:int64:3x5:10-12"), InputSpec.parse("x:3x4")], nn.Embedding(50, 2)
    )
    assert not named.args and set(named.kwargs) == {"ids", "x"}
    assert set(named.kwargs["ids"].unique().tolist()) <= {10, 11, 12}
    assert named.kwargs["x"].dtype == torch.float32 and named.batch == 3
    with pytest.raises(UserError, match="name all inputs or none"):
        inputs_from_specs([InputSpec.parse("x:2x4"), InputSpec.parse("2x4")])
    with pytest.raises(UserError, match="repeat"):
        inputs_from_specs([InputSpec.parse("x:2x4"), InputSpec.parse("x:2x4")])


def test_example_inputs_keep_values_that_are_not_tensors():
    inputs = ExampleInputs.of({"ids": torch.zeros(2, 3, dtype=torch.int64), "scale": 2.0})
    wider = inputs.at_batch(5).to(dtype=torch.float64)
    assert wider.kwargs["ids"].shape == (5, 3) and wider.kwargs["ids"].dtype == torch.int64
    assert wider.kwargs["scale"] == 2.0 and wider.describe() == "ids int64[5, 3], scale float"
    with pytest.raises(TypeError, match="a tensor, a tuple of positional arguments or a dict"):
        ExampleInputs.of(3)


@pytest.fixture
def model_file(tmp_path):
    model = tiny_mlp()
    prune_random_(model, 0.2)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    return tmp_path / "sd.pt"


@pytest.mark.parametrize("command", ["export", "compile", "bench"])
def test_every_command_gives_the_same_line_for_a_bad_spec(tmp_path, model_file, capsys, command):
    argv = [command, str(model_file), "--arch", ARCH, "--input", "input:float32:1x20:0"]
    out = tmp_path / ("out.pt2" if command == "compile" else "out")
    assert main([*argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--input 'input:float32:1x20:0': range '0' is not like 0-999"), err
    assert not out.exists()


def test_compile_takes_named_typed_inputs(tmp_path, model_file):
    """compile runs the model on every --input, by name (nn.Sequential's argument is `input`,
    and so is that of the CsrSequential that replaces it)."""
    out = tmp_path / "m.pt2"
    argv = ["compile", str(model_file), "--arch", ARCH, "--input", "input:float32:2x20"]
    assert main([*argv, "-o", str(out), "--json"]) == 0
    model = tiny_mlp()
    model.load_state_dict(torch.load(model_file))
    x = torch.randn(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(load_program(out).module()(input=x), model.eval()(x))


def test_a_range_must_fit_the_dtype():
    with pytest.raises(UserError, match="range '0-300' does not fit int8"):
        InputSpec.parse("ids:int8:1x8:0-300")
    assert InputSpec.parse("ids:int8:1x8:0-127").high == 128


def test_an_input_larger_than_the_machine_can_hold_is_refused_before_any_allocation():
    """100000000x20 float32 (8 GB) passed the element bound; a run could only end killed."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = int(memory / 4 / 80) + 1  # just over a quarter of memory in float32 x 20
    with pytest.raises(UserError, match=r"more than a quarter of this machine's memory"):
        InputSpec.parse(f"x:float32:{rows}x20")
    assert InputSpec.parse("x:float32:1000x20").shape == (1000, 20)


def test_the_checks_random_inputs_stay_in_the_users_range():
    """Verification draws other inputs of the example's kinds: token ids the user bounded
    with LOW-HIGH stay in that range (before: ids below the smallest Embedding, whatever the
    range), kept through batch changes and tracing's widening."""
    from ticketc.export.trace import _widened, dynamic_axes
    from ticketc.inputs import random_like

    example = inputs_from_specs(
        [InputSpec.parse("ids:int64:2x6:100-199"), InputSpec.parse("mask:int64:2x6:0-1")],
        nn.Embedding(1000, 4),
    )
    model = nn.Embedding(1000, 4)
    traced = _widened(example.at_batch(1), dynamic_axes(example.at_batch(1), model))
    for inputs in (example, example.at_batch(3), example.map(lambda t: t.clone()), traced):
        drawn = random_like(inputs, model, seed=5, sizes=lambda k, a, s: s + 1)
        ids, mask = drawn.kwargs["ids"], drawn.kwargs["mask"]
        assert int(ids.min()) >= 100 and int(ids.max()) <= 199 and ids.unique().numel() > 10
        assert set(mask.unique().tolist()) == {0, 1}


def test_a_spec_without_a_dtype_takes_the_models_float_type():
    """The README's `--input 1,784` is one positional input in the model's float type: a bf16
    model got float32 and was refused."""
    bf16 = nn.Linear(4, 2).to(torch.bfloat16)
    (x,) = inputs_from_specs([InputSpec.parse("2,4")], bf16).args
    assert x.dtype == torch.bfloat16
    (named,) = inputs_from_specs([InputSpec.parse("x:2x4")], bf16).kwargs.values()
    assert named.dtype == torch.bfloat16
    (given,) = inputs_from_specs([InputSpec.parse("float32:2,4")], bf16).args
    assert given.dtype == torch.float32  # a dtype the user gave stays
    assert inputs_from_specs([InputSpec.parse("2,4")]).args[0].dtype == torch.float32


def test_random_inputs_keep_the_examples_final_token():
    """An example whose rows end with an end-of-sequence token (BART's classification head
    requires one per row) gets random inputs ending with it, and holding it nowhere else."""
    from ticketc.inputs import random_like

    ids = torch.tensor([[5, 7, 2], [9, 4, 2]])
    example = ExampleInputs((), {"input_ids": ids}, finals={"input_ids": 2})
    drawn = random_like(example.at_batch(3), nn.Embedding(10, 2), sizes=lambda k, a, s: s + 4 * a)
    out = drawn.kwargs["input_ids"]
    assert out.shape == (3, 7) and (out[:, -1] == 2).all() and not (out[:, :-1] == 2).any()
