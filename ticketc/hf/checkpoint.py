"""A Hugging Face checkpoint directory: config.json, its weight files, and nothing run from it.

Weight files are found the way transformers finds them: `model.safetensors.index.json` (shards),
`model.safetensors`, `pytorch_model.bin.index.json` (shards), `pytorch_model.bin`, in that
order. Pickled `.bin` files are read with torch.load(weights_only=True). Tensors are read one
file at a time, so a sharded checkpoint is never held whole; a legacy compressed-tensors sparse
checkpoint (ticketc.hf.compressed_tensors) is decompressed tensor by tensor on the way.

Code from the directory (config.json `auto_map`, custom modeling files, a `model_type`
transformers does not know) is never imported here: `open_checkpoint` refuses such a directory
unless the caller passes trust_remote_code=True (the CLI's --trust-remote-code).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ticketc.errors import UserError, first_line
from ticketc.hf import compressed_tensors as ct

__all__ = [
    "WEIGHT_SUFFIXES",
    "HFCheckpoint",
    "is_hf_directory",
    "open_checkpoint",
    "remote_code",
]

CONFIG_NAME = "config.json"
# Files that hold weights (never copied beside packed weights; the packed files replace them).
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".onnx_data",
    ".tflite",
)
_CANDIDATES = (
    ("model.safetensors.index.json", "safetensors"),
    ("model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "torch"),
    ("pytorch_model.bin", "torch"),
)


def is_hf_directory(path: str | os.PathLike[str]) -> bool:
    """A directory with a config.json (whether its weights are readable is checked later)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not a readable JSON config ({first_line(e)})") from e
    if not isinstance(config, dict):
        raise UserError(f"{path}: holds a {type(config).__name__}, not a JSON object")
    _check_config_types(config, path)
    return config


def _check_config_types(config: dict[str, Any], path: Path) -> None:
    """UserError unless the keys that choose the model's class have the types transformers
    writes: `model_type` a string, `architectures` a list of strings, `auto_map` an object."""
    model_type, architectures = config.get("model_type"), config.get("architectures")
    auto_map = config.get("auto_map")
    if model_type is not None and not isinstance(model_type, str):
        raise UserError(f"{path}: model_type is a {type(model_type).__name__}, not a string")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise UserError(f"{path}: architectures is not a list of class names")
    if auto_map is not None and not isinstance(auto_map, dict):
        raise UserError(f"{path}: auto_map is a {type(auto_map).__name__}, not a JSON object")


def remote_code(config: dict[str, Any]) -> str | None:
    """Why building this model would run code from its directory, or None.

    `auto_map` names modules in the directory; an `attn_implementation` (or any other
    `*_implementation`, in any sub-config) of the form "org/repo" is a Hub kernel transformers
    downloads and runs; a `model_type` transformers does not know can only be built from such
    code. (transformers, given auto_map without trust_remote_code, silently
    builds its own class for a known model_type instead: not what the checkpoint asks for.)
    """
    auto_map = config.get("auto_map")
    if auto_map:
        named = sorted(str(v) for value in dict(auto_map).values() for v in _as_list(value) if v)
        return f"config.json auto_map names code from the directory ({', '.join(named)})"
    kernel = _hub_kernel(config)
    if kernel:
        return f"config.json names a kernel that transformers fetches from the Hub ({kernel})"
    model_type = config.get("model_type")
    if model_type is None:
        return None
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:  # without transformers nothing is built; reading tensors runs no code
        return None
    if model_type not in CONFIG_MAPPING:
        return f"model_type {model_type!r} is not built into transformers"
    return None


