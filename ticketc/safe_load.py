"""Read the files users bring without running code from them; every failure is one clear line.

Every ticketc reader of a torch file goes through `torch_load_safe` (models, masks, samples,
run directories) or `load_exported_program` (.pt2). Before anything is deserialised:

- zip archives (torch.save files, .pt2) are opened with `zipfile` and the sizes their entries
  declare are checked against the file and against the memory this machine has: torch writes
  its records uncompressed, so a 3 MiB file declaring 3 GiB of data is a zip bomb or garbage;
- pickles go through torch's own `weights_only` unpickler; anything else (a whole module saved
  with `torch.save(model)`) needs `--trust-pickle`, named in the refusal;
- .pt2 archives are checked by `ticketc.safe_pt2` for every entry that `torch.export.load`
  would unpickle, `exec` or import (see there).

torch's loggers and warnings are silenced while a file is read (`quiet`), so that the one line
ticketc prints is the only output of a failed read; the user's logging and warnings settings are
restored afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import pickle
import re
import sys
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from ticketc.errors import UserError, first_line

TRUST_FLAG = "--trust-pickle"
# Larger zip entries that are not tensor payload are not read into memory: a JSON config or a
# pickle of a few hundred MiB is not something torch or ticketc writes.
MAX_METADATA_BYTES = 256 * 2**20


def check_file(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path when it names a non-empty regular file; UserError otherwise."""
    p = Path(path)
    try:
        if not p.exists():
            raise UserError(f"{p}: no such file")
        if p.is_dir():
            raise UserError(f"{p}: is a directory, expected a file")
        if not p.is_file():
            raise UserError(f"{p}: not a regular file")
        if p.stat().st_size == 0:
            raise UserError(f"{p}: file is empty")
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror or e})") from e
    return p


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Python logging and warnings inside the block; restore the previous state after.

    torch.export.load logs "Ran into the following error when deserializing" with a traceback,
    torch.load and onnx warn on odd files: none of that is for the user, who gets one line.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup v2 limit."""
    available = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            room = int(limit) - used
            available = room if available is None else min(available, room)
    return available


def check_memory(nbytes: int, path: str | os.PathLike[str], what: str) -> None:
    """UserError when `nbytes` (what `path` declares) exceed the memory this machine has free."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise UserError(
            f"{path}: {what} declares {_size(nbytes)}, more than the {_size(free)} of memory "
            "available on this machine"
        )


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


#: What reading a damaged zip archive (or one member of it) raises: bad structure, a method or
#: version zipfile does not implement, encryption, bad compressed data, short reads.
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    RuntimeError,
    zlib.error,
    OSError,
    ValueError,
    EOFError,
)


def open_zip(f: IO[bytes], path: Path) -> zipfile.ZipFile:
    """The zip archive in `f`, its declared sizes checked (see `check_zip_sizes`)."""
    try:
        archive = zipfile.ZipFile(f)
    except ZIP_ERRORS as e:
        raise UserError(f"{path}: corrupt zip archive ({first_line(e)})") from e
    check_zip_sizes(archive, os.fstat(f.fileno()).st_size, path)
    return archive


def check_zip_sizes(archive: zipfile.ZipFile, file_size: int, path: Path) -> None:
    """Refuse an archive whose entries declare more bytes than the file holds or memory allows.

    torch (torch.save, torch.export.save) stores every record uncompressed, so the declared
    sizes of a sound archive add up to less than the file. A reader that trusted them would
    allocate what a few bytes of header claim.
    """
    declared = 0
    for info in archive.infolist():
        if info.file_size < 0 or info.compress_size < 0:
            raise UserError(f"{path}: corrupt zip archive (negative size of {info.filename!r})")
        if info.header_offset + info.compress_size > file_size:
            raise UserError(
                f"{path}: truncated or corrupt zip archive ({info.filename!r} runs past the end "
                "of the file)"
            )
        declared += info.file_size
    if declared > file_size:
        raise UserError(
            f"{path}: its zip entries declare {_size(declared)} of data in a "
            f"{_size(file_size)} file (torch stores records uncompressed): refused as corrupt "
            "or a zip bomb"
        )
    check_memory(declared, path, "the archive")


