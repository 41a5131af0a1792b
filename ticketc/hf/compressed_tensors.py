"""Checkpoints written by compressed-tensors' sparsity compressors, read back to dense tensors.

compressed-tensors (neuralmagic / vLLM) stored pruned Hugging Face checkpoints as
"sparse-bitmask" and "sparse-24-bitmask" until it deleted both compressors; the files are still
published, and ticketc reads them without the library. Layout, as its compressors wrote it:

- config.json names the format under `quantization_config.sparsity_config.format` (releases from
  0.7 on, with `quant_method: "compressed-tensors"`), `compression_config.sparsity_config.format`
  (0.4 - 0.6) or a top-level `sparsity_config.format` (the first, sparseml-era releases).
- A compressed weight W of shape [R, C] becomes, under a prefix P:
  `P.shape` (int, [2] for sparse-bitmask, [2, 1] for sparse-24-bitmask), `P.compressed` (the
  kept values in row-major order, in W's dtype: 1-D for sparse-bitmask, [R, C / 2] for
  sparse-24-bitmask), `P.bitmask` (uint8 [R, ceil(C / 8)]: the mask packed along the last
  dimension, little-endian bit order, numpy.packbits(axis=-1, bitorder="little")) and, for
  sparse-bitmask only, `P.row_offsets` (int64 [R]: where each row starts in `compressed`).
  Decoding is: dense = zeros(shape); dense[unpacked mask] = compressed.
- P is the module path ("model.layers.0.mlp.down_proj", weight name P + ".weight") from 0.8 on;
  releases 0.4 - 0.7 compressed *every* tensor under its full name (P = "x.weight", "x.bias").
  Either way the groups of one checkpoint are all of one kind, which tells them apart.
- The 2:4 compressor keeps the 2 largest of every 4 (zeros included when a group has fewer
  nonzeros), so its mask may mark zeros: they decode to zeros.

Quantized formats (int / float / pack-quantized, marlin-24) are not read: only sparsity.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ticketc.errors import UserError

__all__ = [
    "SPARSE_FORMATS",
    "CompressedGroup",
    "LegacySparsity",
    "decompress",
    "find_groups",
    "legacy_sparsity",
    "strip_config",
]

SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
PARTS = ("shape", "compressed", "bitmask", "row_offsets")
_CONFIG_KEYS = ("quantization_config", "compression_config")


@dataclass(frozen=True)
class LegacySparsity:
    format: str  # one of SPARSE_FORMATS, or "dense"
    where: str  # the config.json key that names it


def legacy_sparsity(config: dict[str, Any]) -> LegacySparsity | None:
    """The compressed-tensors sparsity format config.json names, or None when it names none.

    Raises UserError for compressed-tensors formats ticketc does not read (quantized ones, or an
    unknown sparsity format).
    """
    for key in _CONFIG_KEYS:
        section = config.get(key)
        if not isinstance(section, dict):
            continue
        is_ct = section.get("quant_method") == "compressed-tensors" or key == "compression_config"
        sparsity = section.get("sparsity_config")
        if is_ct and section.get("config_groups"):
            raise UserError(
                f"config.json {key} holds a compressed-tensors *quantized* checkpoint "
                f"(format {section.get('format')!r}); ticketc reads only its sparse formats "
                f"{', '.join(SPARSE_FORMATS)}"
            )
        if isinstance(sparsity, dict) and sparsity.get("format"):
            return _checked(str(sparsity["format"]), f"{key}.sparsity_config")
    top = config.get("sparsity_config")
    if isinstance(top, dict) and top.get("format"):
        return _checked(str(top["format"]), "sparsity_config")
    return None


def _checked(fmt: str, where: str) -> LegacySparsity:
    if fmt not in (*SPARSE_FORMATS, "dense"):
        raise UserError(
            f"config.json {where} names the compressed-tensors format {fmt!r}; ticketc reads "
            f"{', '.join(SPARSE_FORMATS)} (and dense)"
        )
    return LegacySparsity(fmt, where)


def strip_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json without its compressed-tensors entries, for the decompressed weights.

    Only unquantized compressed-tensors checkpoints get this far (legacy_sparsity refuses the
    others), so the whole compressed-tensors section goes: left in, it would make transformers
    look for the compressed-tensors library to "decompress" dense weights.
    """
    out = copy.deepcopy(config)
    out.pop("sparsity_config", None)
    out.pop("compression_config", None)
    section = out.get("quantization_config")
    if isinstance(section, dict) and section.get("quant_method") == "compressed-tensors":
        out.pop("quantization_config")
    return out


