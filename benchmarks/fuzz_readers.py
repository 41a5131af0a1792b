"""Fuzz campaign: corrupted model and ONNX files through every reader of the CLI.

Builds small valid artifacts (a ticket checkpoint, a state dict, a torch.export program, a
program compiled by ticketc, portable / sparse-initializer / dense ONNX files), mutates each
one many times (truncated, bit-flipped, zeroed, swapped and appended bytes; half of the
mutations aimed at the non-tensor parts: pickles, JSON, zip headers, protobuf fields) and runs
`inspect`, `export` and `verify` on every mutant in-process (`ticketc.cli.main`), with stderr
captured at the file-descriptor level so that C++ log lines count too.

A run is clean when it exits 0, or exits 2 with exactly one line on stderr and no traceback,
within the timeout, leaving no file beside its output but the output itself (and nothing at all
when it failed). Everything else is counted by kind and listed in the JSON result.

    python benchmarks/fuzz_readers.py --per-kind 300 --readers inspect,export,verify \
        --out benchmarks/results/fuzz_readers.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the helpers live in tests/; `--arch tests....` imports from here

from tests.fuzzing import (  # noqa: E402
    CLEAN,
    MUTATIONS,
    build_artifacts,
    fuzz_case,
    run_in_process,
    run_subprocess,
)


def campaign(
    per_kind: int,
    readers: list[str],
    seed: int,
    timeout: int,
    kinds: list[str] | None,
    subprocess_every: int,
    log: Callable[[str], None],
    partial: Callable[[dict[str, object]], None] | None = None,
) -> dict[str, object]:
    """Fuzz every kind `per_kind` times; `partial` gets the results so far after each kind."""
    work = Path(tempfile.mkdtemp(prefix="ticketc-fuzz-"))
    (work / "good").mkdir()
    good = build_artifacts(work / "good")
    results: dict[str, Counter[str]] = {}
    examples: dict[str, list[str]] = {}
    rng = random.Random(seed)
    count = 0
    started = time.time()
    for kind, base in good.items():
        if kinds and kind not in kinds:
            continue
        for i in range(per_kind):
            mutation = MUTATIONS[i % len(MUTATIONS)]
            case = work / f"{kind}-{i}"
            case.mkdir()

            def run(argv: list[str]) -> tuple[int, str]:
                nonlocal count
                count += 1
                if subprocess_every and count % subprocess_every == 0:
                    return run_subprocess(argv, timeout)
                return run_in_process(argv, timeout, work / "stderr.txt")

            for reader, verdict, err in fuzz_case(
                kind, base, good, case, mutation, rng, readers, run
            ):
                key = f"{kind}/{reader}"
                results.setdefault(key, Counter())[verdict.split(":")[0]] += 1
                if verdict not in CLEAN:
                    examples.setdefault(verdict.split(":")[0], []).append(
                        f"{key} {mutation} #{i}: {verdict} | {err.strip()[-300:]}"
                    )
            shutil.rmtree(case, ignore_errors=True)
            if (i + 1) % 25 == 0:
                log(f"{kind} {i + 1}/{per_kind} ({time.time() - started:.0f} s)")
        if partial:
            partial(_summary(results, examples, seed, per_kind, readers, count, started))
    shutil.rmtree(work, ignore_errors=True)
    return _summary(results, examples, seed, per_kind, readers, count, started)


def _summary(
    results: dict[str, Counter[str]],
    examples: dict[str, list[str]],
    seed: int,
    per_kind: int,
    readers: list[str],
    count: int,
    started: float,
) -> dict[str, object]:
    totals: Counter[str] = Counter()
    for c in results.values():
        totals.update(c)
    return {
        "seed": seed,
        "per_kind": per_kind,
        "readers": readers,
        "runs": count,
        "seconds": round(time.time() - started, 1),
        "totals": dict(totals),
        "by_kind_reader": {k: dict(v) for k, v in results.items()},
        "failure_examples": {k: v[:15] for k, v in examples.items()},
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "torch": torch.__version__,
        "loadavg": Path("/proc/loadavg").read_text().strip()
        if Path("/proc/loadavg").exists()
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--readers", default="inspect,export,verify,compile")
    parser.add_argument("--kinds", default="", help="comma-separated subset of the kinds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument(
        "--subprocess-every",
        type=int,
        default=0,
        help="run every N-th case as a real subprocess (0: never)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    def write(result: dict[str, object]) -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")

    result = campaign(
        args.per_kind,
        args.readers.split(","),
        args.seed,
        args.timeout,
        [k for k in args.kinds.split(",") if k],
        args.subprocess_every,
        log=lambda s: print(s, flush=True),
        partial=write,
    )
    write(result)
    print(
        json.dumps(
            {"totals": result["totals"], "runs": result["runs"], "seconds": result["seconds"]}
        )
    )


if __name__ == "__main__":
    main()
