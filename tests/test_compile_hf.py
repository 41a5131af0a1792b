"""A compiled transformers model's .pt2 loads in a fresh process with `import ticketc` alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ticketc.compile as tc
from tests.hf_models import pruned_model, save
from ticketc.cli import main
from ticketc.compile import CompileConfig, plan_of
from ticketc.compile.modules import SparseConv1D, is_conv1d

pytest.importorskip("transformers")


@pytest.mark.slow
def test_compiled_bert_program_loads_in_a_fresh_process(tmp_path):
    model = pruned_model("bert", 0.9)
    directory = save(model, tmp_path / "bert")
    out = tmp_path / "bert.pt2"
    assert main(["compile", str(directory), "-o", str(out)]) == 0
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=generator)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.save(expected, tmp_path / "expected.pt")
    # transformers' ModelOutput is not registered for pytree deserialisation: the program's
    # outputs must be plain dicts, or torch.export.load fails here
    code = (
        "import ticketc, torch; "
        f"p = torch.export.load({str(out)!r}).module(); "
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}); "
        f"e = torch.load({str(tmp_path / 'expected.pt')!r}); "
        "got = p(ids)['logits']; "
        "assert torch.allclose(got, e, rtol=1e-4, atol=1e-5), (got - e).abs().max()"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_gpt2_conv1d_layers_run_sparse_and_read_like_conv1d(tmp_path):
    """transformers' Conv1D (weight [in, out]) is planned and swapped like a Linear, and keeps
    `weight` [nx, nf], `nf`, `nx` and `bias`."""
    model = pruned_model("gpt2", 0.9)
    conv1d = {n: m for n, m in model.named_modules() if is_conv1d(m)}
    assert len(conv1d) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 blocks
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    example = {"input_ids": ids}
    fast = {"check": False, "calibrate": False, "dead_units": False}
    plan = plan_of(tc.compile(model, CompileConfig(**fast), example_input=example)).to_json()
    assert set(conv1d) <= {lp["name"] for lp in plan["layers"]}  # planned like any layer
    for lp in plan["layers"]:
        lp["format"] = "csr" if lp["name"] in conv1d else "dense"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    config = CompileConfig(plan_path=str(tmp_path / "plan.json"), **fast)
    compiled = tc.compile(model, config, example_input=example)
    for name, dense in conv1d.items():
        sparse = compiled.get_submodule(name)
        assert type(sparse) is SparseConv1D
        assert (sparse.nf, sparse.nx) == (dense.nf, dense.nx)
        assert torch.equal(sparse.weight, dense.weight.detach())  # [in, out], pruned zeros kept
        assert torch.equal(sparse.bias, dense.bias.detach())
    with torch.no_grad():
        want, got = model(**example).logits, compiled(**example).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
