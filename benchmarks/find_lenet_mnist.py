"""Reproduce Frankle & Carbin (2019) on Lenet-300-100 / MNIST and time the search.

Protocol: Adam 1.2e-3, batch 60, 50K iterations per round, layer-wise pruning 20% (hidden) /
10% (output) per round, reset to init, `--rounds` rounds (default 18), `--seeds` seeds, with the
random re-initialisation control. All seeds and controls train together in one `Ensemble`.

Two parts, both written under benchmarks/results/find_lenet_mnist/:

1. speed: the plain loop (one model at a time: nn.Module, torch.optim.Adam, mask after each
   step) against the batched ensemble, side by side on the same machine, at several densities;
   the protocol time of each is extrapolated from the measured per-step times.
2. protocol: the full search, resumable (`--resume` is implied: rerun the same command),
   with results (JSON, markdown, PNG) rewritten after every level, so a partial run still
   reports every finished level.

    python benchmarks/find_lenet_mnist.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ticketc.data import load_dataset
from ticketc.find import FindConfig, find_tickets, pruning
from ticketc.find.ensemble import Ensemble
from ticketc.find.report import collect, export_size, plot, table_markdown, to_json
from ticketc.models import lenet300

OUT = Path(__file__).parent / "results" / "find_lenet_mnist"
PAPER_LEVELS = (3, 7, 9, 12, 15, 18)  # 51.3 / 21.1 / 13.5 / 7.0 / 3.6 / 1.9 % remaining
# 3 seeds x (19 ticket levels + 18 reinit-control levels) x 50K iterations
PAPER_PROTOCOL_MODEL_STEPS = 3 * (19 + 18) * 50_000


def environment() -> dict[str, object]:
    return {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": "float32",
        "batch": 60,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba_threads": __import__("numba").get_num_threads(),
        "load_average_1_5_15_min": list(__import__("os").getloadavg()),
    }


def _random_level_masks(model: torch.nn.Module, level: int, seed: int) -> pruning.Masks:
    """Masks with the per-layer densities of `level` layer-wise rounds (speed does not depend
    on which weights survive)."""
    kinds = pruning.prunable_parameters(model)
    params = dict(model.named_parameters())
    full = pruning.full_masks(model, kinds)
    alive = {n: params[n].numel() for n in kinds}
    for _ in range(level):
        alive = {
            n: alive[n] - int(round((0.1 if kinds[n] == "output" else 0.2) * alive[n]))
            for n in alive
        }
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in full.items():
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[: alive[n]]] = True
        out[n] = flat.view_as(m)
    return out


def plain_loop_ms(x: torch.Tensor, y: torch.Tensor, level: int, steps: int) -> float:
    """ms per step of one model trained the plain way (the baseline)."""
    model = lenet300()
    masks = _random_level_masks(model, level, 0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)

    def step(i: int) -> None:
        idx = perm[(i * 60) % (len(x) - 60) :][:60]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m)

    for i in range(20):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return (time.perf_counter() - start) / steps * 1e3


def ensemble_ms(x: torch.Tensor, y: torch.Tensor, level: int, members: int, steps: int) -> float:
    """ms per optimizer step of ALL members of the batched ensemble."""
    model = lenet300()
    states = [lenet300().state_dict() for _ in range(members)]
    masks = [_random_level_masks(model, level, s) for s in range(members)]
    ens = Ensemble(model, states, masks, lr=1.2e-3, sparse_below=FindConfig().csr_below)
    g = torch.Generator().manual_seed(0)
    idx_all = torch.stack([torch.randperm(len(x), generator=g) for _ in range(members)])

    def step(i: int) -> None:
        off = (i * 60) % (len(x) - 60)
        idx = idx_all[:, off : off + 60]
        ens.step_on(x, y, idx)

    for i in range(20):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return (time.perf_counter() - start) / steps * 1e3


def _timed_in_fresh_process(loop: str, level: int, members: int, args: argparse.Namespace) -> float:
    """ms per step of `plain_loop_ms` or `ensemble_ms`, run in a new Python process.

    A fresh process per measurement: in one long-lived process the plain loop slowed from
    1.6 to 2.7 ms per step after the ensemble had run (measured; the allocator's state left by
    the other loop's large tensors is the likely cause), which would flatter the ensemble.
    """
    call = (
        f"plain_loop_ms(x, y, {level}, {args.speed_steps})"
        if loop == "plain"
        else f"ensemble_ms(x, y, {level}, {members}, {args.speed_steps})"
    )
    code = (
        "import sys, torch, warnings; warnings.filterwarnings('ignore');"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r});"
        "from find_lenet_mnist import plain_loop_ms, ensemble_ms;"
        "from ticketc.data import load_dataset;"
        f"torch.set_num_threads({torch.get_num_threads()});"
        f"d = load_dataset('mnist', {args.data_dir!r}); x, y = d.train.x, d.train.y;"
        f"print({call})"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_speed(args: argparse.Namespace) -> dict:
    """Plain loop vs ensemble, interleaved so both see the same machine load."""
    levels = tuple(int(v) for v in args.speed_levels.split(","))
    rows = []
    for level in levels:
        # as in the protocol: the dense level trains the seeds alone, every pruned level
        # trains each seed's ticket and its re-initialised control
        members = args.seeds if level == 0 else args.seeds * 2
        plain, batched = [], []
        for _ in range(args.speed_repeats):
            plain.append(_timed_in_fresh_process("plain", level, members, args))
            batched.append(_timed_in_fresh_process("ensemble", level, members, args))
        p, b = statistics.median(plain), statistics.median(batched)
        rows.append(
            {
                "level": level,
                "plain_ms_per_model_step": p,
                "ensemble_ms_per_step": b,
                "ensemble_members": members,
                "ensemble_ms_per_model_step": b / members,
                "speedup": p / (b / members),
                "plain_samples": plain,
                "ensemble_samples": batched,
            }
        )
        print(
            f"speed level {level}: plain {p:.2f} ms/model-step, ensemble {b / members:.2f} "
            f"ms/model-step ({members} members), {p / (b / members):.2f}x",
            flush=True,
        )
    return {
        "rows": rows,
        "steps_per_measure": args.speed_steps,
        "repeats": args.speed_repeats,
        "fresh_process_per_measurement": True,
        **extrapolate(rows),
    }


def extrapolate(rows: list[dict]) -> dict[str, float]:
    """Hours of the paper's protocol (3 seeds, 18 rounds, 50K iterations, reinit control at
    every pruned level) at the measured per-model-step times: the plain loop at the median of
    its measurements (it does the same work at every density; the median ignores a level
    slowed by a noisy neighbour, and is the less flattering choice when one is), the ensemble
    at each level's nearest measured level."""
    plain_per_step = statistics.median(r["plain_ms_per_model_step"] for r in rows)
    plain_ms = ens_ms = 0.0
    for level in range(19):
        members = 3 if level == 0 else 6
        nearest = min(rows, key=lambda r: abs(r["level"] - level))
        plain_ms += members * 50_000 * plain_per_step
        ens_ms += members * 50_000 * nearest["ensemble_ms_per_model_step"]
    return {
        "protocol_model_steps": PAPER_PROTOCOL_MODEL_STEPS,
        "plain_protocol_hours_extrapolated": plain_ms / 3.6e6,
        "ensemble_protocol_hours_extrapolated": ens_ms / 3.6e6,
        "protocol_speedup_extrapolated": plain_ms / ens_ms,
    }


