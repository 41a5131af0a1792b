"""Write files so that a failed or killed run never leaves a partial or corrupt output behind.

Temporary files and staging folders live beside their target (so the final rename stays on
one file system) under names that say who made them:

    .{target name}.ticketc-{host}-{pid}-{process start time}-{random}.tmp

A later run removes such an entry only when it is provably stale: it was made on this host by
a process that no longer runs (its pid is gone, or now belongs to a process started at another
time), and it is owned by the current user. Anything else is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from ticketc.errors import UserError

_TAG = "ticketc"
_NAME = re.compile(
    rf"^\.(?P<target>.+)\.{_TAG}-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+\.tmp$"
)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A file already at `path` survives a failed block untouched. An OSError inside the block (a
    full disk, a quota, a file size limit) becomes a UserError naming `path`. Raises UserError
    when the folder is missing or `path` is a directory.
    """
    target = _writable_target(path)
    tmp = _fresh_name(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}") from e
    os.close(fd)
    try:
        with _write_errors(target):
            yield tmp
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty folder beside `path` to build a multi-file output in; removed afterwards.

    The caller moves the finished files into place itself (see `ticketc.export`). Errors as
    for `atomic_path`.
    """
    target = _writable_target(path)
    with _stage(target) as stage:
        yield stage


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty folder beside `path`; it becomes `path` only if the block succeeds.

    `path` must be missing or an empty folder (UserError otherwise, or when its parent folder
    is missing); an OSError inside the block becomes a UserError naming `path`.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    _check_parent(target, parent)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} already exists and is not an empty directory")
    remove_stale(parent)
    with _stage(target) as stage:
        yield stage
        if target.exists():
            target.rmdir()
        os.replace(stage, target)


@contextlib.contextmanager
def _stage(target: Path) -> Iterator[Path]:
    """A fresh folder named for `target` (see the module's docstring), removed afterwards."""
    stage = _fresh_name(target)
    try:
        stage.mkdir(mode=0o777)  # the umask applies
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}") from e
    try:
        with _write_errors(target):
            yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files and staging folders that killed ticketc runs left in `folder`.

    Returns what was removed. Only entries named as above, made on this host by a process that
    is gone, and owned by the current user are touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _NAME.match(entry.name)
        if match is None or match["host"] != _host():
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if _alive(int(match["pid"]), int(match["start"])):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_error(e: BaseException, target: str | os.PathLike[str]) -> UserError | None:
    """The UserError for a failed write to `target`, or None when `e` is not a write failure.

    torch's zip writer reports a failed write (a full disk, a file size limit) as a
    RuntimeError from its C++ code ("file write failed", "unexpected pos").
    """
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = f"{reason} (the disk is full)"
        return UserError(f"cannot write {target}: {reason}")
    if isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("file write failed", "PytorchStreamWriter", "inline_container")
    ):
        return UserError(f"cannot write {target}: the write failed (is the disk full?)")
    return None


@contextlib.contextmanager
def _write_errors(target: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, RuntimeError) as e:
        error = write_error(e, target)
        if error is None:
            raise
        raise error from e


def _check_parent(target: Path, parent: Path) -> None:
    """UserError naming `target` unless its parent is an existing directory."""
    if parent.is_dir():
        return
    if parent.exists():
        raise UserError(f"cannot write {target}: {parent} is not a directory")
    raise UserError(f"cannot write {target}: directory {parent} does not exist")


def _writable_target(path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    _check_parent(target, parent)
    if target.is_dir():
        raise UserError(f"cannot write {target}: it is a directory")
    remove_stale(parent)
    return target


def _fresh_name(target: Path) -> Path:
    start = _start_time(os.getpid()) or 0
    token = secrets.token_hex(4)
    return target.with_name(f".{target.name}.{_TAG}-{_host()}-{os.getpid()}-{start}-{token}.tmp")


@cache
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None where unknown."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process from /proc/PID/stat; None without /proc or process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ")"
    fields = text[text.rfind(")") + 2 :].split()
    if len(fields) < 20:
        return None
    return fields[0], int(fields[19])


def _alive(pid: int, start: int) -> bool:
    """Whether the process `pid` that started at `start` (0: not recorded) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # the pid exists under another user: the start time tells whether it is ours
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc to ask: a live pid may well be the same process
    state, started = stat
    if state in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    return start == 0 or started == start
