"""`ticketc pack`: pruned weights as sparse safetensors; `unpack` and `load_packed` restore them.

    result = ticketc.pack.pack("llama-pruned/", "llama-packed/")   # lossless by default
    model = ticketc.load_packed("llama-packed/")                     # the transformers model
    ticketc.pack.unpack("llama-packed/", "llama-dense/")             # dense safetensors again

Each tensor is stored in the smallest exact layout for its zeros (ticketc.pack.codec: Rice-coded
gaps or a bitmask as in the compact codec, or N:M group codes), values lossless in the tensor's
own dtype unless `values` asks for fp16 / int8 / int4. The directory layout is in
ticketc.pack.store; a sparsity card (ticketc.card) is written beside the weights. Sources are
read one tensor at a time and shards written as they fill, so a model is never held twice.
Nothing is pickled: safetensors and JSON only.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketc.atomic import atomic_dir
from ticketc.card import Card, LayerRecord, card_stem, write_card
from ticketc.errors import UserError
from ticketc.pack.codec import VALUES, decode, encode
from ticketc.pack.records import layer_record
from ticketc.pack.source import Source, open_source
from ticketc.pack.store import INDEX_NAME, PackedReader, ShardWriter, is_pack_file, is_packed_dir

__all__ = [
    "VALUES",
    "PackConfig",
    "PackResult",
    "load_packed",
    "pack",
    "read_packed",
    "unpack",
]

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of "5GB" / "500MB" / "64KiB" / 1000 (units as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"size {text!r} is not a number of bytes like 5GB or 500MB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


@dataclass(frozen=True)
class PackConfig:
    """values: "lossless" (each tensor's own dtype, bit for bit) | "fp16" | "int8" | "int4".
    max_shard_size: packed bytes per shard ("5GB", or an int). keep_zero_signs: also store
    which zeros are -0.0 (one bit per zero) so unpacked files are identical to the bit."""

    values: str = "lossless"
    max_shard_size: str | int = "5GB"
    keep_zero_signs: bool = False

    def __post_init__(self) -> None:
        if self.values not in VALUES:
            raise ValueError(f"values {self.values!r} is not one of {', '.join(VALUES)}")
        if parse_size(self.max_shard_size) <= 0:
            raise ValueError(f"max_shard_size must be positive, got {self.max_shard_size!r}")


@dataclass
class PackResult:
    path: Path
    files: list[Path]  # the packed weight shards
    card: Card
    card_files: tuple[Path, Path]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "files": {f.name: f.stat().st_size for f in self.files},
            "card": [str(p) for p in self.card_files],
            "seconds": round(self.seconds, 3),
            "totals": self.card.totals,
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------- output dirs
def _copy_extras(source_dir: Path, names: list[Path], dst: Path, skip: set[str]) -> None:
    for rel in names:
        if str(rel) in skip:
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_dir / rel, dst / rel)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------- pack
def _same(a: torch.Tensor, b: torch.Tensor, *, signs: bool) -> bool:
    """Bit-identical, except that any zero equals any zero unless `signs`."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    if torch.equal(a.view(bits), b.view(bits)):
        return True
    if signs:
        return False
    # equal values with NaNs alike, then bit-identical wherever the value is not zero
    return bool(((a.view(bits) == b.view(bits)) | ((a == 0) & (b == 0))).all())


def _layout_record(source: Source, names: dict[str, list[str]]) -> dict[str, Any]:
    """How the source laid its weights out, for unpack: file -> metadata and tensor names."""
    return {
        "kind": source.kind,
        "description": source.description,
        "path": str(source.path),
        "files": {
            f: {"metadata": source.file_metadata(f), "names": names.get(f, [])}
            for f in source.files
        },
        "index_metadata": source.index_metadata,
        "aliases": source.aliases,
    }


def _module_types(source: Source, notes: list[str]) -> dict[str, str] | None:
    if source.module_types is None:
        return None
    try:
        return source.module_types()
    except UserError as e:
        notes.append(f"no planned speed-ups: {e}")
        return None


def pack(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: PackConfig | None = None,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    mask_path: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
) -> PackResult:
    """Pack MODEL (a Hugging Face directory, a .safetensors file, or any model file
    ticketc.load_model reads with `arch` / `trust_pickle` / `mask_path`) into `out_dir`.

    Every tensor is decoded again before it is written and must equal its source bit for bit
    (lossless; zeros' signs only with keep_zero_signs) or lie within its value type's error
    bound (lossy). Raises UserError for unreadable input, a model directory that needs
    trust_remote_code, an existing non-empty `out_dir`, or a tensor a lossy type cannot hold;
    nothing is left at `out_dir` then.
    """
    config = config or PackConfig()
    start = time.perf_counter()
    source = open_source(
        model,
        arch=arch,
        trust_pickle=trust_pickle,
        mask_path=mask_path,
        trust_remote_code=trust_remote_code,
    )
    notes = list(source.notes)
    module_types = _module_types(source, notes)
    out = Path(out_dir)
    records: list[LayerRecord] = []
    negative_zeros = 0
    names: dict[str, list[str]] = {}
    with atomic_dir(out) as tmp:
        writer = ShardWriter(
            tmp, parse_size(config.max_shard_size), config.values, config.keep_zero_signs
        )
        for file, name, tensor in source.tensors():
            names.setdefault(file, []).append(name)
            try:
                encoded = encode(tensor, config.values, keep_zero_signs=config.keep_zero_signs)
            except UserError as e:
                raise UserError(f"{name}: {e}") from e
            decoded = decode(encoded)
            if encoded.values == "lossless" and not _same(
                decoded, tensor, signs=config.keep_zero_signs
            ):
                raise UserError(
                    f"{name}: decoding does not restore the tensor (a bug): nothing written"
                )
            if encoded.layout != "dense":
                negative_zeros += int(((tensor == 0) & torch.signbit(tensor)).sum())
            writer.add(name, encoded)
            records.append(layer_record(name, tensor, encoded, decoded, module_types))
        files = writer.close({"values": config.values, "source": _layout_record(source, names)})
        if source.config is not None:
            _write_json(tmp / "config.json", source.config)
        if source.directory is not None:
            _copy_extras(source.directory, source.extra_files, tmp, {"config.json"})
        if negative_zeros and not config.keep_zero_signs:
            notes.append(
                f"{negative_zeros:,} pruned weights were -0.0 and unpack as +0.0 (equal values; "
                "--keep-zero-signs stores the signs too)"
            )
        card = _card(out, source, records, files, config, notes)
        card_files = write_card(card, card_stem(tmp))
    final = [out / f.name for f in files]
    paths = tuple(out / p.name for p in card_files)
    assert len(paths) == 2
    return PackResult(out, final, card, (paths[0], paths[1]), time.perf_counter() - start, notes)


def _card(
    out: Path,
    source: Source,
    records: list[LayerRecord],
    files: list[Path],
    config: PackConfig,
    notes: list[str],
) -> Card:
    on_disk = source.weight_bytes()
    if on_disk is not None:
        reference = (source.description, on_disk)
    else:
        reference = ("dense tensors", sum(r.dense_bytes for r in records))
    speedups = [r.speedup for r in records if r.speedup is not None]
    if not speedups:
        ticketc_line = "no layer ticketc compile runs sparse was found (see the table's notes)"
    elif max(speedups) <= 1.0:
        ticketc_line = (
            "`ticketc compile` would keep every layer dense: sparse kernels are predicted no "
            "faster for these shapes (cost model, CPU fp32 batch 1)"
        )
    else:
        ticketc_line = (
            "`ticketc compile` (after load_packed) runs the planned sparse layers: predicted "
            f"up to {max(speedups):.2f}x a layer vs dense (cost model, CPU fp32 batch 1)"
        )
    return Card(
        artifact=str(out),
        kind=f"packed safetensors ({config.values} values)",
        source=str(source.path),
        layers=records,
        files={f.name: f.stat().st_size for f in files},
        reference=reference,
        runtimes={
            "transformers / PyTorch (load_packed)": "size on disk only: weights are decoded to "
            "dense tensors at load",
            "onnxruntime (ticketc export)": "size only: the file decodes its weights at session "
            "creation",
            "ticketc runtime": ticketc_line,
        },
        notes=notes,
    )


# ------------------------------------------------------------------------------- read back
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
    """The dense file a source weight file is written back as (always safetensors)."""
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
        _write_json(
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
        _write_json(tmp / "config.json", checkpoint.dense_config)
        _copy_extras(src, checkpoint.extra_files(), tmp, {"config.json"})
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
        _copy_extras(src, [p for p in extras if not p.name.startswith(".")], tmp, skip)
    return [out / p.name for p in written]
