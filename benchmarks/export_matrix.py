"""Export matrix: architectures x pruning rates x save forms x value types, checked against the
user's own masked model.

Each architecture (CNN blocks with real BatchNorm statistics and a zero gamma, a tied-head LM,
LSTM/GRU, ConvTranspose, a dict-output model, an fp16 model, and transformers BERT / GPT-2 /
Llama / ViT / Whisper from tiny configs) is pruned with torch.nn.utils.prune.global_unstructured
at each rate, saved the ways users save it (state dict with the prune hooks' tensors + --arch,
state dict after prune.remove + --arch, pickled module + --trust-pickle, torch.export .pt2) and
exported through the CLI (`ticketc export`) with every value type. For each cell it records:
whether the masked model's outputs depend on its input at all (`live`: a model whose pruning
removed a whole layer or killed its activations answers every input alike, and matching it
proves nothing); how far PyTorch's own fp32 outputs are from fp64 (`fp32 vs fp64`: no fp32
file can match an ill-conditioned model closer); the exit code; onnxruntime on the file
against the masked model in memory (relative error, max |diff| over max |expected|, on a fresh
batch of 3); the file's size against the dense export and against what its zeros allow; and,
per architecture and rate,
onnxruntime session-creation CPU time of the portable file against the dense file, 1 thread:
the median of interleaved runs in this process (`session`: a warm allocator, which favours the
dense file's one big load) and the median of one session each in fresh processes (`fresh`:
every byte new memory, as for a server that starts and creates its session once). Writes JSON
and markdown under benchmarks/results/.

What the zeros allow (`floor`): the same graph with every float initializer at its entropy
bound for the export's value type (numel * H(density) + nnz * value bits) and everything else
as the dense graph holds it: names, shapes, nodes and non-float initializers, with the debug
information torch.onnx adds (stack traces, value_info; 2/3 of a small dense file) left out as
the portable file leaves it out. The goal is file <= floor / 0.9 (`over_floor` <= 1.11), which
is the issue's "x smaller >= 0.9 x dense / floor" with the dense file's bytes cancelled.
`stored_over_bound` is the same for the float initializers alone (their stored bytes, group
tables included; decoder nodes and metadata not).

The default architectures are tiny (0.5-100 kB of weights) so the matrix runs in minutes;
`--archs` also takes `resnet_wide`, `bert_small` and `gpt2_small` (0.3-4 M weights), sizes
where a decoder's fixed bytes stop mattering, and `heldout` (`benchmarks/heldout_archs.py`:
torchvision and timm models no test builds, pruned relative to each layer's scale with their
BatchNorm statistics recomputed (`heldout_archs.prune_`); needs a venv with both, never CI).

    python -m benchmarks.export_matrix [--archs resnet,tied_lm] [--rates 0.9] \
        [--forms state_dict,pt2] [--values fp32,int4]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.heldout_archs import HELDOUT
from benchmarks.heldout_archs import prune_ as heldout_prune_
from tests import models_for_tests as zoo
from ticketc.cli import main as ticketc_main
from ticketc.inputs import ExampleInputs
from ticketc.verify import fp32_rounding

RESULTS = Path(__file__).parent / "results"
RATES = (0.5, 0.9, 0.98)
FORMS = ("state_dict", "removed", "pickle", "pt2")
VALUES = ("fp32", "fp16", "int8", "int4")
RTOL = {"fp32": 1e-5}  # lossy value types are checked weight by weight by the exporter


def _ids(shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(1, 50, shape)


# name -> (factory in tests.models_for_tests, {input name: (dtype, shape, maker)})
ARCHS: dict[str, tuple[str, dict[str, tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]]]
ARCHS = {
    "resnet": ("resnet_tiny", {"x": ("float32", (1, 3, 8, 8), lambda: torch.randn(3, 3, 8, 8))}),
    "tied_lm": ("tied_lm", {"ids": ("int64", (1, 7), _ids((3, 7)))}),
    "recurrent": ("recurrent", {"x": ("float32", (1, 5, 6), lambda: torch.randn(3, 5, 6))}),
    "upsampler": ("upsampler", {"x": ("float32", (1, 3, 6, 6), lambda: torch.randn(3, 3, 6, 6))}),
    "dict_output": ("dict_output", {"x": ("float32", (1, 10), lambda: torch.randn(3, 10))}),
    "bert": (
        "bert_tiny",
        {
            "input_ids": ("int64", (1, 8), _ids((3, 8))),
            "attention_mask": ("int64", (1, 8), lambda: torch.ones(3, 8, dtype=torch.int64)),
        },
    ),
    "gpt2": ("gpt2_tiny", {"input_ids": ("int64", (1, 8), _ids((3, 8)))}),
    "llama": ("llama_tiny", {"input_ids": ("int64", (1, 8), _ids((3, 8)))}),
    "vit": (
        "vit_tiny",
        {"pixel_values": ("float32", (1, 3, 16, 16), lambda: torch.randn(3, 3, 16, 16))},
    ),
    "whisper": (
        "whisper_tiny",
        {
            "input_features": ("float32", (1, 8, 32), lambda: torch.randn(3, 8, 32)),
            "decoder_input_ids": ("int64", (1, 3), _ids((3, 3))),
        },
    ),
}


# Real sizes, built here (`--arch benchmarks.export_matrix:NAME`): not in the default run.
WIDE = {
    "resnet_wide": (
        "benchmarks.export_matrix:resnet_wide",
        {"x": ("float32", (1, 3, 16, 16), lambda: torch.randn(3, 3, 16, 16))},
    ),
    "bert_small": (
        "benchmarks.export_matrix:bert_small",
        {
            "input_ids": ("int64", (1, 16), _ids((3, 16))),
            "attention_mask": ("int64", (1, 16), lambda: torch.ones(3, 16, dtype=torch.int64)),
        },
    ),
    "gpt2_small": (
        "benchmarks.export_matrix:gpt2_small",
        {"input_ids": ("int64", (1, 16), _ids((3, 16)))},
    ),
}


class ResNetWide(torch.nn.Module):
    """A ResNet stage at 64 channels (stem conv-BN, two basic blocks, classifier): 0.3 M
    weights, BatchNorm statistics non-trivial as in tests.models_for_tests.ResNetTiny."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(zoo.BasicBlock(channels), zoo.BasicBlock(channels))
        self.fc = nn.Linear(channels, 10)
        zoo.batchnorm_statistics_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def resnet_wide() -> torch.nn.Module:
    return ResNetWide()


