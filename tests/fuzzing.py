"""Fuzzing helpers shared by tests/test_fuzz.py and benchmarks/fuzz_readers.py.

Small valid artifacts of every kind ticketc reads, seeded mutations of their bytes (truncated,
bit-flipped, zeroed, swapped, appended; half aimed at headers, pickles, JSON and protobuf ends),
and in-process / subprocess runs of the CLI with stderr captured at the file-descriptor level
(so that C++ log lines count), classified as clean or not.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHAPE = ["--input-shape", "1,20"]  # every artifact below takes 20 features
MUTATIONS = ("truncate", "flip", "zero", "swap", "append")
CLEAN = ("ok", "clean-error")


class Timeout(BaseException):
    """Escapes `main`'s last-resort `except Exception`."""


def _tiny_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def _prune_(model: nn.Module, density: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < density)


def build_artifacts(folder: Path) -> dict[str, Path]:
    """One small valid file of each kind the readers take."""
    from ticketc.checkpoint import Ticket, save_ticket
    from ticketc.cli import main
    from ticketc.models import lenet300

    torch.manual_seed(0)
    out: dict[str, Path] = {}
    lenet = lenet300(num_classes=4, in_features=20)
    _prune_(lenet, 0.1)
    masks = {n: p != 0 for n, p in lenet.named_parameters() if n.endswith("weight")}
    ticket = Ticket(
        arch="ticketc.models:lenet300",
        arch_kwargs={"num_classes": 4, "in_features": 20},
        state_dict=lenet.state_dict(),
        masks=masks,
        rewind_state_dict=lenet.state_dict(),
    )
    out["ticket"] = folder / "ticket.pt"
    save_ticket(ticket, out["ticket"])
    mlp = _tiny_mlp()
    _prune_(mlp, 0.2)
    out["state_dict"] = folder / "sd.pt"
    torch.save(mlp.state_dict(), out["state_dict"])
    out["mask"] = folder / "masks.pt"  # read by --mask (never unpickled)
    torch.save({n: p != 0 for n, p in mlp.named_parameters() if n.endswith("weight")}, out["mask"])
    out["sample"] = folder / "sample.pt"  # read by --sample (never unpickled)
    torch.save(torch.randn(1, 20), out["sample"])
    x = torch.randn(2, 20)
    out["pt2"] = folder / "program.pt2"
    torch.export.save(torch.export.export(mlp.eval(), (x,)), out["pt2"])
    quiet = ["--json"]
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        for fmt in ("portable", "sparse-initializer", "dense"):
            out[f"onnx-{fmt}"] = folder / f"{fmt}.onnx"
            rc = main(
                [
                    "export",
                    str(out["ticket"]),
                    "--format",
                    fmt,
                    "-o",
                    str(out[f"onnx-{fmt}"]),
                    *SHAPE,
                    *quiet,
                ]
            )
            assert rc == 0, fmt
        out["compiled"] = folder / "compiled.pt2"
        rc = main(["compile", str(out["ticket"]), "-o", str(out["compiled"]), *SHAPE, *quiet])
        assert rc == 0
    return out


