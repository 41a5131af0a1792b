"""Export a model over 2 GB (one 23170 x 23170 Linear, 537M weights, 2.1 GB in fp32) at 1 %.

Checks what only a large model shows: the dense baseline goes to ONNX external data, the
portable export streams (peak memory stays near one dense copy: torch's), and both verify in
onnxruntime. Writes benchmarks/results/large_export.json with times and peak RSS per format.

    python benchmarks/large_export.py [--features 23170] [--density 0.01]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"


def child(features: int, density: float, fmt: str, out: Path) -> None:
    """One export in a fresh process, so its peak RSS is its own."""
    from ticketc.export import ExportConfig, export_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, features)).eval()
    with torch.no_grad():  # prune in row blocks so that building the model peaks at one copy
        weight = model[0].weight
        for start in range(0, features, 1024):
            block = weight[start : start + 1024]
            block.mul_(torch.rand(block.shape) < density)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    config = ExportConfig(format=fmt.split("-")[0], verify=not fmt.endswith("noverify"))
    result = export_model(model, torch.randn(1, features), out, config)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "format": fmt,
                "seconds_with_verify": seconds,
                "files": {f.name: f.stat().st_size for f in result.files},
                "total_bytes": result.total_bytes,
                "peak_rss_bytes": peak,
                "rss_before_export_bytes": before,
                "weight_bytes_fp32": 4 * features * features,
                "max_rel_error": result.verification.max_rel if result.verification else None,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=23170)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument(
        "--child", choices=["dense", "portable", "dense-noverify", "portable-noverify"]
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.features, args.density, args.child, args.out)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("portable-noverify", "dense-noverify", "portable", "dense"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                fmt,
                "--features",
                str(args.features),
                "--density",
                str(args.density),
                "--out",
                str(Path(tmp) / f"{fmt}.onnx"),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    report = {
        "features": args.features,
        "density": args.density,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "large_export.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
