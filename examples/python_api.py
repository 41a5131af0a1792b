"""ticketc from Python: load -> export -> verify -> compile.

Part 1 takes a model file (the bundled Lenet-300-100 ticket), part 2 a model of your own in
memory, pruned with torch.nn.utils.prune and its hooks still on. Runs on a CPU in well under a
minute:

    python examples/python_api.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

import ticketc

HERE = Path(__file__).resolve().parent


def from_a_file(out: Path) -> None:
    # load: any model file `ticketc export` reads (ticket, state dict + arch, .pt2, HF directory)
    loaded = ticketc.load_model(HERE / "lenet300-ticket.pt")
    x = torch.randn(64, 1, 28, 28)  # a batch of MNIST-sized images

    # export: a small ONNX file, verified in onnxruntime before it is written
    result = ticketc.export_model(loaded.model, loaded.example_input, out / "lenet300.onnx")
    print(f"lenet300.onnx: {result.total_bytes:,} B, {result.verification.summary()}")

    # verify: the file against the PyTorch model, on your own inputs (relative error)
    check = ticketc.verify_onnx(out / "lenet300.onnx", loaded.model, x, tolerance=1e-5)
    assert check.passed, check.summary()

    # compile: sparse CPU kernels where the planner predicts they are faster than dense
    fast = ticketc.compile_model(loaded.model, ticketc.CompileConfig(batch_size=64))
    torch.testing.assert_close(fast(x), loaded.model(x), rtol=1e-4, atol=1e-5)
    print(f"compiled: {type(fast).__name__}, same outputs as the model on batch 64")


def from_memory(out: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    ).eval()
    layers = [(m, "weight") for m in model if isinstance(m, nn.Linear)]
    prune.global_unstructured(layers, prune.L1Unstructured, amount=0.9)  # hooks stay on

    # export and compile take the pruned model as it is (they work on a copy of it)
    x = torch.randn(8, 784)
    result = ticketc.export_model(model, x, out / "mine.onnx")
    stored = ", ".join(f"{layer.name} {layer.density:.0%} {layer.codec}" for layer in result.layers)
    print(f"mine.onnx: {result.total_bytes:,} B ({stored})")
    assert ticketc.verify_onnx(out / "mine.onnx", model, torch.randn(3, 784), tolerance=1e-5).passed

    fast = ticketc.compile_model(model)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert hasattr(model[0], "weight_orig")  # your model still has its pruning hooks
    print("compiled the in-memory model: same outputs")


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="ticketc-example-"))
    out.mkdir(parents=True, exist_ok=True)
    from_a_file(out)
    from_memory(out)
    print(f"files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