def read_entry(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    """One zip entry read whole, for metadata entries (JSON, pickles); sizes checked first."""
    info = archive.getinfo(name)
    if info.file_size > MAX_METADATA_BYTES:
        raise UserError(f"{path}: entry {name!r} declares {_size(info.file_size)}: too large")
    try:
        return archive.read(info)
    except ZIP_ERRORS as e:
        raise UserError(f"{path}: corrupt zip entry {name!r} ({first_line(e)})") from e


def is_pt2_archive(names: list[str]) -> bool:
    """torch.export archives: `<root>/archive_format` (2.8+) or a top-level `version` (2.7)."""
    return any(n.endswith("/archive_format") or n == "archive_format" for n in names) or (
        "version" in names and "serialized_exported_program.json" in names
    )


def looks_like_onnx(path: Path) -> bool:
    """Whether `path` parses as an ONNX ModelProto with a graph (read without external data)."""
    if path.stat().st_size >= 2**31:
        return False
    try:
        import onnx

        with quiet():
            model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf rejects non-ONNX bytes in many ways
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def describe_other_format(path: Path, names: list[str] | None) -> str | None:
    """A line saying what `path` is when it is an ONNX file or a .pt2 program, else None."""
    if names is not None and is_pt2_archive(names):
        return f"{path} is a torch.export program (.pt2 archive), not a torch.save file"
    if names is None and looks_like_onnx(path):
        return (
            f"{path} is an ONNX model, not a PyTorch file: ticketc reads ONNX files in "
            "`export`, `inspect` and `verify` (the file, or its --against)"
        )
    return None


def _starts_as_a_pickle(f: Any) -> bool:
    """Whether a file opens with a pickle protocol 2+ header (PROTO opcode 0x80, then the
    protocol number) and is no torch.save legacy file: those begin with a pickled magic
    number, a LONG1 opcode (0x8a) right after the header."""
    f.seek(0)
    head = f.read(3)
    return len(head) == 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0x8A


def torch_load_safe(path: str | os.PathLike[str], *, trust_pickle: bool) -> Any:
    """torch.load with weights_only, turning every failure into one clear UserError.

    Returns what the file holds (tensors, dicts, lists, numbers, strings...). Declared zip sizes
    are checked first. A file that needs arbitrary unpickling (a whole module saved with
    torch.save(model)) is refused unless `trust_pickle`, and the refusal names --trust-pickle.
    An ONNX file or a .pt2 program is named as such.
    """
    p = check_file(path)
    with open(p, "rb") as f:
        names = None
        if zipfile.is_zipfile(f):
            f.seek(0)
            with open_zip(f, p) as archive:
                names = archive.namelist()
        other = describe_other_format(p, names)
        if other is not None:
            raise UserError(other)
        f.seek(0)
        try:
            with quiet():
                return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            unsafe = _unsafe_globals(f, e)
            if unsafe is None and names is None and _starts_as_a_pickle(f):
                raise UserError(
                    f"{p}: a plain Python pickle, not a file torch.save wrote: ticketc reads "
                    "torch.save's files (a state dict, or a whole module with --trust-pickle)"
                ) from e
            if unsafe is None:
                raise UserError(f"{p}: not a readable torch file ({_reason(e)})") from e
            refusal = e
        except Exception as e:  # noqa: BLE001 - weights_only unpickling of bad bytes fails many ways
            raise UserError(
                f"{p}: not a torch file, or truncated/corrupted ({first_line(e)})"
            ) from e
        if not trust_pickle:
            raise UserError(
                f"{p} holds pickled Python objects{unsafe}: loading it runs code from the file, "
                f"so it is refused. Pass {TRUST_FLAG} if you trust its source, or save a state "
                "dict and use --arch"
            ) from refusal
        f.seek(0)
        current_folder_on_path()  # the classes it names, found as --arch finds them
        try:
            return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - arbitrary unpickling can raise anything
            raise UserError(f"{p}: could not unpickle ({type(e).__name__}: {first_line(e)})") from e


def _unsafe_globals(f: IO[bytes], error: pickle.UnpicklingError) -> str | None:
    """` (e.g. subprocess.run)` when the weights_only unpickler refused Python objects; None when
    it failed on corrupt bytes instead."""
    f.seek(0)
    try:
        with quiet():
            found = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file cannot be scanned: ask the error
        named = re.findall(r"GLOBAL ([\w.]+)", str(error))
        if "unsupported global" not in str(error).lower():
            return None
        return f" ({', '.join(named[:3])})" if named else ""
    return f" ({', '.join(found[:3])})" if found else None


def _reason(e: BaseException) -> str:
    """What torch's weights_only unpickler says, without its long preamble."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker) :]
    boilerplate = ("Weights only load failed", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(boilerplate)] or lines
    return lines[0][:300] if lines else type(e).__name__


def load_bytes_weights_only(data: bytes, path: Path, entry: str) -> Any:
    """torch.load of a torch file nested in an archive, weights_only; UserError otherwise."""
    buffer = io.BytesIO(data)
    if zipfile.is_zipfile(buffer):
        buffer.seek(0)
        with zipfile.ZipFile(buffer) as nested:
            check_zip_sizes(nested, len(data), Path(f"{path}:{entry}"))
    buffer.seek(0)
    try:
        with quiet():
            return torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _unsafe_globals(buffer, e) is not None:
            raise UserError(
                f"{path}: entry {entry!r} holds pickled Python objects: loading it runs code "
                f"from the file, so it is refused. Pass {TRUST_FLAG} if you trust its source"
            ) from e
        raise UserError(f"{path}: corrupt entry {entry!r} ({_reason(e)})") from e
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: corrupt entry {entry!r} ({first_line(e)})") from e


def load_tensor_dict(path: str | os.PathLike[str], what: str = "file") -> dict[str, torch.Tensor]:
    """A torch file that must hold a dict of name -> tensor (state dicts, masks); weights_only."""
    obj = torch_load_safe(path, trust_pickle=False)
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise UserError(f"{what} {path} must hold a dict of name -> tensor")
    return obj


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Parse a JSON file; a missing, unreadable or malformed one is a UserError naming it."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UserError(f"{what} {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {p}: cannot read ({first_line(e)})") from e
    return parse_json(text, f"{what} {p}")


def parse_json(text: str | bytes, where: str) -> Any:
    """json.loads; malformed or absurdly nested text is a UserError naming `where`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{where}: not valid JSON ({first_line(e)})") from e


def current_folder_on_path() -> None:
    """Put the current folder first on sys.path unless it is there already ('' or its path)."""
    cwd = os.getcwd()
    if any(entry in ("", cwd) or os.path.abspath(entry) == cwd for entry in sys.path):
        return
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()
