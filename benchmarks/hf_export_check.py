"""`ticketc export DIR` on Hugging Face directories, against transformers' own model.

The tiny BERT, GPT-2 (tied embeddings, saved sharded), Llama and ViT of tests/hf_models.py are
pruned by global magnitude to 50 % and 90 % and to 2:4, saved with save_pretrained in fp32, and
exported with the CLI. Each ONNX file is run in onnxruntime at batch sizes and sequence lengths
other than the traced ones (text: padding in the first row) and compared with
`from_pretrained(DIR)`: max |onnx - torch| / max |torch| over the logits. Also recorded: the
ONNX input axes, the export time and the bytes against the dense safetensors. Writes JSON and
markdown.

    python benchmarks/hf_export_check.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pack_bench import environment  # noqa: E402
from tests import hf_models  # noqa: E402
from ticketc.cli import main as ticketc_main  # noqa: E402
from ticketc.verify import FP32_RTOL, ort_session  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LEVELS = (0.5, 0.9, "2:4")
TEXT_SIZES = ((1, 5), (4, 23), (2, 64))  # (batch, sequence); traced at (2, 16)
VISION_BATCHES = (1, 5)


def _inputs(arch: str, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return [{"pixel_values": torch.randn(b, 3, 32, 32, generator=g)} for b in VISION_BATCHES]
    out = []
    for batch, length in TEXT_SIZES:
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[0, -min(3, length - 1) :] = 0
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def cell(tmp: Path, arch: str, level: float | str) -> dict:
    model = hf_models.pruned_model(arch, level)
    src = tmp / f"{arch}-{level}"
    sharded = {"max_shard_size": "100KB"} if arch == "gpt2" else {}
    hf_models.save(model, src, **sharded)
    out = tmp / f"{arch}-{level}.onnx"
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = ticketc_main(["export", str(src), "-o", str(out)])
    seconds = time.perf_counter() - t0
    assert code == 0, (arch, level)
    proto = onnx.load(str(out), load_external_data=False)
    axes = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in proto.graph.input
    }
    reference = type(model).from_pretrained(src).eval()
    session = ort_session(out)
    worst = 0.0
    checked = []
    for inputs in _inputs(arch, model):
        with torch.no_grad():
            kwargs = {} if arch == "vit" else {"use_cache": False}
            expected = reference(**inputs, **kwargs).logits.double().numpy()
        (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        rel = float(np.abs(got - expected).max() / np.abs(expected).max())
        worst = max(worst, rel)
        checked.append(list(next(iter(inputs.values())).shape))
    dense = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    onnx_bytes = sum(f.stat().st_size for f in tmp.glob(f"{arch}-{level}.onnx*"))
    row = {
        "model": arch,
        "level": str(level),
        "shards": len(list(src.glob("*.safetensors"))),
        "inputs": axes,
        "checked_shapes": checked,
        "max_rel": worst,
        "passed": worst <= FP32_RTOL,
        "export_s": round(seconds, 2),
        "dense_safetensors_bytes": dense,
        "onnx_bytes": onnx_bytes,
    }
    print(json.dumps(row), flush=True)
    return row


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# ticketc export DIR: ONNX vs transformers' own model (onnxruntime, fp32)",
        "",
        f"commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}, torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['machine']}, "
        f"load {env['load_average_at_start']} -> {env['load_average_at_end']}",
        "",
        f"Relative error: max |onnx - torch| / max |torch| over the logits; passes at "
        f"<= {FP32_RTOL:g}. Text models traced at batch 2, sequence 16 and checked at (batch, "
        f"sequence) {', '.join(map(str, TEXT_SIZES))}; ViT at batch {VISION_BATCHES}. "
        "Export seconds include onnxruntime verification, on a shared 2-core machine.",
        "",
        "| model | pruned | shards | ONNX inputs | max rel | passed | export s | dense B "
        "| ONNX B |",
        "|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        inputs = "; ".join(f"{k} {v}" for k, v in r["inputs"].items())
        lines.append(
            f"| {r['model']} | {r['level']} | {r['shards']} | {inputs} | {r['max_rel']:.2e} | "
            f"{r['passed']} | {r['export_s']:.1f} | {r['dense_safetensors_bytes']:,} | "
            f"{r['onnx_bytes']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report: dict = {"environment": environment(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in hf_models.BUILDERS:
            for level in LEVELS:
                report["rows"].append(cell(Path(tmp), arch, level))
    report["environment"]["load_average_at_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf_export.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "hf_export.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["passed"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
