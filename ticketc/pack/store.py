"""The packed directory on disk: safetensors shards plus an index JSON, nothing pickled.

    OUT_DIR/
      sparse.safetensors                     (or sparse-00001-of-0000N.safetensors, ...)
      sparse.safetensors.index.json          weight_map: tensor name -> shard, and metadata
      config.json, tokenizer files, ...      copied from a Hugging Face source directory
      sparsity.card.md, sparsity.card.json   the sparsity card

The files follow safetensors' sharding convention (`weight_map` + `metadata.total_size`) under
their own stem, so transformers never mistakes a packed directory for a dense checkpoint.

Inside a shard the streams of every tensor (ticketc.pack.codec.Encoded) are concatenated per
dtype into a few *blob* tensors, described by a compact index in the shard's metadata: that
format, and where each stream lies in the blobs, is ticketc.pack.shard_index.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ticketc.errors import UserError
from ticketc.pack.codec import Encoded, decode
from ticketc.pack.shard_index import (
    BLOB_PREFIX,
    DTYPES,
    META_KEY,
    Located,
    dtype_name,
    format_index,
    index_entry,
    locate_streams,
    parse_index,
    stream_shapes,
)

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "PackedReader",
    "ShardWriter",
    "is_pack_file",
    "is_packed_dir",
]

FORMAT = "ticketc-pack"
VERSION = 1
STEM = "sparse"
INDEX_NAME = f"{STEM}.safetensors.index.json"

_PACK_FILE = re.compile(
    rf"{STEM}(-\d{{5}}-of-\d{{5}})?\.safetensors|{re.escape(INDEX_NAME)}|sparsity\.card\.(md|json)"
)


def shard_name(i: int, n: int) -> str:
    return f"{STEM}.safetensors" if n == 1 else f"{STEM}-{i + 1:05d}-of-{n:05d}.safetensors"


def is_pack_file(name: str) -> bool:
    """A file pack writes itself (shards, index, card), as opposed to one it copied."""
    return _PACK_FILE.fullmatch(name) is not None


def is_packed_dir(path: Path) -> bool:
    return path.is_dir() and (path / INDEX_NAME).is_file()


def _as_torch(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


@dataclass
class _Shard:
    blobs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    index: dict[str, list[Any]] = field(default_factory=dict)
    nbytes: int = 0


class ShardWriter:
    """Collects encoded tensors into shards of about `max_shard_bytes` and writes them.

    Only the current shard's (packed) bytes are held in memory; each shard is written as soon as
    it is full. `close()` names the shards by their final count and writes the index. All sparse
    tensors must use the value type `values`; `zero_signs`: they all carry that stream.
    """

    def __init__(
        self, directory: Path, max_shard_bytes: int, values: str, zero_signs: bool = False
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.values = values
        self.zero_signs = zero_signs
        self._shard = _Shard()
        self._written: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, encoded: Encoded) -> None:
        shard = self._shard
        if shard.index and shard.nbytes + encoded.nbytes > self.max_shard_bytes:
            self._flush()
            shard = self._shard
        if name in shard.index or any(name in names for _, names in self._written):
            raise UserError(f"tensor {name!r} appears twice")
        if "\n" in name or not name:
            raise UserError(f"cannot pack a tensor named {name!r} (empty, or a newline in it)")
        entry = index_entry(encoded)
        rice = (entry[4], entry[5]) if encoded.layout == "rice" else None
        values = "lossless" if encoded.layout == "dense" else self.values
        if values != encoded.values:
            raise ValueError(f"{name}: {encoded.values} values in a shard of {values} values")
        zero_signs = self.zero_signs and encoded.layout != "dense"
        expected = stream_shapes(
            entry[0], encoded.layout, encoded.shape, encoded.entries, rice, values, zero_signs
        )
        for stream, blob, shape in expected:
            array = encoded.streams.get(stream)
            if array is None:
                raise ValueError(f"{name}: stream {stream} is missing")
            t = _as_torch(array)
            if dtype_name(t.dtype) != blob or tuple(t.shape) != shape:
                raise ValueError(
                    f"{name}: stream {stream} is {t.dtype} {list(t.shape)}, expected {blob} {shape}"
                )
            shard.blobs.setdefault(blob, []).append(t.reshape(-1))
        extra = set(encoded.streams) - {s for s, _, _ in expected}
        if extra:
            raise ValueError(f"{name}: unexpected streams {sorted(extra)}")
        shard.index[name] = entry
        shard.nbytes += encoded.nbytes
        self.total_size += encoded.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        shard = self._shard
        tensors = {
            BLOB_PREFIX + blob: torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
            for blob, parts in shard.blobs.items()
        }
        path = self.directory / f".shard-{len(self._written):05d}.tmp"
        metadata = {
            "format": FORMAT,
            "values": self.values,
            "zero_signs": "1" if self.zero_signs else "0",
            META_KEY: format_index(shard.index),
        }
        save_file(tensors, str(path), metadata=metadata)
        self._written.append((path, list(shard.index)))
        self._shard = _Shard()

    def close(self, metadata: dict[str, Any]) -> list[Path]:
        """Write the last shard and the index (its `metadata` extended with format and size)."""
        if self._shard.index or not self._written:
            self._flush()
        n = len(self._written)
        weight_map: dict[str, str] = {}
        paths = []
        for i, (tmp, names) in enumerate(self._written):
            final = self.directory / shard_name(i, n)
            os.replace(tmp, final)
            paths.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {
            "metadata": {
                "format": FORMAT,
                "version": VERSION,
                "total_size": self.total_size,
                **metadata,
            },
            "weight_map": weight_map,
        }
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return paths


class PackedReader:
    """Reads tensors back from a packed directory, one at a time (blobs are sliced lazily)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        if not index_path.is_file():
            raise UserError(f"{self.directory}: not a ticketc packed directory (no {INDEX_NAME})")
        try:
            index = json.loads(index_path.read_text())
            meta = dict(index["metadata"])
            self.weight_map: dict[str, str] = dict(index["weight_map"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise UserError(f"{index_path}: unreadable packed index ({e})") from e
        if meta.get("format") != FORMAT:
            raise UserError(f"{index_path}: format {meta.get('format')!r} is not {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise UserError(
                f"{index_path}: packed format version {meta.get('version')!r}; this ticketc "
                f"reads version {VERSION}"
            )
        self.metadata: dict[str, Any] = meta
        self._located: dict[str, dict[str, Located]] = {}
        for shard in sorted(set(self.weight_map.values())):
            if Path(shard).name != shard or not (self.directory / shard).is_file():
                raise UserError(f"{self.directory}: shard {shard!r} is missing")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _shard(self, shard: str) -> dict[str, Located]:
        if shard not in self._located:
            from ticketc.hf.checkpoint import safetensors_file

            path = self.directory / shard
            with safetensors_file(path) as f:
                meta = f.metadata() or {}
                sizes = {
                    key[len(BLOB_PREFIX) :]: math.prod(f.get_slice(key).get_shape())
                    for key in f.keys()  # noqa: SIM118 - safe_open has no __iter__
                }
            try:
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r} is not {FORMAT!r}")
                index = parse_index(meta[META_KEY])
                self._located[shard] = locate_streams(
                    index, meta["values"], meta.get("zero_signs") == "1", sizes
                )
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise UserError(f"{path}: not a readable packed shard ({e})") from e
        return self._located[shard]

    def encoded(self, name: str) -> Encoded:
        """The stored form of `name` (KeyError when absent; UserError when corrupt)."""
        from ticketc.hf.checkpoint import safetensors_file

        shard = self.weight_map[name]
        located = self._shard(shard).get(name)
        if located is None:
            raise UserError(f"{self.directory / shard}: holds no tensor {name!r}")
        streams: dict[str, np.ndarray | torch.Tensor] = {}
        with safetensors_file(self.directory / shard) as f:
            for stream, blob, offset, shape in located.streams:
                part = f.get_slice(BLOB_PREFIX + blob)[offset : offset + math.prod(shape)]
                part = part.reshape(shape)
                # values of the tensor's own dtype (bf16 has no numpy dtype) and fp16 values
                # stay torch tensors; the other streams are numpy arrays
                torch_values = stream == "values" and located.values in ("lossless", "fp16")
                streams[stream] = part if torch_values else part.numpy()
        return Encoded(
            located.shape,
            DTYPES[located.dtype],
            located.layout,
            located.values,
            -1,
            located.entries,
            streams,
        )

    def tensor(self, name: str) -> torch.Tensor:
        """The dense tensor `name`, decoded to its original dtype."""
        encoded = self.encoded(name)
        try:
            return decode(encoded)
        except (ValueError, IndexError, RuntimeError) as e:
            raise UserError(f"{self.directory}: {name!r} is corrupt ({e})") from e

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.weight_map:
            yield name, self.tensor(name)
