"""A compiled transformers model's .pt2 loads in a fresh process with `import ticketc` alone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.hf_models import pruned_model, save
from ticketc.cli import main

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
