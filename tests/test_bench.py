"""`ticketc bench`: every runtime's cell is timed or says why, outputs are checked before
timing, inputs from the command line, bad input is one line and exit 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tests.models_for_tests import prune_random_, tiny_mlp
from tests.real_models import BertLike, prune_global_, token_inputs
from ticketc.bench import RUNTIMES, BenchConfig, bench_model
from ticketc.bench import runtimes as rt
from ticketc.bench.core import entropy_bound_bytes
from ticketc.bench.report import plot, table_rows
from ticketc.bench.result import BenchResult, Cell, verdicts
from ticketc.cli import main
from ticketc.inputs import ExampleInputs, InputSpec, inputs_from_specs

ARCH = "tests.models_for_tests:tiny_mlp"
FAST = dict(budget_s=0.05, min_rounds=3, sizes=False, threads=1)


def _mlp() -> nn.Module:
    model = tiny_mlp()
    prune_random_(model, 0.2)
    return model.eval()


@pytest.mark.slow
def test_every_runtime_has_a_cell_per_batch_and_dense_is_the_baseline():
    result = bench_model(_mlp(), ExampleInputs.of(torch.randn(1, 20)), BenchConfig((1, 8), **FAST))
    assert {(c.runtime, c.batch) for c in result.cells} == {
        (r, b) for r in RUNTIMES for b in (1, 8)
    }
    for c in result.cells:
        assert (c.median_us is None) == (c.why is not None), c
    for b in (1, 8):
        assert result.cell(rt.TORCH_DENSE, b).speedup == pytest.approx(1.0)
        for name in (rt.COMPILED, rt.ORT, rt.TORCH_CSR):
            cell = result.cell(name, b)
            assert cell.median_us and cell.median_us > 0, cell
            assert cell.max_rel_error is not None and cell.max_rel_error <= 1e-4
    assert "plan" not in result.cell(rt.COMPILED, 1).note  # the plan itself: "2 csr" etc.
    assert any(ch.isdigit() for ch in result.cell(rt.COMPILED, 1).note)
    assert len(result.verdicts) == 2 and result.environment["torch_threads"] == 1


@pytest.mark.slow
def test_token_id_inputs_and_dict_outputs_run_in_every_runtime():
    torch.manual_seed(0)
    model = BertLike(vocab=50, dim=32, heads=2, ffn=64, layers=1, max_len=16).eval()
    prune_global_(model, 0.8)
    example = ExampleInputs.of(token_inputs(1, 8, vocab=50))
    result = bench_model(model, example, BenchConfig((2,), **FAST))
    for name in (rt.TORCH_DENSE, rt.COMPILED, rt.ORT, rt.TORCH_CSR):
        assert result.cell(name, 2).why is None, result.cell(name, 2)


def test_a_runtime_with_wrong_outputs_is_reported_and_not_timed(monkeypatch):
    def wrong(model):
        bad = tiny_mlp()  # other weights: other outputs
        return bad, 1, 2

    monkeypatch.setattr(rt, "torch_csr", wrong)
    result = bench_model(_mlp(), ExampleInputs.of(torch.randn(1, 20)), BenchConfig((4,), **FAST))
    cell = result.cell(rt.TORCH_CSR, 4)
    assert cell.median_us is None and "outputs differ" in (cell.why or "")


def test_a_model_without_linear_layers_says_why_torch_csr_does_not_apply():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    example = ExampleInputs.of(torch.randn(1, 3, 8, 8))
    result = bench_model(model, example, BenchConfig((1,), **FAST))
    assert "no nn.Linear" in (result.cell(rt.TORCH_CSR, 1).why or "")


def _result(speedups: dict[str, float | None]) -> BenchResult:
    cells = [
        Cell(
            r,
            4,
            median_us=None if s is None else 100 / s,
            speedup=s,
            why="because" if s is None else None,
        )  # fmt: skip
        for r, s in speedups.items()
    ]
    return BenchResult("m", "cpu", 1, [4], cells, [], 0.1, 10, {})


def test_the_verdict_says_where_sparse_loses():
    loses = _result({rt.TORCH_DENSE: 1.0, rt.COMPILED: 1.2, rt.PT2: 1.1, rt.ORT: 1.5,
                     rt.TORCH_CSR: None})  # fmt: skip
    (line,) = verdicts(loses)
    assert "onnxruntime dense is fastest" in line and "0.80x" in line and "LOSES" in line
    wins = _result({rt.TORCH_DENSE: 1.0, rt.COMPILED: 3.0, rt.PT2: 2.9, rt.ORT: 1.5,
                    rt.TORCH_CSR: 2.0})  # fmt: skip
    (line,) = verdicts(wins)
    assert "1.50x the fastest alternative (torch CSR)" in line and "3.00x torch dense" in line
    _, rows = table_rows(loses)
    assert any("n/a: because" in cell for row in rows for cell in row)


def test_the_plot_is_written_with_missing_cells(tmp_path):
    result = _result({rt.TORCH_DENSE: 1.0, rt.COMPILED: 1.2, rt.PT2: None, rt.ORT: 1.5,
                      rt.TORCH_CSR: None})  # fmt: skip
    plot(result, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_entropy_bound_counts_mask_entropy_and_values_of_the_weights():
    model = nn.Sequential(nn.Linear(100, 100), nn.BatchNorm1d(100))
    with torch.no_grad():
        model[0].weight.mul_(torch.arange(10000).reshape(100, 100) % 2 == 0)  # d = 0.5: 1 bit
    bits = 10000 * 1 + 5000 * 32  # mask + values; bias and norm left out
    assert entropy_bound_bytes(model, 32) == math.ceil(bits / 8)
    assert entropy_bound_bytes(model, 16) == math.ceil((10000 + 5000 * 16) / 8)


@pytest.mark.parametrize(
    "text, message",
    [
        ("ids:int64", "expected NAME:DTYPE:SHAPE"),
        ("ids:int99:1x8", "dtype 'int99'"),
        ("ids:int64:1xz", "is not like 1x128"),
        ("ids:int64:0x8", "is not like 1x128"),
        ("ids:int64:1x8:9-3", "is not like 0-999"),
        ("x:float32:1x8:0-3", "integer inputs only"),
        ("1x:int64:1x8", "expected NAME"),
    ],
)
def test_bad_input_specs_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        InputSpec.parse(text)


def test_input_specs_make_token_ids_below_the_vocabulary_and_all_one_masks():
    model = nn.Embedding(7, 4)
    inputs = inputs_from_specs(
        [InputSpec.parse("input_ids:int64:2x16"), InputSpec.parse("attention_mask:int64:2x16")],
        model,
    )
    ids, mask = inputs.kwargs["input_ids"], inputs.kwargs["attention_mask"]
    assert ids.dtype == torch.int64 and ids.shape == (2, 16) and ids.min() >= 0 and ids.max() < 7
    assert bool((mask == 1).all())
    ranged = InputSpec.parse("t:int32:3:5-6").make()
    assert ranged.dtype == torch.int32 and set(ranged.tolist()) <= {5, 6}
    with pytest.raises(ValueError, match="share dim 0"):
        inputs_from_specs([InputSpec.parse("a:int64:2x3"), InputSpec.parse("b:int64:3x3")])


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_mlp().state_dict(), path)
    return path


def test_cli_writes_json_and_png(tmp_path, model_file, capsys):
    out = tmp_path / "rep"
    argv = ["bench", str(model_file), "--arch", ARCH, "--input-shape", "1,20", "--batch-sizes",
            "1,4", "--threads", "1", "--budget", "0.05", "--no-sizes", "--json",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["cells"]) == 2 * len(RUNTIMES)
    assert result["environment"]["commit"] and result["environment"]["onnxruntime"]
    assert json.loads((out / "bench.json").read_text())["batch_sizes"] == [1, 4]
    assert (out / "bench.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-sizes", "1,x"], "--batch-sizes"),
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--threads", "0"], "--threads 0"),
        (["--input", "ids:int64"], "expected NAME:DTYPE:SHAPE"),
        (["--input", "ids:int64:1x20", "--input-shape", "1,20"], "either with --input"),
        (["--input", "x:float32:1x7"], "does not run on the given inputs"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, model_file, capsys, extra, message):
    argv = ["bench", str(model_file), "--arch", ARCH, "-o", str(tmp_path / "r"), *extra]
    if "--input" not in extra and "--input-shape" not in extra:
        argv += ["--input-shape", "1,20"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not (tmp_path / "r").exists()  # nothing written


def test_cli_refuses_a_ticketc_compiled_program(tmp_path, capsys):
    import ticketc.compile as tc

    x = torch.randn(2, 20)
    config = tc.CompileConfig(check=False, calibrate=False)
    compiled = tc.compile_model(_mlp(), config, example_input=x)
    path = tmp_path / "c.pt2"
    torch.export.save(tc.export_program(compiled, x), str(path))
    assert main(["bench", str(path), "--input-shape", "2,20", "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ticketc-compiled program" in err, err


def test_timed_samples_repeat_fast_calls_until_min_sample_s():
    from ticketc.compile.measure import TimingConfig, time_interleaved

    calls = {"fast": 0}

    def fast() -> None:
        calls["fast"] += 1

    config = TimingConfig(budget_s=0, min_rounds=3, max_rounds=3, warmup=1, min_sample_s=1e-3)
    timing = time_interleaved({"fast": fast}, config)["fast"]
    assert timing.rounds == 3
    assert calls["fast"] > 1 + 3 * 10  # warm-up, then every sample repeats the call
    assert timing.median < 1e-4  # seconds per call, not per sample
    with pytest.raises(ValueError, match="min_sample_s"):
        TimingConfig(min_sample_s=-1)


def test_sizes_of_a_model_with_named_token_inputs(tmp_path):
    """Export sizes are measured for token-id models too (named integer inputs), not n/a."""
    from ticketc.bench.core import _sizes
    from ticketc.inputs import ExampleInputs

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 4)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
            return self.head(h.mean(1))

    torch.manual_seed(0)
    model = Tokens().eval()
    with torch.no_grad():
        model.head.weight.mul_(torch.rand_like(model.head.weight) < 0.2)
    ids = torch.randint(0, 50, (2, 8))
    example = ExampleInputs.of({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    rows = _sizes(model, example, None, tmp_path)
    exported = [r for r in rows if r.name.startswith("ticketc ")]
    assert len(exported) == 4
    assert all(r.bytes and r.bytes > 0 for r in exported), exported