def bert_small() -> torch.nn.Module:
    """BERT at hidden 256, 4 layers (bert-mini's shape, 1000-token vocabulary): 3.4 M weights."""
    return zoo.bert(vocab=1000, hidden=256, layers=4, heads=4, intermediate=1024)


def gpt2_small() -> torch.nn.Module:
    """GPT-2 at n_embd 256, 4 layers, tied head (1000-token vocabulary): 3.4 M weights."""
    return zoo.gpt2(vocab=1000, hidden=256, layers=4, heads=4)


def _factory(reference: str) -> Callable[[], torch.nn.Module]:
    module, _, name = reference.rpartition(":")
    return getattr(importlib.import_module(module), name) if module else getattr(zoo, reference)


def _arch_flag(reference: str) -> str:
    return f"--arch={reference if ':' in reference else 'tests.models_for_tests:' + reference}"


def floor_bytes(dense_path: Path, bound_bytes: float) -> float:
    """What the zeros allow for this graph: the dense file's graph as the portable writer
    leaves it (debug information dropped, ticketc.export.graph_edits.slim_) without the data
    of its float initializers (their names, types and shapes stay), plus `bound_bytes`."""
    from ticketc.export.graph_edits import slim_

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}
    floats |= {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}

    proto = onnx.load(str(dense_path))
    slim_(proto)
    for init in proto.graph.initializer:
        if init.data_type in floats:
            for field in ("raw_data", "float_data", "double_data", "int32_data"):
                init.ClearField(field)
    return proto.ByteSize() + bound_bytes


def relative_error(path: Path, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """max |onnxruntime - model| / max |model| over all outputs (model in its own dtype)."""
    from ticketc.verify import flat_outputs  # pytree order, as the exporter names outputs

    with torch.no_grad():
        expected = flat_outputs(model(**inputs))
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: v.numpy() for n, v in zip(names, inputs.values(), strict=True)}
    got = session.run(None, feeds)
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        e64 = e.double().numpy()
        scale = max(float(np.abs(e64).max()), 1e-12)
        worst = max(worst, float(np.abs(g.astype(np.float64) - e64).max()) / scale)
    return worst