def metadata_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges that are not tensor payload: zip headers, pickles, JSON, protobuf ends."""
    size = path.stat().st_size
    ranges = [(0, min(size, 512)), (max(0, size - 4096), size)]
    if zipfile.is_zipfile(path):
        payload = re.compile(r"(/data/\d+|/weight_\d+|/tensor_constant_?\d+)$")
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if payload.search(info.filename):
                    continue
                end = info.header_offset + 30 + len(info.filename) + info.compress_size + 64
                ranges.append((info.header_offset, min(size, end)))
    return ranges


def mutate(data: bytes, kind: str, rng: random.Random, hot: list[tuple[int, int]]) -> bytes:
    n = len(data)

    def pos() -> int:
        if hot and rng.random() < 0.5:
            a, b = rng.choice(hot)
            return rng.randrange(a, max(a + 1, b))
        return rng.randrange(n)

    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[: pos()])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = pos()
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == "zero":
        i = pos()
        length = rng.choice((1, 4, 16, 256, 4096))
        buf[i : i + length] = bytes(len(buf[i : i + length]))
        return bytes(buf)
    if kind == "swap":
        length = rng.choice((4, 16, 256))
        i, j = sorted((pos(), pos()))
        if j - i < length or j + length > n:
            return bytes(buf[::-1][:n]) if rng.random() < 0.1 else bytes(buf)
        a, b = bytes(buf[i : i + length]), bytes(buf[j : j + length])
        buf[i : i + length], buf[j : j + length] = b, a
        return bytes(buf)
    if kind == "append":
        extra = rng.randbytes(rng.choice((1, 16, 1024)))
        return bytes(buf) + extra
    if kind == "zip-version":  # every entry "needs zip 9.0": zipfile raises NotImplementedError
        return zip_needing_version(bytes(buf), 90)
    raise ValueError(kind)


def zip_needing_version(data: bytes, version: int) -> bytes:
    """`data` (a zip archive) with every central-directory entry's "version needed to extract"
    set to `version` (tens: 90 is 9.0), as a damaged or foreign archive can say."""
    buf = bytearray(data)
    start = 0
    while (i := buf.find(b"PK\x01\x02", start)) >= 0:
        buf[i + 6 : i + 8] = version.to_bytes(2, "little")
        start = i + 4
    return bytes(buf)


@contextlib.contextmanager
def captured_stderr(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (C++ logs) and sys.stderr (Python, even under pytest's capture)
    to `path`, both appending."""
    path.write_bytes(b"")
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        with open(path, "a", buffering=1) as text, contextlib.redirect_stderr(text):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run_in_process(argv: list[str], timeout: int, err_file: Path) -> tuple[int, str]:
    from ticketc.cli import main

    def on_alarm(signum: int, frame: object) -> None:
        raise Timeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout)
    try:
        with (
            captured_stderr(err_file),
            open(os.devnull, "w") as null,
            contextlib.redirect_stdout(null),
        ):
            rc = main(argv)
    except Timeout:
        rc = -9
    except SystemExit as e:
        rc = int(e.code or 0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return rc, err_file.read_text(errors="replace")


def run_subprocess(argv: list[str], timeout: int) -> tuple[int, str]:
    try:
        p = subprocess.run(
            [sys.executable, "-m", "ticketc", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        return -9, ""
    return p.returncode, p.stderr


def classify(rc: int, err: str, stray: list[str], wrote_on_failure: bool) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    if rc == -9:
        return "hang"
    if "Traceback" in err:
        return "traceback"
    if rc == 1:
        return "exit1:" + (lines[-1][:90] if lines else "")
    if rc not in (0, 2):
        return f"exit{rc}"
    if rc == 2 and len(lines) != 1:
        return f"lines{len(lines)}:" + (lines[0][:60] if lines else "")
    if stray:
        return "stray:" + ",".join(sorted(stray))[:80]
    if wrote_on_failure:
        return "partial-output"
    return "ok" if rc == 0 else "clean-error"


def readers_for(
    kind: str, mutant: Path, good: dict[str, Path], out_dir: Path, readers: list[str]
) -> list[tuple[str, list[str], Path | None]]:
    onnx = kind.startswith("onnx")
    arch = ["--arch", "tests.models_for_tests:tiny_mlp"] if kind == "state_dict" else []
    runs: list[tuple[str, list[str], Path | None]] = []
    if kind in ("mask", "sample"):  # a mutated side file next to a sound model
        flag = "--mask" if kind == "mask" else "--sample"
        model = [str(good["state_dict"]), "--arch", "tests.models_for_tests:tiny_mlp"]
        shape = SHAPE if kind == "mask" else []
        if "inspect" in readers and kind == "mask":
            runs.append(("inspect", ["inspect", *model, flag, str(mutant), "--json"], None))
        if "export" in readers:
            out = out_dir / "out.onnx"
            runs.append(
                (
                    "export",
                    ["export", *model, *shape, flag, str(mutant), "-o", str(out), "--json"],
                    out,
                )
            )
        if "verify" in readers and kind == "sample":
            runs.append(
                (
                    "verify",
                    [
                        "verify",
                        str(good["onnx-portable"]),
                        "--against",
                        str(good["ticket"]),
                        flag,
                        str(mutant),
                        "--json",
                    ],
                    None,
                )
            )
        return runs
    if "inspect" in readers:
        runs.append(("inspect", ["inspect", str(mutant), *arch, "--json"], None))
    if "export" in readers:
        out = out_dir / "out.onnx"
        shape = SHAPE if not kind.endswith("pt2") and kind != "compiled" else []
        runs.append(
            ("export", ["export", str(mutant), *arch, *shape, "-o", str(out), "--json"], out)
        )
    if "compile" in readers and not onnx:
        out = out_dir / "out.pt2"
        shape = SHAPE if not kind.endswith("pt2") and kind != "compiled" else []
        runs.append(
            ("compile", ["compile", str(mutant), *arch, *shape, "-o", str(out), "--json"], out)
        )
    if "verify" in readers:
        if onnx:
            runs.append(
                (
                    "verify",
                    ["verify", str(mutant), "--against", str(good["ticket"]), *SHAPE, "--json"],
                    None,
                )
            )
        elif kind == "ticket":
            runs.append(
                (
                    "verify",
                    [
                        "verify",
                        str(good["onnx-portable"]),
                        "--against",
                        str(mutant),
                        *SHAPE,
                        "--json",
                    ],
                    None,
                )
            )
    return runs


def fuzz_case(
    kind: str,
    base: Path,
    good: dict[str, Path],
    case: Path,
    mutation: str,
    rng: random.Random,
    readers: list[str],
    run: Callable[[list[str]], tuple[int, str]],
) -> list[tuple[str, str, str]]:
    """Write one mutant of `base` into the empty folder `case` and run every reader on it.

    Returns (reader, verdict, stderr) per run; a verdict is "ok" or "clean-error" when the run
    kept the promise (see `classify`).
    """
    mutant = case / base.name
    mutant.write_bytes(mutate(base.read_bytes(), mutation, rng, metadata_ranges(base)))
    side = base.with_name(base.name + ".data")  # ONNX external data travels beside its file
    if side.exists():
        (case / side.name).write_bytes(side.read_bytes())
    out_dir = case / "out"
    out_dir.mkdir()
    results = []
    for reader, argv, out in readers_for(kind, mutant, good, out_dir, readers):
        before = set(os.listdir(out_dir)) | set(os.listdir(case))
        rc, err = run(argv)
        new = sorted((set(os.listdir(out_dir)) | set(os.listdir(case))) - before)
        outputs = (
            set()
            if out is None
            else {  # ONNX external data, compile's plan, the card
                out.name,
                out.name + ".data",
                out.with_suffix(".plan.json").name,
                out.with_suffix(".card.md").name,
                out.with_suffix(".card.json").name,
            }
        )
        stray = [n for n in new if n not in outputs or rc != 0]
        wrote = rc != 0 and any((out_dir / n).exists() for n in outputs)
        results.append((reader, classify(rc, err, stray, wrote), err))
        for name in new:  # leave the next reader a clean folder
            path = out_dir / name
            if path.is_file():
                path.unlink()
    return results


FIND = [
    "--model",
    "tests.test_find_run:tiny_mlp",
    "--data",
    "tests.test_find_run:tiny_pairs",
    "--rounds",
    "1",
    "--iterations",
    "10",
    "--batch-size",
    "30",
    "--eval-every",
    "5",
    "--checkpoint-every",
    "5",
    "--val-size",
    "60",
    "--no-progress",
    "--threads",
    "1",
]


def fuzz_run_dir(
    finished: Path,
    case: Path,
    mutation: str,
    rng: random.Random,
    readers: list[str],
    run: Callable[[list[str]], tuple[int, str]],
) -> list[tuple[str, str, str]]:
    """Copy the finished `find` run `finished` into `case`, mutate one of its files and run
    `report` and `find --resume` on it (level 1 and the ticket are removed first, so resume
    reads the earlier levels' files again). Verdicts as in `fuzz_case`."""
    import shutil

    results = []
    for reader in readers:
        work = case / reader
        shutil.copytree(finished, work)
        if reader == "resume":
            shutil.rmtree(work / "level_01")
            (work / "ticket.pt").unlink()
        files = sorted(p for p in work.rglob("*") if p.is_file())
        victim = rng.choice(files)
        victim.write_bytes(mutate(victim.read_bytes(), mutation, rng, metadata_ranges(victim)))
        before = {p.relative_to(work) for p in work.rglob("*")}
        if reader == "report":
            argv = ["report", str(work), "--no-export", "--json"]
            outputs = {Path("report")}  # what it writes lies in report/
        else:
            argv = ["find", "--out", str(work), *FIND, "--resume"]
            outputs = None  # a resumed run writes its levels; only hidden leftovers are stray
        rc, err = run(argv)
        new = {p.relative_to(work) for p in work.rglob("*")} - before
        if outputs is None:
            stray = [
                str(p)
                for p in new
                if any(part.startswith(".") or ".ticketc-" in part for part in p.parts)
            ]
        else:
            stray = [
                str(p)
                for p in new
                if p.parts[0] not in {str(o) for o in outputs}
                or any(part.startswith(".") for part in p.parts)
                or rc != 0
            ]
        results.append(
            (f"{reader}:{victim.relative_to(work)}", classify(rc, err, stray, False), err)
        )
    return results