@dataclass(frozen=True)
class CompressedGroup:
    """The stored parts of one compressed weight: part name -> stored tensor name."""

    prefix: str
    parts: dict[str, str]
    name: str  # the dense tensor's name


def find_groups(names: list[str], fmt: str) -> tuple[dict[str, CompressedGroup], list[str]]:
    """(dense name -> group, names stored as they are) for the tensor names of a checkpoint."""
    prefixes = sorted({n[: -len(".bitmask")] for n in names if n.endswith(".bitmask")})
    present = set(names)
    # 0.4 - 0.7 wrote full tensor names as prefixes ("x.weight"), later releases module paths.
    full_names = any(p.endswith((".weight", ".bias")) for p in prefixes)
    groups: dict[str, CompressedGroup] = {}
    used: set[str] = set()
    required = ("shape", "compressed", "bitmask")
    for prefix in prefixes:
        parts = {part: f"{prefix}.{part}" for part in PARTS if f"{prefix}.{part}" in present}
        missing = [p for p in required if p not in parts]
        if missing:
            raise UserError(f"{fmt} weight {prefix!r} lacks its {', '.join(missing)} tensor(s)")
        name = prefix if full_names else f"{prefix}.weight"
        groups[name] = CompressedGroup(prefix, parts, name)
        used.update(parts.values())
    return groups, [n for n in names if n not in used]


def decompress(parts: dict[str, torch.Tensor], fmt: str, name: str) -> torch.Tensor:
    """The dense tensor from its stored parts (keys as PARTS); UserError when inconsistent."""
    try:
        shape = [int(s) for s in parts["shape"].reshape(-1).tolist()]
        values = parts["compressed"].reshape(-1)
        bitmask = parts["bitmask"]
        if not shape or any(s < 0 for s in shape):
            raise ValueError(f"bad shape {shape}")
        packed = bitmask.contiguous().view(torch.uint8).numpy()
        rows = int(np.prod(shape[:-1]))
        packed = packed.reshape(rows, -1)
        if packed.shape[1] != (shape[-1] + 7) // 8:
            raise ValueError(f"bitmask of {list(bitmask.shape)} for shape {shape}")
        mask = np.unpackbits(packed, axis=-1, count=shape[-1], bitorder="little").astype(bool)
        kept = int(mask.sum())
        if kept != values.numel():
            raise ValueError(f"bitmask marks {kept} entries, {values.numel()} values stored")
        if fmt == "sparse-24-bitmask" and len(shape) == 2 and kept * 2 != mask.size:
            raise ValueError(f"a 2:4 weight of {mask.size} elements keeps {kept}")
        offsets = parts.get("row_offsets")
        if offsets is not None and offsets.numel() == rows and rows > 1:
            counts = mask.reshape(rows, -1).sum(axis=1)
            expected = np.cumsum(counts) - counts
            if not np.array_equal(offsets.reshape(-1).numpy(), expected):
                raise ValueError("row_offsets disagree with the bitmask")
    except (ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{fmt} weight {name!r} is corrupt ({e})") from e
    dense = torch.zeros(int(np.prod(shape)), dtype=values.dtype)
    index = torch.from_numpy(np.flatnonzero(mask))
    if values.element_size() == 1 and values.is_floating_point():  # fp8: index_put via bytes
        dense.view(torch.uint8)[index] = values.view(torch.uint8)
    else:
        dense[index] = values
    return dense.reshape(shape)
