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

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ticketc.atomic import atomic_dir
from ticketc.card import Card, LayerRecord, card_stem, write_card
from ticketc.errors import UserError
from ticketc.pack.codec import VALUES, decode, encode
from ticketc.pack.records import layer_record
from ticketc.pack.source import Source, copy_extras, open_source, write_json
from ticketc.pack.store import ShardWriter
from ticketc.pack.unpack import load_packed, read_packed, unpack

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
            write_json(tmp / "config.json", source.config)
        if source.directory is not None:
            copy_extras(source.directory, source.extra_files, tmp, {"config.json"})
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
