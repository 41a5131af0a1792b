"""Reading a packed directory back: `read_packed`, `load_packed`, and `unpack` to dense files.

model = ticketc.load_packed("llama-packed/")                  # the transformers model
ticketc.pack.unpack("llama-packed/", "llama-dense/")          # dense safetensors again
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import Any

import torch
from torch import nn

from ticketc.atomic import atomic_dir
from ticketc.errors import UserError
from ticketc.pack.source import copy_extras, write_json
from ticketc.pack.store import INDEX_NAME, PackedReader, is_pack_file, is_packed_dir


def read_packed(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict of a packed directory, every tensor decoded to its original dtype
    (aliases of a shared tensor are the same tensor object)."""
    reader = PackedReader(path)
    state = dict(reader.tensors())
    aliases = reader.metadata.get("source", {}).get("aliases") or {}
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def load_packed(
    path: str | os.PathLike[str], *, state_dict: bool = False, trust_remote_code: bool = False
) -> nn.Module | dict[str, torch.Tensor]:
    """The transformers model of a packed directory that holds a config.json (built with the
    Auto classes, in eval mode), else — or with state_dict=True — its state dict.

    Raises UserError for a directory ticketc did not pack, a corrupt shard, or a model whose
    config.json needs code from the directory without trust_remote_code.
    """
    from ticketc.hf.checkpoint import read_config, remote_code

    directory = Path(path)
    if not is_packed_dir(directory):
        raise UserError(f"{directory}: not a ticketc packed directory (no {INDEX_NAME})")
    has_config = (directory / "config.json").is_file()
    config = read_config(directory) if has_config and not state_dict else None
    if config is not None:
        reason = remote_code(config)
        if reason is not None and not trust_remote_code:
            raise UserError(
                f"{directory}: {reason}; ticketc runs no code from a model directory unless "
                "you pass --trust-remote-code"
            )
    state = read_packed(directory)
    if config is None:
        return state
    from ticketc.hf.model import build_model

    model, _ = build_model(directory, config, state, trust_remote_code=trust_remote_code)
    return model


# ------------------------------------------------------------------------------- unpack
def _dense_name(file: str) -> str:
    """The dense file a source weight file is written back as (always safetensors); UserError
    unless the index names a plain file name (a path would write outside the output folder)."""
    plain = isinstance(file, str) and PurePath(file).name == file and file not in ("", ".", "..")
    if not plain or "\\" in file or "\0" in file:
        raise UserError(f"the packed index names weight file {file!r}, which is no plain file name")
    if file.endswith(".safetensors"):
        return file
    match = re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", file)
    return f"model{match.group(1) or ''}.safetensors" if match else f"{file}.safetensors"


def _write_dense(
    out: Path,
    groups: Iterator[tuple[str, Iterator[tuple[str, torch.Tensor]]]],
    metadata_of: Callable[[str], dict[str, str]],
    index_metadata: dict[str, Any] | None,
) -> list[Path]:
    """Write each (file, its tensors) as dense safetensors, one file in memory at a time, plus
    model.safetensors.index.json when there are several files or the source had an index."""
    from safetensors.torch import save_file

    written: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for file, items in groups:
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in items:
            shared = any(tensor is other for other in tensors.values())
            tensors[name] = tensor.clone() if shared else tensor  # safetensors shares nothing
        name = _dense_name(file)
        save_file(tensors, str(out / name), metadata=metadata_of(file))
        written.append(out / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(written) > 1 or index_metadata is not None:
        meta = {**(index_metadata or {}), "total_size": total}
        write_json(
            out / "model.safetensors.index.json", {"metadata": meta, "weight_map": weight_map}
        )
    return written


def _pt_metadata(meta: dict[str, str] | None) -> dict[str, str]:
    """A dense file's safetensors metadata: the source's, with transformers' format "pt"."""
    return {**(meta or {}), "format": "pt"}


def unpack(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    trust_remote_code: bool = False,
) -> list[Path]:
    """Write the dense safetensors of a packed directory (or of a compressed-tensors
    sparse-bitmask / sparse-24-bitmask directory) into `out_dir`, laid out as the source's
    weight files (pytorch_model*.bin become model*.safetensors), the other files beside.

    Returns the dense weight files. Raises UserError as `pack` does; nothing is left at
    `out_dir` on failure.
    """
    src, out = Path(path), Path(out_dir)
    if is_packed_dir(src):
        return _unpack_packed(src, out)
    from ticketc.hf.checkpoint import is_hf_directory, open_checkpoint

    if not is_hf_directory(src):
        raise UserError(f"{src}: neither a ticketc packed directory nor a Hugging Face directory")
    checkpoint = open_checkpoint(src, trust_remote_code=trust_remote_code)
    if checkpoint.legacy is None or checkpoint.legacy.format == "dense":
        raise UserError(f"{src}: its weights are not compressed; nothing to unpack")
    by_file = itertools.groupby(checkpoint.tensors(), key=lambda item: item[0])
    groups = ((file, ((n, t) for _, n, t in items)) for file, items in by_file)
    with atomic_dir(out) as tmp:
        written = _write_dense(
            tmp,
            groups,
            lambda f: _pt_metadata(checkpoint.file_metadata(f)),
            checkpoint.index_metadata,
        )
        write_json(tmp / "config.json", checkpoint.dense_config)
        copy_extras(src, checkpoint.extra_files(), tmp, {"config.json"})
    return [out / p.name for p in written]


def _unpack_packed(src: Path, out: Path) -> list[Path]:
    reader = PackedReader(src)
    layout = reader.metadata.get("source") or {}
    files: dict[str, dict[str, Any]] = layout.get("files") or {}
    aliases: dict[str, str] = layout.get("aliases") or {}
    stored = set(reader.names())
    for file, info in files.items():
        missing = [n for n in info.get("names", []) if n not in stored]
        if missing:
            raise UserError(f"{src}: {file}'s tensor {missing[0]!r} is not in the packed files")

    def tensors_of(file: str) -> Iterator[tuple[str, torch.Tensor]]:
        names = files[file].get("names", [])
        for name in names:
            yield name, reader.tensor(name)
        for alias, name in aliases.items():
            if name in names:
                yield alias, reader.tensor(name)

    groups = ((file, tensors_of(file)) for file in files)
    skip = {p.name for p in src.iterdir() if is_pack_file(p.name)}
    extras = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    with atomic_dir(out) as tmp:
        written = _write_dense(
            tmp,
            groups,
            lambda f: _pt_metadata(files[f].get("metadata")),
            layout.get("index_metadata"),
        )
        copy_extras(src, [p for p in extras if not p.name.startswith(".")], tmp, skip)
    return [out / p.name for p in written]
