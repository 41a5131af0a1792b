"""End-to-end speed on CPU: torch dense, ticketc compiled (and its .pt2), onnxruntime on the
dense ONNX export, torch CSR, on the project's models. The measuring is `ticketc bench`'s
(ticketc.bench.bench_model: outputs checked first, then all runtimes timed in interleaved,
shuffled rounds by ticketc.compile.measure.time_interleaved; speed-ups paired per round).

Models (random weights unless a file is named; speed depends on the mask's shape and the
architecture, not on trained values):
  lenet300-ticket  examples/lenet300-ticket.pt, the bundled ticket at 3.6 % (masks of a real run)
  resnet18-cifar   ResNet-18 (BasicBlocks, BatchNorm with real running statistics), 32x32 inputs,
                   global magnitude pruning to 90 %
  bert-like        4-layer encoder, dim 256, 4 heads, FFN 1024, token ids + attention mask of
                   128 tokens per sequence, global magnitude pruning to 90 %
  mlp4096x3        3 Linear 4096x4096 layers with ReLU, each pruned to 2 % by magnitude

    python benchmarks/e2e_bench.py [--threads 1,2] [--models a,b] [--quick]

Writes results/e2e_cpu_<N>threads.json and .md, and one PNG per model, for each thread count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # tests.real_models; after site-packages (see tests/conftest.py)

from tests.real_models import BertLike, ResNet18, calibrate_bn_, prune_global_, token_inputs  # noqa: E402
from ticketc.bench import RUNTIMES, BenchConfig, BenchResult, bench_model  # noqa: E402
from ticketc.bench.report import plot  # noqa: E402
from ticketc.compile.measure import environment  # noqa: E402
from ticketc.inputs import ExampleInputs  # noqa: E402

BATCHES = (1, 16, 64, 256)
# 128 tokens per sequence: batch 64 and 256 are 8 K and 32 K tokens, several seconds per dense
# call on one core; batch 32 is the 32 x 128 tokens.
BERT_BATCHES = (1, 16, 32)


def lenet_ticket() -> tuple[nn.Module, ExampleInputs]:
    from ticketc.load import load_model

    loaded = load_model(ROOT / "examples" / "lenet300-ticket.pt")  # masks applied
    return loaded.model, ExampleInputs.of(torch.randn(1, 1, 28, 28))


def resnet18() -> tuple[nn.Module, ExampleInputs]:
    torch.manual_seed(0)
    model = ResNet18()
    calibrate_bn_(model, torch.randn(16, 3, 32, 32))
    prune_global_(model, 0.9)
    return model.eval(), ExampleInputs.of(torch.randn(1, 3, 32, 32))


def bert_like() -> tuple[nn.Module, ExampleInputs]:
    torch.manual_seed(0)
    model = BertLike()
    prune_global_(model, 0.9)
    return model.eval(), ExampleInputs.of(token_inputs(1, 128))


@torch.no_grad()
def mlp4096() -> tuple[nn.Module, ExampleInputs]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(3):
        layer = nn.Linear(4096, 4096)
        w = layer.weight
        keep = round(0.02 * w.numel())
        threshold = w.abs().flatten().kthvalue(w.numel() - keep + 1).values
        w.mul_(w.abs() >= threshold)
        layers += [layer] + ([nn.ReLU()] if i < 2 else [])
    return nn.Sequential(*layers).eval(), ExampleInputs.of(torch.randn(1, 4096))


MODELS: dict[str, tuple[Callable[[], tuple[nn.Module, ExampleInputs]], tuple[int, ...]]] = {
    "lenet300-ticket": (lenet_ticket, BATCHES),
    "resnet18-cifar": (resnet18, BATCHES),
    "bert-like": (bert_like, BERT_BATCHES),
    "mlp4096x3": (mlp4096, BATCHES),
}


def write_markdown(results: list[BenchResult], env: dict, path: Path) -> None:
    lines = [
        f"# End-to-end on CPU, {env['torch_threads']} thread(s)",
        "",
        f"{env['cpu_model']}, {env['cpus']} cores, fp32; torch {env['torch']}, onnxruntime "
        f"{env['onnxruntime']}, numba {env['numba']}; ticketc {env['ticketc']} at commit "
        f"{env['commit']}. Load average {env['load_average']} at start, "
        f"{env.get('load_average_at_end')} at end (a shared machine: speed-ups are medians of "
        "per-round ratios, every runtime timed in each round, so load hits all alike).",
        "",
        "Each cell: median time per call, speed-up against torch dense (higher is faster), or "
        "why the runtime did not run. `ticketc compiled` is compiled for that batch size "
        "(plan in brackets); `ticketc .pt2` is the same model through torch.export, saved and "
        "loaded back.",
        "",
    ]
    for r in results:
        lines += [
            f"## {r.model}: {r.density:.1%} of prunable weights nonzero, {r.params:,} parameters",
            "",
            "| runtime | " + " | ".join(f"batch {b}" for b in r.batch_sizes) + " |",
            "|---|" + "---|" * len(r.batch_sizes),
        ]
        for name in RUNTIMES:
            cells = []
            for b in r.batch_sizes:
                c = r.cell(name, b)
                if c.median_us is None:
                    cells.append(f"n/a: {c.why}")
                    continue
                text = f"{c.median_us:,.0f} us, {c.speedup:.2f}x"
                if name == "ticketc compiled":
                    text += f" [{c.note}]"
                cells.append(text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", *[f"- {v}" for v in r.verdicts], ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1", help="thread counts, comma-separated: 1,2")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budget", type=float, default=3.0, help="timed seconds per batch size")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 64 only, short budget")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads takes counts such as 1,2, got {args.threads!r}")
    if any(t < 1 for t in thread_counts):
        parser.error(f"--threads takes counts >= 1, got {args.threads!r}")
    for threads in thread_counts:
        run(args, threads)


def run(args: argparse.Namespace, threads: int) -> None:
    torch.set_num_threads(threads)
    env = {**environment(), "cpu_model": _cpu_model()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e_cpu_{threads}threads"
    results = []
    started = time.time()
    for name in args.models.split(","):
        make, batches = MODELS[name]
        if args.quick:
            batches = tuple(b for b in batches if b in (1, 64)) or batches[:1]
        model, example = make()
        config = BenchConfig(
            batch_sizes=batches,
            threads=threads,
            budget_s=0.5 if args.quick else args.budget,
            sizes=False,  # sizes: benchmarks/size_bench.py
        )
        result = bench_model(model, example, config, name=name, log=lambda s: print(f"  {s}"))
        results.append(result)
        for v in result.verdicts:
            print(f"{name}: {v}", flush=True)
        plot(result, out / f"{stem}_{name}.png")
    env["load_average_at_end"] = environment()["load_average"]
    env["seconds"] = round(time.time() - started, 1)
    data = {"environment": env, "results": [r.to_json() for r in results]}
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(results, env, out / f"{stem}.md")
    print(f"wrote {out / stem}.json/.md/_*.png in {env['seconds']} s")


def _cpu_model() -> str:
    from ticketc.bench.core import cpu_model

    return cpu_model()


if __name__ == "__main__":
    main()
