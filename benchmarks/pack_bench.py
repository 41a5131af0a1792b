"""Pack benchmark: sparse safetensors against the dense safetensors and the entropy bound.

Tiny transformers models (BERT, GPT-2 with tied embeddings, Llama, ViT: the configs of
tests/hf_models.py, and a wider Llama with --wide) are pruned by global magnitude to 50 % and
90 % and to 2:4, saved with save_pretrained in fp16 / fp32 (bf16 for Llama), and packed with each
value type. Per cell: dense safetensors bytes (every weight file), packed bytes (every shard),
the ratio, packed bytes over the entropy bound (mask entropy + kept values, per tensor, dense
where smaller: computed here, not by ticketc), gzip -9 / xz of the dense files, pack / unpack /
load_packed seconds, and whether unpack gave the dense tensors back exactly (lossless) and
load_packed the same logits as transformers' own from_pretrained. Writes JSON and markdown.

    python benchmarks/pack_bench.py [--wide] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import safetensors
import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ticketc  # noqa: E402
from tests import hf_models  # noqa: E402
from ticketc.formats.compact_positions import mask_entropy_bits  # noqa: E402
from ticketc.pack import PackConfig, load_packed, pack, unpack  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LEVELS = (0.5, 0.9, "2:4")
VALUES = ("lossless", "fp16", "int8", "int4")
DTYPES = {
    "bert": ("float16", "float32"),
    "gpt2": ("float16", "float32"),
    "llama": ("float16", "float32", "bfloat16"),
    "vit": ("float16", "float32"),
}
GOALS = {0.5: 1.6, 0.9: 6.0}  # the judged ratios at fp16 (lossless)


def wide_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def entropy_bound(tensors: dict[str, torch.Tensor], bits: int | None) -> float:
    total = 0.0
    for t in tensors.values():
        dense = t.numel() * t.element_size()
        if not t.is_floating_point():
            total += dense
            continue
        nnz = int(t.count_nonzero())
        sparse = (mask_entropy_bits(t.numel(), nnz) + nnz * (bits or 8 * t.element_size())) / 8
        total += min(sparse, dense)
    return total


def nbytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def compressed(directory: Path) -> tuple[int, int]:
    data = b"".join(f.read_bytes() for f in sorted(directory.glob("*.safetensors")))
    return len(gzip.compress(data, 9)), len(lzma.compress(data, preset=9))


def cell(work: Path, arch: str, level, dtype: str, builder) -> list[dict]:
    torch.manual_seed(0)
    model = builder()
    if level == "2:4":
        hf_models.prune_2_4_(model)
    else:
        hf_models.prune_global_(model, float(level))
    model.tie_weights()
    model = model.to(getattr(torch, dtype)).eval()
    src = hf_models.save(model, work / f"{arch}-{level}-{dtype}")
    dense = weights(src)
    dense_bytes = nbytes(src)
    gz, xz = compressed(src)
    inputs = hf_models.example_inputs(model)
    reference = hf_models.outputs(type(model).from_pretrained(src), inputs)
    rows = []
    for values in VALUES:
        if values == "fp16" and dtype == "float16":
            continue
        out = work / f"{src.name}-{values}"
        t0 = time.perf_counter()
        pack(src, out, PackConfig(values=values))
        t1 = time.perf_counter()
        unpack(out, out.with_name(out.name + "-dense"))
        t2 = time.perf_counter()
        loaded = load_packed(out)
        t3 = time.perf_counter()
        back = weights(out.with_name(out.name + "-dense"))
        exact = back.keys() == dense.keys() and all(torch.equal(back[k], dense[k]) for k in dense)
        same_logits = torch.equal(hf_models.outputs(loaded, inputs), reference)
        packed = nbytes(out)
        bits = {"lossless": None, "fp16": 16, "int8": 8, "int4": 4}[values]
        bound = entropy_bound(dense, bits)
        rows.append(
            {
                "model": arch,
                "level": str(level),
                "dtype": dtype,
                "values": values,
                "params": sum(t.numel() for t in dense.values()),
                "dense_bytes": dense_bytes,
                "packed_bytes": packed,
                "times_smaller": round(dense_bytes / packed, 3),
                "over_entropy_bound": round(packed / bound, 4),
                "gzip9_times_smaller": round(dense_bytes / gz, 3),
                "xz9_times_smaller": round(dense_bytes / xz, 3),
                "pack_s": round(t1 - t0, 3),
                "unpack_s": round(t2 - t1, 3),
                "load_packed_s": round(t3 - t2, 3),
                "unpack_exact": exact,
                "load_packed_same_logits": same_logits,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def environment() -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", True
    return {
        "commit": commit,
        "dirty": dirty,
        "ticketc": ticketc.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads",
        "load_average_at_start": list(os.getloadavg()),
    }


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# ticketc pack: sparse safetensors vs dense safetensors",
        "",
        f"commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}, torch {env['torch']}, "
        f"transformers {env['transformers']}, safetensors {env['safetensors']}, {env['machine']}, "
        f"load {env['load_average_at_start']} -> {env['load_average_at_end']}",
        "",
        "Sizes count every weight file (safetensors headers included). Bound: mask entropy + kept "
        "values per tensor (dense where smaller), no names or headers.",
        "",
        "| model | pruned | dtype | values | params | dense B | packed B | x smaller | x bound "
        "| gzip -9 | xz -9 | pack s | unpack s | load s | exact | same logits |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['level']} | {r['dtype']} | {r['values']} | {r['params']:,} | "
            f"{r['dense_bytes']:,} | {r['packed_bytes']:,} | {r['times_smaller']:.2f} | "
            f"{r['over_entropy_bound']:.3f} | {r['gzip9_times_smaller']:.2f} | "
            f"{r['xz9_times_smaller']:.2f} | {r['pack_s']:.2f} | {r['unpack_s']:.2f} | "
            f"{r['load_packed_s']:.2f} | {r['unpack_exact'] if r['values'] == 'lossless' else '-'}"
            f" | {r['load_packed_same_logits'] if r['values'] == 'lossless' else '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wide", action="store_true", help="also a 256-wide, 4-layer Llama")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = {"environment": environment(), "rows": []}
    builders = dict(hf_models.BUILDERS)
    with tempfile.TemporaryDirectory() as tmp:
        for arch, builder in builders.items():
            for level in LEVELS:
                for dtype in DTYPES[arch]:
                    report["rows"] += cell(Path(tmp), arch, level, dtype, builder)
        if args.wide:
            for level in LEVELS:
                report["rows"] += cell(Path(tmp), "llama-wide", level, "float16", wide_llama)
    report["environment"]["load_average_at_end"] = list(os.getloadavg())
    goals = [
        r
        for r in report["rows"]
        if r["dtype"] == "float16" and r["values"] == "lossless" and r["level"] in ("0.5", "0.9")
    ]
    report["goals"] = {
        "ratio": all(r["times_smaller"] >= GOALS[float(r["level"])] for r in goals),
        "within_10pct_of_bound": all(r["over_entropy_bound"] <= 1.10 for r in goals),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pack.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "pack.md").write_text(markdown(report))
    print(markdown(report))
    print("goals:", report["goals"])
    return 0 if all(report["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
