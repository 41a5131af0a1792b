"""The packed directory on disk: safetensors shards plus an index JSON, nothing pickled.

    OUT_DIR/
      sparse.safetensors                     (or sparse-00001-of-0000N.safetensors, ...)
      sparse.safetensors.index.json          weight_map: tensor name -> shard, and metadata
      config.json, tokenizer files, ...      copied from a Hugging Face source directory
      sparsity.card.md, sparsity.card.json   the sparsity card

The files follow safetensors' sharding convention (`weight_map` + `metadata.total_size`) under
their own stem, so transformers never mistakes a packed directory for a dense checkpoint.

Inside a shard the streams of every tensor (ticketc.pack.codec.Encoded) are concatenated per
dtype into a few *blob* tensors named `__ticketc__.<DTYPE>` (U8, I8, U16, F16, BF16, F32, ...):
a handful of header entries per shard instead of several per tensor, which matters for small
models. The shard's `__metadata__` holds

    "ticketc.pack": the index, one line per tensor in blob order:
                    "SHARED DTYPE LAYOUT SHAPE ENTRIES [K UNARY] SUFFIX"
    "values":       the value type of the sparse tensors ("lossless", "fp16", "int8", "int4")
    "zero_signs":   "1" when every sparse tensor stores its zero_signs stream

Names are front-coded: the tensor's name is the first SHARED characters of the previous line's
name followed by SUFFIX (the rest of the line: a name may hold spaces, not newlines). SHAPE is
"64x128" ("" -> "-" for a 0-d tensor); K and UNARY (the Rice parameter and the unary stream's
bytes) appear for layout "rice" only. For small models the header is a real share of the file
(BERT at 90 % fp16 with 64-wide layers: a third smaller than the same index as JSON objects).
Every other stream's length follows from these fields (`stream_shapes`), so a reader finds each
stream by summing lengths in index order and checks that the sums end exactly at each blob's
end. Streams of one tensor come in the order of STREAMS.
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
from ticketc.pack.codec import Encoded
from ticketc.pack.nm import NMPositions, parse_layout

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "PackedReader",
    "ShardWriter",
    "format_index",
    "is_pack_file",
    "is_packed_dir",
    "parse_index",
    "stream_shapes",
]

FORMAT = "ticketc-pack"
VERSION = 1
STEM = "sparse"
INDEX_NAME = f"{STEM}.safetensors.index.json"
BLOB_PREFIX = "__ticketc__."
META_KEY = "ticketc.pack"
STREAMS = ("positions", "remainders", "codes", "values", "scale", "codebook", "zero_signs")

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_VALUE_DTYPE = {"fp16": "F16", "int8": "I8", "int4": "U8"}
_PACK_FILE = re.compile(
    rf"{STEM}(-\d{{5}}-of-\d{{5}})?\.safetensors|{re.escape(INDEX_NAME)}|sparsity\.card\.(md|json)"
)


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype ("F16", "BF16", ...)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise UserError(f"cannot pack tensors of dtype {dtype}") from None


def shard_name(i: int, n: int) -> str:
    return f"{STEM}.safetensors" if n == 1 else f"{STEM}-{i + 1:05d}-of-{n:05d}.safetensors"


def is_pack_file(name: str) -> bool:
    """A file pack writes itself (shards, index, card), as opposed to one it copied."""
    return _PACK_FILE.fullmatch(name) is not None


def is_packed_dir(path: Path) -> bool:
    return path.is_dir() and (path / INDEX_NAME).is_file()


def stream_shapes(
    dtype: str,
    layout: str,
    shape: tuple[int, ...],
    entries: int,
    rice: tuple[int, int] | None,
    values: str,
    zero_signs: bool,
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(stream, blob dtype, shape) of every stream of one tensor, in STREAMS order."""
    numel = math.prod(shape)
    if layout == "dense":
        return [("values", dtype, (numel,))]
    out: list[tuple[str, str, tuple[int, ...]]] = []
    if layout == "bitmask":
        out.append(("positions", "U8", ((numel + 7) // 8,)))
    elif layout == "rice":
        if rice is None:
            raise ValueError("a rice tensor needs [k, unary bytes]")
        k, unary = rice
        out += [("positions", "U8", (unary,)), ("remainders", "U8", (k, (entries + 7) // 8))]
    elif (nm := parse_layout(layout)) is not None:
        n, m, _ = nm
        groups = numel // m
        out.append(("codes", "U8", (NMPositions.code_bytes(groups, n, m),)))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if values == "lossless":
        out.append(("values", dtype, (entries,)))
    else:
        count = (entries + 1) // 2 if values == "int4" else entries
        out.append(("values", _VALUE_DTYPE[values], (count,)))
    if values == "int8":
        out.append(("scale", "F16", (shape[0],)))
    if values == "int4":
        out.append(("codebook", "F16", (16,)))
    if zero_signs:
        out.append(("zero_signs", "U8", ((numel - entries + 7) // 8,)))
    return out


def _as_torch(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def _entry(encoded: Encoded) -> list[Any]:
    """The index fields of one tensor: [dtype, layout, shape, entries, *rice]."""
    entry: list[Any] = [dtype_name(encoded.dtype), encoded.layout, list(encoded.shape)]
    entry.append(encoded.entries)
    if encoded.layout == "rice":
        remainders, unary = encoded.streams["remainders"], encoded.streams["positions"]
        entry += [int(remainders.shape[0]), int(unary.shape[0])]
    return entry


def format_index(index: dict[str, list[Any]]) -> str:
    """The shard index as front-coded lines (see the module docstring)."""
    lines, previous = [], ""
    for name, (dtype, layout, shape, entries, *rice) in index.items():
        shared = len(os.path.commonprefix([previous, name]))
        dims = "x".join(str(d) for d in shape) or "-"
        fields = [shared, dtype, layout, dims, entries, *rice, name[shared:]]
        lines.append(" ".join(str(f) for f in fields))
        previous = name
    return "\n".join(lines)


def parse_index(text: str) -> dict[str, list[Any]]:
    """Inverse of format_index (ValueError on a malformed line)."""
    index: dict[str, list[Any]] = {}
    previous = ""
    for line in text.split("\n") if text else []:
        head = line.split(" ", 5)
        if len(head) < 6:
            raise ValueError(f"index line {line!r} has too few fields")
        shared, dtype, layout, dims, entries, rest = head
        rice: list[int] = []
        if layout == "rice":
            k, unary, rest = (rest.split(" ", 2) + ["", ""])[:3]
            rice = [int(k), int(unary)]
        if int(shared) > len(previous):
            raise ValueError(f"index line {line!r} shares more than the previous name")
        name = previous[: int(shared)] + rest
        shape = [] if dims == "-" else [int(d) for d in dims.split("x")]
        index[name] = [dtype, layout, shape, int(entries), *rice]
        previous = name
    return index


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
        entry = _entry(encoded)
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


@dataclass(frozen=True)
class _Located:
    """Where one tensor's streams lie in its shard's blobs."""

    dtype: str
    layout: str
    shape: tuple[int, ...]
    entries: int
    values: str
    streams: list[tuple[str, str, int, tuple[int, ...]]]  # stream, blob, offset, shape


def _locate(
    index: dict[str, Any], values: str, zero_signs: bool, blob_sizes: dict[str, int]
) -> dict[str, _Located]:
    """Offsets of every stream, from the lengths the index implies (ValueError when they do
    not add up to the blobs exactly)."""
    from ticketc.pack.codec import VALUES

    if values not in VALUES:
        raise ValueError(f"values {values!r} is not one of {VALUES}")
    offsets: dict[str, int] = {}
    out = {}
    for name, entry in index.items():
        dtype, layout, shape, entries = str(entry[0]), str(entry[1]), tuple(entry[2]), int(entry[3])
        if dtype not in _DTYPES or any(int(s) < 0 for s in shape) or entries < 0:
            raise ValueError(f"bad index entry for {name!r}: {entry}")
        rice = (int(entry[4]), int(entry[5])) if layout == "rice" else None
        kind = "lossless" if layout == "dense" else values
        streams = []
        for stream, blob, sshape in stream_shapes(
            dtype, layout, shape, entries, rice, kind, zero_signs and layout != "dense"
        ):
            start = offsets.get(blob, 0)
            streams.append((stream, blob, start, sshape))
            offsets[blob] = start + math.prod(sshape)
        out[name] = _Located(dtype, layout, shape, entries, kind, streams)
    for blob in set(offsets) | set(blob_sizes):
        if offsets.get(blob, 0) != blob_sizes.get(blob, 0):
            raise ValueError(
                f"blob {blob} holds {blob_sizes.get(blob, 0)} elements, the index "
                f"describes {offsets.get(blob, 0)}"
            )
    return out


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
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index_path}: unreadable packed index ({e})") from e
        if meta.get("format") != FORMAT:
            raise UserError(f"{index_path}: format {meta.get('format')!r} is not {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise UserError(
                f"{index_path}: packed format version {meta.get('version')!r}; this ticketc "
                f"reads version {VERSION}"
            )
        self.metadata: dict[str, Any] = meta
        self._located: dict[str, dict[str, _Located]] = {}
        for shard in sorted(set(self.weight_map.values())):
            if Path(shard).name != shard or not (self.directory / shard).is_file():
                raise UserError(f"{self.directory}: shard {shard!r} is missing")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _shard(self, shard: str) -> dict[str, _Located]:
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
                self._located[shard] = _locate(
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
            _DTYPES[located.dtype],
            located.layout,
            located.values,
            -1,
            located.entries,
            streams,
        )

    def tensor(self, name: str) -> torch.Tensor:
        """The dense tensor `name`, decoded to its original dtype."""
        from ticketc.pack.codec import decode

        encoded = self.encoded(name)
        try:
            return decode(encoded)
        except (ValueError, IndexError, RuntimeError) as e:
            raise UserError(f"{self.directory}: {name!r} is corrupt ({e})") from e

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.weight_map:
            yield name, self.tensor(name)