def write_results(run_dirs: list[Path], extra: dict, export: bool = False) -> None:
    rows = collect(run_dirs)
    if export:
        for r in rows:
            r.export_bytes = export_size(run_dirs[0] / f"level_{r.level:02d}")
    OUT.mkdir(parents=True, exist_ok=True)
    plot(rows, OUT, title="Lenet-300-100 / MNIST, IMP reset to init")
    result = {"environment": environment(), **extra, "levels": to_json(rows)}
    (OUT / "results.json").write_text(json.dumps(result, indent=1))
    md = ["# Lenet-300-100 on MNIST: lottery-ticket reproduction", ""]
    md.append(f"Command: `{extra['command']}`  ")
    env = result["environment"]
    md.append(
        f"Device: {env['device']} ({env['cpu_count']} cores, torch threads "
        f"{env['torch_threads']}), dtype {env['dtype']}, batch {env['batch']}, "
        f"torch {env['torch']}, Python {env['python']}.  "
    )
    md.append(
        f"Seeds: {extra['seeds']}; mean ± std over seeds. Finished levels: "
        f"{len(rows)}; wall clock so far: {extra['protocol_wall_s'] / 60:.1f} min."
    )
    model_steps = sum(
        len(r.values.get("ticket", {}).get("final_test_acc", []))
        + len(r.values.get("reinit", {}).get("final_test_acc", []))
        for r in rows
    )
    model_steps *= extra["iterations"]
    extra["protocol_model_steps_run"] = model_steps
    md.append(
        f"Model-steps trained (members x iterations over finished levels): "
        f"{model_steps:,}, i.e. {1e3 * extra['protocol_wall_s'] / max(model_steps, 1):.2f} "
        "ms per model-step including evaluation and file writing."
    )
    if "speed" in extra:
        plain = statistics.median(r["plain_ms_per_model_step"] for r in extra["speed"]["rows"])
        md.append(
            f"The plain loop, at its measured {plain:.2f} ms per model-step (median over "
            "levels), would need "
            f"{model_steps * plain / 6e4:.1f} min for the same model-steps (training only)."
        )
    if extra.get("notes"):
        md += ["", "Notes on this run:", ""] + [f"- {n}" for n in extra["notes"]]
    md.append("")
    md.append(table_markdown(rows))
    if "speed" in extra:
        extra["speed"].update(extrapolate(extra["speed"]["rows"]))
        md.append("## Speed: plain loop vs batched ensemble (ms per model-step, median)")
        md.append("")
        md.append("| level | plain loop | ensemble | speed-up |")
        md.append("|---|---|---|---|")
        for r in extra["speed"]["rows"]:
            md.append(
                f"| {r['level']} | {r['plain_ms_per_model_step']:.2f} | "
                f"{r['ensemble_ms_per_model_step']:.2f} ({r['ensemble_members']} members) "
                f"| {r['speedup']:.2f}x |"
            )
        s = extra["speed"]
        md.append("")
        md.append(
            f"Extrapolated to the paper's protocol (3 seeds x (19 ticket + 18 reinit "
            f"levels) x 50K = {s['protocol_model_steps']:,} model-steps): "
            f"plain loop {s['plain_protocol_hours_extrapolated']:.2f} h, ensemble "
            f"{s['ensemble_protocol_hours_extrapolated']:.2f} h "
            f"({s['protocol_speedup_extrapolated']:.2f}x)."
        )
    md += verdict(rows)
    md.append("")
    md.append("![accuracy](accuracy.png) ![early stop](early_stop.png)")
    if any(r.export_bytes is not None for r in rows):
        md.append("![export size](export_size.png)")
    (OUT / "results.md").write_text("\n".join(md) + "\n")


