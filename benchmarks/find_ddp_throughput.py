"""Training throughput of `ticketc find` under torchrun: 1 rank vs 2 ranks, one thread each.

Each measurement launches `torchrun --standalone --nproc-per-node R` on this script's worker,
which trains one member of a built-in model through find's own `train_level` (the DDP path on
2 ranks, the single-process path on 1), with the paper's recipe (SGD, weight decay, crop/flip
augmentation for the CIFAR networks) and the same global batch, on in-memory random data of
the dataset's shape. Samples per second = global batch x timed steps / wall time of the timed
steps (after warm-up steps), measured on rank 0 after a barrier; per-rank efficiency =
(2-rank samples/s) / (2 x 1-rank samples/s). CPU seconds per rank are recorded too: on a
machine shared with other work, wall-clock scaling is bounded by the cores actually free
(see the load average written beside the figures). 1- and 2-rank runs alternate, `--repeats`
times each; the medians are reported.

    python benchmarks/find_ddp_throughput.py                    # ResNet-20, batch 128
    python benchmarks/find_ddp_throughput.py --model lenet300 --batch 60

Writes benchmarks/results/find_ddp_throughput[_MODEL].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results"
SHAPES = {
    "lenet300": (1, 28, 28),
    "resnet20": (3, 32, 32),
    "vgg16": (3, 32, 32),
    "conv6": (3, 32, 32),
}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from ticketc.data import Splits, TensorSplit
    from ticketc.find import FindConfig, pruning
    from ticketc.find.distributed import from_environment, leave
    from ticketc.find.ensemble import Ensemble
    from ticketc.find.run import arch_kwargs, build
    from ticketc.find.train import BatchOrder, History, train_level

    torch.set_num_threads(1)
    ranks = from_environment()
    g = torch.Generator().manual_seed(0)
    n = 8 * args.batch
    x = torch.randn(n, *SHAPES[args.model], generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    empty = TensorSplit(x[:0], y[:0])
    data = Splits("random", TensorSplit(x, y), empty, empty, 10)
    cfg = FindConfig(model=args.model, batch_size=args.batch, dataset="cifar10").resolved()
    base = build(cfg, arch_kwargs(cfg, data), 0)
    kinds = pruning.prunable_parameters(base)
    masks = pruning.full_masks(base, kinds)
    assert cfg.lr is not None and cfg.optimizer is not None and cfg.weight_decay is not None
    ensemble = Ensemble(
        base,
        [base.state_dict()],
        [masks],
        lr=cfg.lr,
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        sparse_below=cfg.csr_below,
        ranks=ranks,
    )
    order = BatchOrder([0], 1, n, args.batch)

    def train(start: int, end: int) -> None:
        train_level(
            ensemble,
            data,
            order,
            start=start,
            end=end,
            eval_every=10**9,
            checkpoint_every=10**9,
            history=History(),
            ranks=ranks,
            augment=bool(cfg.augment),
            lr_at=cfg.lr_at,
        )

    train(0, args.warmup)
    if ranks.distributed:
        dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    train(args.warmup, args.warmup + args.steps)
    if ranks.distributed:
        dist.barrier()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cpus = [cpu]
    if ranks.distributed:
        gathered: list[float | None] = [None] * ranks.world
        dist.all_gather_object(gathered, cpu)
        cpus = [float(c or 0.0) for c in gathered]
    if ranks.main:
        print(
            "RESULT "
            + json.dumps(
                {
                    "ranks": ranks.world,
                    "wall_s": wall,
                    "cpu_s": cpus,
                    "samples_per_s": args.steps * args.batch / wall,
                }
            )
        )
    leave(ranks)


def measure(args: argparse.Namespace, ranks: int) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        __file__,
        "--worker",
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"torchrun with {ranks} ranks failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=128, help="global batch (samples)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    runs: dict[int, list[dict[str, object]]] = {1: [], 2: []}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for r in (1, 2):
            runs[r].append(measure(args, r))
            print(f"{r} rank(s): {runs[r][-1]['samples_per_s']:.1f} samples/s", flush=True)
    sps = {
        r: statistics.median(float(m["samples_per_s"]) for m in ms)  # type: ignore[arg-type]
        for r, ms in runs.items()
    }
    cpu_per_sample = {
        r: statistics.median(sum(m["cpu_s"]) / (args.steps * args.batch) for m in ms)  # type: ignore[arg-type]
        for r, ms in runs.items()
    }
    speedup = sps[2] / sps[1]
    # Share of the wall time each rank was on a CPU: below 1 when other work competed for the
    # cores. The CPU-time figure below is what the scaling would be with a free core per rank
    # (it leaves out time a rank spent blocked waiting for the other).
    cpu_share = {
        r: statistics.median(
            max(m["cpu_s"]) / float(m["wall_s"])  # type: ignore
            for m in ms
        )
        for r, ms in runs.items()
    }
    cpu_speedup = 2 * cpu_per_sample[1] / cpu_per_sample[2]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    result = {
        "what": "ticketc find training throughput, torchrun gloo, 1 vs 2 ranks x 1 thread",
        "model": args.model,
        "global_batch": args.batch,
        "dtype": "float32",
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads_per_rank": 1,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "samples_per_s": {str(r): v for r, v in sps.items()},
        "speedup_2_ranks": speedup,
        "per_rank_efficiency": speedup / 2,
        "cpu_s_per_sample_all_ranks": {str(r): v for r, v in cpu_per_sample.items()},
        "cpu_share_of_wall_per_rank": {str(r): v for r, v in cpu_share.items()},
        "speedup_2_ranks_from_cpu_time": cpu_speedup,
        "runs": {str(r): ms for r, ms in runs.items()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    stem = "find_ddp_throughput" + ("" if args.model == "resnet20" else f"_{args.model}")
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (OUT / f"{stem}.md").write_text(
        f"# {result['what']}\n\n{args.model}, global batch {args.batch}, fp32, CPU "
        f"({result['cpu']}, {os.cpu_count()} cores, load average before "
        f"{load_before[0]:.1f}), torch {torch.__version__}, commit {commit}; medians of "
        f"{args.repeats} runs of {args.steps} steps.\n\n"
        "| ranks x threads | samples/s (wall) | CPU ms per sample (all ranks) | CPU share of "
        "wall per rank |\n|---|---|---|---|\n"
        + "".join(
            f"| {r} x 1 | {sps[r]:.1f} | {1000 * cpu_per_sample[r]:.2f} | {cpu_share[r]:.2f} |\n"
            for r in (1, 2)
        )
        + f"\n2 ranks: {speedup:.2f}x the samples/s of 1 rank by wall clock (per-rank "
        f"efficiency {100 * speedup / 2:.0f}%); from CPU time (a free core per rank, time "
        f"blocked on the other rank left out): {cpu_speedup:.2f}x.\n"
    )
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "samples_per_s",
                    "speedup_2_ranks",
                    "per_rank_efficiency",
                    "speedup_2_ranks_from_cpu_time",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