def _hub_kernel(config: Any) -> str | None:
    """The first `*_implementation` value of the config or its sub-configs naming a Hub repo."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if str(key).endswith("_implementation") and isinstance(value, str) and "/" in value:
                    return value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


@dataclass
class HFCheckpoint:
    """A checked Hugging Face directory. `files`: weight files (relative names) in order."""

    path: Path
    config: dict[str, Any]
    files: list[str]
    file_kind: str  # "safetensors" | "torch"
    index_metadata: dict[str, Any] | None = None  # the source index JSON's "metadata"
    legacy: ct.LegacySparsity | None = None
    trust_remote_code: bool = False
    _names: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @property
    def dense_config(self) -> dict[str, Any]:
        """config.json as it should read beside dense (or ticketc-packed) weights."""
        return ct.strip_config(self.config) if self.legacy else self.config

    def names(self, file: str) -> list[str]:
        """Tensor names stored in `file`, in file order."""
        if file not in self._names:
            if self.file_kind == "safetensors":
                with safetensors_file(self.path / file) as f:
                    self._names[file] = list(f.keys())
            else:
                self._names[file] = list(self._load_torch(file))
        return self._names[file]

    def _load_torch(self, file: str) -> dict[str, torch.Tensor]:
        from ticketc.safe_load import torch_load_safe

        obj = torch_load_safe(self.path / file, trust_pickle=False)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UserError(f"{self.path / file}: not a state dict of tensors")
        return obj

    def _file_tensors(self, file: str) -> Iterator[tuple[str, torch.Tensor]]:
        if self.file_kind == "torch":
            yield from self._load_torch(file).items()
            return
        with safetensors_file(self.path / file) as f:
            names = f.keys()
            for name in names:
                yield name, f.get_tensor(name)

    def file_metadata(self, file: str) -> dict[str, str]:
        """The safetensors header metadata of `file` ({} for torch files)."""
        if self.file_kind != "safetensors":
            return {}
        with safetensors_file(self.path / file) as f:
            return dict(f.metadata() or {})

    def tensors(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(weight file, tensor name, dense tensor), file by file; legacy weights decompressed
        (each under its dense name, attributed to the file holding its values)."""
        if self.legacy is None or self.legacy.format == "dense":
            for file in self.files:
                for name, tensor in self._file_tensors(file):
                    yield file, name, tensor
            return
        located = {name: file for file in self.files for name in self.names(file)}
        groups, _ = ct.find_groups(list(located), self.legacy.format)
        by_values = {g.parts["compressed"]: g for g in groups.values()}
        parts_of_groups = {p for g in groups.values() for p in g.parts.values()}
        for file in self.files:
            for name, tensor in self._file_tensors(file):
                group = by_values.get(name)
                if group is not None:
                    parts = {
                        part: tensor if stored == name else self._read(located[stored], stored)
                        for part, stored in group.parts.items()
                    }
                    yield file, group.name, ct.decompress(parts, self.legacy.format, group.name)
                elif name not in parts_of_groups:
                    yield file, name, tensor

    def _read(self, file: str, name: str) -> torch.Tensor:
        if self.file_kind == "torch":
            return self._load_torch(file)[name]
        with safetensors_file(self.path / file) as f:
            return f.get_tensor(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor for _, name, tensor in self.tensors()}

    def extra_files(self) -> list[Path]:
        """Files other than weights and their index (config, tokenizer, ...), relative paths."""
        out = []
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or name.endswith(WEIGHT_SUFFIXES):
                    continue
                if name.endswith(".index.json") and name[: -len(".index.json")].endswith(
                    WEIGHT_SUFFIXES
                ):
                    continue
                out.append((Path(root) / name).relative_to(self.path))
        return out


@contextlib.contextmanager
def safetensors_file(path: Path) -> Iterator[Any]:
    """safe_open(path) whose errors on a bad file become one UserError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except UserError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e


def open_checkpoint(
    path: str | os.PathLike[str], *, trust_remote_code: bool = False
) -> HFCheckpoint:
    """Check a Hugging Face directory and find its weights; nothing is loaded yet.

    Raises UserError when config.json is missing or unreadable, when building the model would run
    code from the directory and trust_remote_code is False (the message names
    --trust-remote-code), when config.json names a compressed-tensors format ticketc does not
    read, or when no weight file is found.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory")
    if not (directory / CONFIG_NAME).is_file():
        raise UserError(f"{directory}: no config.json, so not a Hugging Face model directory")
    config = read_config(directory)
    reason = remote_code(config)
    if reason is not None and not trust_remote_code:
        raise UserError(
            f"{directory}: {reason}; ticketc runs no code from a model directory unless you "
            "pass --trust-remote-code"
        )
    legacy = ct.legacy_sparsity(config)
    for index_name, kind in _CANDIDATES:
        candidate = directory / index_name
        if not candidate.is_file():
            continue
        if not index_name.endswith(".index.json"):
            return HFCheckpoint(
                directory, config, [index_name], kind, None, legacy, trust_remote_code
            )
        files, meta = _read_index(candidate)
        return HFCheckpoint(directory, config, files, kind, meta, legacy, trust_remote_code)
    found = sorted(p.name for p in directory.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    raise UserError(
        f"{directory}: no model.safetensors, pytorch_model.bin or their sharded index"
        + (f" (found {', '.join(found[:5])})" if found else "")
    )


def _read_index(index_path: Path) -> tuple[list[str], dict[str, Any] | None]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = dict(index["weight_map"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"{index_path}: not a readable weight index ({e})") from e
    files = sorted({str(f) for f in weight_map.values()})
    for file in files:
        if Path(file).name != file:
            raise UserError(f"{index_path}: shard {file!r} is not a file name in the directory")
        if not (index_path.parent / file).is_file():
            raise UserError(f"{index_path}: shard {file} is missing")
    meta = index.get("metadata")
    return files, dict(meta) if isinstance(meta, dict) else None