def verdict(rows: list) -> list[str]:
    """The reproduction's claims checked against the finished levels."""
    out = ["", "## Checks", ""]
    dense = rows[0]
    d_mean, d_std, _ = dense.stat("ticket", "early_stop_test_acc")
    target = next((r for r in rows if abs(100 * r.density - 3.6) < 0.05), None)
    if target is None:
        out.append("- The 3.6% level has not finished yet.")
        return out
    t_mean, t_std, n = target.stat("ticket", "early_stop_test_acc")
    out.append(
        f"- Ticket at {100 * target.density:.1f}%: {100 * t_mean:.2f} ± {100 * t_std:.2f}% "
        f"test accuracy at early stopping vs dense {100 * d_mean:.2f} ± {100 * d_std:.2f}% "
        f"({n} seeds): {'reaches' if t_mean >= d_mean - 0.001 else 'does NOT reach'} the "
        "dense accuracy (tolerance 0.1 point)."
    )
    c_mean, c_std, cn = target.stat("reinit", "early_stop_test_acc")
    if cn:
        gap = 100 * (t_mean - c_mean)
        # "clearly": the gap exceeds three times the larger seed-to-seed spread
        clear = gap > 3 * max(100 * c_std, 100 * t_std, 0.1)
        out.append(
            f"- Random re-initialisation at {100 * target.density:.1f}%: "
            f"{100 * c_mean:.2f} ± {100 * c_std:.2f}%, {gap:.2f} points below the ticket "
            f"({'clearly worse' if clear else 'NOT clearly worse'})."
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/mnist")
    p.add_argument("--runs", type=Path, default=OUT / "runs")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=18)
    p.add_argument("--iterations", type=int, default=50_000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument(
        "--control-levels",
        default="all",
        help="'all' or comma-separated levels with the reinit control",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--speed-steps", type=int, default=300)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument(
        "--speed-levels",
        default=",".join(str(v) for v in range(19)),
        help="pruning levels (densities) at which to time both loops (default: all)",
    )
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-protocol", action="store_true")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the results from the run directories (no training)",
    )
    p.add_argument(
        "--note", action="append", default=[], help="a note on the run for results.md (repeatable)"
    )
    p.add_argument(
        "--export-sizes",
        action="store_true",
        help="with --report-only: export every level of seed 0 and plot the size",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist", args.data_dir)
    extra: dict = {
        "command": " ".join(["python", *sys.argv]),
        "seeds": args.seeds,
        "rounds": args.rounds,
        "iterations": args.iterations,
        "protocol_wall_s": 0.0,
    }
    speed_path = OUT / "speed.json"
    if not args.skip_speed:
        extra["speed"] = measure_speed(args)
        OUT.mkdir(parents=True, exist_ok=True)
        speed_path.write_text(
            json.dumps({"environment": environment(), **extra["speed"]}, indent=1)
        )
    elif speed_path.exists():
        extra["speed"] = json.loads(speed_path.read_text())
    if args.skip_protocol:
        return 0
    control_levels = (
        None
        if args.control_levels == "all"
        else tuple(int(v) for v in args.control_levels.split(","))
    )
    extra["control_levels"] = control_levels or "all"
    configs = [
        FindConfig(
            model="lenet300",
            dataset="mnist",
            data_dir=args.data_dir,
            rounds=args.rounds,
            iterations=args.iterations,
            seed=seed,
            controls=("reinit",),
            control_levels=control_levels,
            eval_every=args.eval_every,
            checkpoint_every=5000,
        )
        for seed in range(args.seeds)
    ]
    run_dirs = [args.runs / f"seed_{c.seed}" for c in configs]
    wall_path = OUT / "wall.json"
    wall = json.loads(wall_path.read_text()) if wall_path.exists() else {"protocol_wall_s": 0.0}
    if args.report_only:
        extra["protocol_wall_s"] = wall["protocol_wall_s"]
        extra["command"] = wall.get("command", extra["command"])
        extra["notes"] = args.note
        write_results(run_dirs, extra, export=args.export_sizes)
        return 0
    wall["command"] = extra["command"]
    for level in range(args.rounds + 1):
        start = time.perf_counter()
        find_tickets(
            configs,
            run_dirs,
            resume=True,
            data=data,
            progress=False,
            stop_after_level=level,
            log=lambda s: print(s, flush=True),
        )
        wall["protocol_wall_s"] += time.perf_counter() - start
        wall_path.write_text(json.dumps(wall))
        extra["protocol_wall_s"] = wall["protocol_wall_s"]
        write_results(run_dirs, extra)
    find_tickets(
        configs,
        run_dirs,
        resume=True,
        data=data,
        progress=False,
        log=lambda s: print(s, flush=True),
    )
    write_results(run_dirs, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