def input_dependent(model: torch.nn.Module, specs: dict) -> bool:
    """Whether the model's outputs change with its input (two random batches): where they do
    not (a pruned-away layer, dead activations), comparing outputs proves nothing."""
    from ticketc.verify import flat_outputs

    with torch.no_grad():
        a, b = (flat_outputs(model(**{n: m() for n, (_, _, m) in specs.items()})) for _ in "ab")
    return any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _interleaved_medians(
    paths: dict[str, Path], repeats: int, create_ms: Callable[[Path], float]
) -> dict[str, float]:
    """Median over `repeats` interleaved rounds of `create_ms(path)` for each of `paths`."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for k, path in paths.items():
            times[k].append(create_ms(path))
    return {k: float(np.median(v)) for k, v in times.items()}


def session_cpu_ms(paths: dict[str, Path], repeats: int = 20) -> dict[str, float]:
    """Median CPU milliseconds to create an onnxruntime session (1 thread), runs interleaved
    in this process."""

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3

    def create_ms(path: Path) -> float:  # from the path: the dense file has external data
        start = time.process_time()
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return 1e3 * (time.process_time() - start)

    return _interleaved_medians(paths, repeats, create_ms)


# one session in a fresh process: its creation's CPU milliseconds (imports not counted)
_FRESH = """
import sys, time
import onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.log_severity_level = 3
start = time.process_time()
ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print(1e3 * (time.process_time() - start))
"""


def session_fresh_ms(paths: dict[str, Path], repeats: int = 7) -> dict[str, float]:
    """Median CPU milliseconds to create an onnxruntime session (1 thread), each in a fresh
    Python process, runs interleaved."""

    def create_ms(path: Path) -> float:
        command = [sys.executable, "-c", _FRESH, str(path)]
        return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    return _interleaved_medians(paths, repeats, create_ms)


def _save(
    model: torch.nn.Module, factory: str, form: str, work: Path, example: dict
) -> tuple[Path, list[str]]:
    """The model saved as a user would, and the CLI flags that load it."""
    path = work / f"{form}.{'pt2' if form == 'pt2' else 'pt'}"
    if form == "state_dict":  # weight_orig + weight_mask, as prune leaves them
        torch.save(model.state_dict(), path)
        return path, []
    removed = _removed(model, factory)
    if form == "removed":
        torch.save(removed.state_dict(), path)
        return path, []
    if form == "pickle":
        torch.save(removed, path)
        return path, ["--trust-pickle"]
    # traced at batch 2 with a dynamic batch axis, as a user who wants any batch saves it
    batch2 = {n: torch.cat([t, t]) for n, t in example.items()}
    shapes = {n: {0: torch.export.Dim.AUTO} for n in example}
    program = torch.export.export(removed, (), kwargs=batch2, dynamic_shapes=shapes)
    torch.export.save(program, path)
    return path, []


def _removed(model: torch.nn.Module, factory: str) -> torch.nn.Module:
    """A fresh copy of the architecture holding the pruned weights (weight_orig x weight_mask),
    as prune.remove leaves them; the model passed in keeps its hooks."""
    state = model.state_dict()
    merged: dict[str, torch.Tensor] = OrderedDict()
    merged._metadata = state._metadata  # type: ignore[attr-defined]  # module versions (MNASNet)
    for key, value in state.items():
        if key.endswith("_orig"):
            merged[key[: -len("_orig")]] = value * state[key[: -len("_orig")] + "_mask"]
        elif not key.endswith("_mask"):
            merged[key] = value
    fresh = _factory(factory)().eval()
    fresh.load_state_dict(merged)
    return fresh


def _export(args: list[str]) -> tuple[int, dict | None, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ticketc_main(["export", *args, "--json"])
    try:
        report = json.loads(out.getvalue()) if code == 0 else None
    except json.JSONDecodeError:
        report = None
    lines = err.getvalue().strip().splitlines()
    return code, report, lines[-1] if lines else ""


def run_cell(arch: str, rate: float, forms: list[str], values: list[str], work: Path) -> list:
    factory, specs = {**ARCHS, **WIDE, **HELDOUT}[arch]
    torch.manual_seed(0)
    model = _factory(factory)().eval()
    if arch in HELDOUT:
        heldout_prune_(model, rate, next(iter(specs.values()))[2])  # their one input
    else:
        zoo.prune_global_(model, rate)
    example = {n: maker()[:1] for n, (_, _, maker) in specs.items()}
    fresh = {n: maker() for n, (_, _, maker) in specs.items()}
    live = input_dependent(model, specs)
    flags = [
        f"--input={n}:{dtype}:{','.join(map(str, shape))}" for n, (dtype, shape, _) in specs.items()
    ]
    arch_flag = _arch_flag(factory)
    rows = []
    dense_path = work / "dense.onnx"
    sd_path, _ = _save(model, factory, "state_dict", work, example)
    code, dense, _ = _export(
        [str(sd_path), arch_flag, *flags, "--format=dense", f"--output={dense_path}"]
    )
    dense_bytes = dense["total_bytes"] if dense else None
    timings: dict[str, float] = {}
    # the user's own model as each form holds it: the hooked model for the state dict with
    # the hooks' tensors, the prune.remove'd copy for the others (for a tied weight pruned
    # through two modules whose masks differ, prune.remove itself changes the model)
    removed = _removed(model, factory)
    # how far PyTorch's own fp32 outputs are from fp64 on the sample: where BatchNorm or
    # attention amplify rounding, no fp32 file can match the model closer than this
    rounding = fp32_rounding(removed, ExampleInputs((), fresh))
    for form in forms:
        saved, extra = _save(model, factory, form, work, example)
        for value in values:
            out = work / f"{form}-{value}.onnx"
            args = [
                str(saved),
                *extra,
                *([arch_flag] if form in ("state_dict", "removed") else []),
                *flags,
                f"--values={value}",
                f"--output={out}",
            ]
            start = time.perf_counter()
            code, report, error = _export(args)
            row: dict[str, object] = {
                "arch": arch,
                "rate": rate,
                "form": form,
                "values": value,
                "live": live,
                "fp32_rounding": rounding,
                "exit": code,
                "seconds": time.perf_counter() - start,
            }
            if code != 0:
                row["error"] = error
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            assert report is not None
            rel = relative_error(out, model if form == "state_dict" else removed, fresh)
            row["rel"] = rel
            row["rel_ok"] = rel <= RTOL.get(value, float("inf"))
            row["bytes"] = report["total_bytes"]
            if dense_bytes:
                floor = floor_bytes(dense_path, report["bound_bytes"])
                row["ratio"] = dense_bytes / report["total_bytes"]
                row["floor"] = floor
                row["over_floor"] = report["total_bytes"] / floor  # goal <= 1 / 0.9
            # the float initializers alone: stored bytes over their entropy bound
            stored = sum(layer["nbytes"] for layer in report["layers"])
            row["stored_over_bound"] = stored / max(report["bound_bytes"], 1e-9)
            if form == "state_dict" and value in ("fp32", "int4"):
                timings = session_cpu_ms({"dense": dense_path, value: out})
                row["session_ratio"] = timings[value] / timings["dense"]
                row["session_ms"] = timings
                cold = session_fresh_ms({"dense": dense_path, value: out})
                row["session_fresh_ratio"] = cold[value] / cold["dense"]
                row["session_fresh_ms"] = cold
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| arch | rate | form | values | live | fp32 vs fp64 | exit | rel err | x smaller | "
        "file / floor | tensors / bound | session | fresh |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        session = f"{r['session_ratio']:.2f}x" if "session_ratio" in r else ""
        fresh = f"{r['session_fresh_ratio']:.2f}x" if "session_fresh_ratio" in r else ""
        lines.append(
            f"| {r['arch']} | {r['rate']} | {r['form']} | {r['values']} | "
            f"{'yes' if r.get('live') else 'NO'} | {r.get('fp32_rounding', float('nan')):.2g} | "
            f"{r['exit']} | "
            f"{r.get('rel', float('nan')):.2g} | {r.get('ratio', float('nan')):.1f} | "
            f"{r.get('over_floor', float('nan')):.3f} | "
            f"{r.get('stored_over_bound', float('nan')):.3f} | {session} | {fresh} |"
        )
    return "\n".join(lines) + "\n"


def _write(rows: list[dict], name: str) -> None:
    report = {
        "rows": rows,
        "device": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": 1,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
        },
        "commit": _commit(),
        "load_average": list(os.getloadavg()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--values", default=",".join(VALUES))
    parser.add_argument("--name", default="export_matrix")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        archs = ",".join(HELDOUT) if args.archs == "heldout" else args.archs
        for arch in archs.split(","):
            for rate in (float(r) for r in args.rates.split(",")):
                work = Path(tmp) / f"{arch}-{rate}"
                work.mkdir()
                rows += run_cell(arch, rate, args.forms.split(","), args.values.split(","), work)
                _write(rows, args.name)  # after every cell: a long run cut short keeps its rows
    failed = [r for r in rows if r["exit"] != 0 or not r.get("rel_ok", True)]
    print(f"{len(rows)} cells, {len(failed)} failed; wrote {RESULTS / args.name}.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
