"""One seed's run directory: its files, how a run starts, restarts or resumes, safe reads.

Every file is written atomically and read through ticketc's safe readers (a file replaced by a
pickle is one line, never code run). The layout is described in `ticketc.find.run`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ticketc.atomic import atomic_path
from ticketc.errors import UserError
from ticketc.find.config import FindConfig
from ticketc.find.search import Search, build
from ticketc.safe_load import load_tensor_dict, read_json, torch_load_safe

Log = Callable[[str], None]


def save(obj: object, path: Path) -> None:
    """torch.save `obj` to `path` atomically (old file or new, never half a file)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: Path) -> Any:
    """A run file, read safely (weights_only): a file replaced by a pickle is one line."""
    return torch_load_safe(path, trust_pickle=False)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A run file that holds name -> tensor (weights, masks), read safely."""
    return load_tensor_dict(path, "run file")


def write_json(obj: object, path: Path) -> None:
    """`obj` as indented JSON at `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


# The files a run writes at its top level (level_LL folders besides): what --force removes.
RUN_FILES = ("config.json", "data.json", "arch.json", "init.pt", "rewind_point.pt", "ticket.pt")
_WHAT_TO_DO = "pass --resume to continue it, --force to delete it and start over, or another --out"


class RunDir:
    """One seed's run directory."""

    def __init__(self, config: FindConfig, path: Path) -> None:
        self.config, self.path = config, path
        self._existed = path.exists()

    def level_dir(self, level: int) -> Path:
        return self.path / f"level_{level:02d}"

    def done(self, level: int) -> bool:
        return (self.level_dir(level) / "metrics.json").exists()

    def finished_levels(self) -> list[int]:
        return sorted(
            int(p.parent.name[len("level_") :]) for p in self.path.glob("level_*/metrics.json")
        )

    def has_progress(self) -> bool:
        """Whether any level finished or checkpointed: something worth resuming."""
        return any(self.path.glob("level_*/metrics.json")) or any(
            self.path.glob("level_*/partial.pt")
        )

    def clear(self) -> None:
        """Remove the run's own files (RUN_FILES, level_LL folders), nothing else."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for level in self.path.glob("level_[0-9][0-9]"):
            shutil.rmtree(level)

    def discard(self) -> None:
        """Remove what a failed start wrote, and the folder if this run created it."""
        self.clear()
        if not self._existed and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def open_run(
    config: FindConfig, path: Path, search: Search, *, resume: bool, force: bool, log: Log | None
) -> RunDir:
    """The run directory of `config` at `path`: new, restarted (`force`, or nothing trained
    yet), or continued (`resume`: same settings and data, possibly more levels).

    Raises UserError saying what to do when the folder holds something else.
    """
    run = RunDir(config, path)
    if (path / "config.json").is_file():
        if force or not run.has_progress():
            if log is not None:
                why = "--force" if force else "it had not trained any level yet"
                log(f"{path}: starting the run over ({why})")
            run.clear()
        elif not resume:
            raise UserError(f"--out {path} already holds a run: {_WHAT_TO_DO}")
        else:
            _check_resumable(run, search)
    elif path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise UserError(
            f"--out {path} exists and is not a ticketc find run folder: give a new or empty folder"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create run directory {path}: {e.strerror}") from e
    write_json(config.to_json(), path / "config.json")
    data = search.data
    write_json(
        {
            "name": data.name,
            "md5": search.data_md5,
            "train": len(data.train),
            "val": len(data.val),
            "test": len(data.test),
            "input_shape": list(data.input_shape),
            "num_classes": data.num_classes,
        },
        path / "data.json",
    )
    write_json(
        {
            "arch": config.arch,
            "arch_kwargs": search.arch_kwargs,
            "input_shape": list(data.input_shape),
        },
        path / "arch.json",
    )
    if not (path / "init.pt").exists():
        save(build(config, search.arch_kwargs, config.seed).state_dict(), path / "init.pt")
    return run


def _check_resumable(run: RunDir, search: Search) -> None:
    """Refuse, naming the setting, a resume that would change the finished levels' results."""
    new = run.config
    # settings a run from before they existed did not write take their defaults
    saved_config = read_json(run.path / "config.json", "run configuration")
    if not isinstance(saved_config, dict):
        raise UserError(f"run configuration {run.path / 'config.json'} is not a JSON object")
    try:
        old = FindConfig.from_json(saved_config).resolved()
    except (TypeError, ValueError) as e:
        raise UserError(
            f"run configuration {run.path / 'config.json'}: not as ticketc find writes it ({e})"
        ) from None
    data_file = run.path / "data.json"
    diff = new.result_differences(old)
    if not data_file.is_file():  # a run from before data.json: where its data were is all we know
        diff += [n for n in ("data_dir", "data") if getattr(old, n) != getattr(new, n)]
    if old.one_shot and (old.rounds, old.target_density) != (new.rounds, new.target_density):
        diff.append("rounds" if new.rounds is not None else "target_density")
    if diff:
        changes = ", ".join(
            f"--{n.replace('_', '-')} {old.shown(n)} (now {new.shown(n)})" for n in diff
        )
        raise UserError(
            f"--out {run.path} was started with other settings: {changes}; pass the "
            "same values to continue it, --force to start over, or another --out"
        )
    if data_file.is_file():
        described = read_json(data_file, "run data description")
        if not isinstance(described, dict) or "md5" not in described:
            raise UserError(f"run data description {data_file}: has no 'md5' entry")
        saved = described["md5"]
        if saved != search.data_md5:
            raise UserError(
                f"--out {run.path} was trained on other data than {new.data_flag} "
                f"{'(--data-dir ' + str(new.data_dir) + ') ' if new.data_dir else ''}gives "
                f"(md5 {saved}, now {search.data_md5}); pass the data it started with, "
                "--force to start over, or another --out"
            )
    beyond = [lv for lv in run.finished_levels() if lv not in search.levels]
    if beyond:
        flag = (
            f"--rounds {search.num_rounds}"
            if new.rounds is not None
            else f"--target-density {new.target_density}"
        )
        raise UserError(
            f"--out {run.path} has finished levels up to {max(beyond)}; {flag} stops "
            f"at level {search.levels[-1]}: give --rounds {max(beyond)} or more (or "
            "a --target-density that low) to continue it"
        )
