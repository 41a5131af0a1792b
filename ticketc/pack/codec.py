"""One tensor in packed form: where its nonzeros are (positions) and what they are (values).

Positions are coded as in ticketc's compact codec: Golomb-Rice coded index gaps
(ticketc.formats.rice, within a few percent of the mask's entropy) or a bitmask (numel bits,
little-endian, smaller from ~30 % density up); or, when every group of M weights keeps at most
N, as N:M group codes (ticketc.pack.nm). The smallest exact layout wins (ticketc.pack.positions).
Values are stored for every *entry* (the nonzeros, plus for N:M the exact zeros of groups that
keep fewer than N) as

- "lossless": the tensor's own dtype, bit for bit (fp32, fp16, bf16, fp64);
- "fp16": float16 (lossy for wider types);
- "int8": symmetric int8, one fp16 scale per row shape[0], rounded up so that no code clips
  (every value within half a scale step);
- "int4": a 16-entry fp16 k-means codebook (Deep Compression, Han et al. 2016), two codes per
  byte: with h = ceil(entries / 2), byte k holds entry k in its low nibble and entry k + h in
  its high one, as the compact codec lays them out.

Zeros outside the entries decode to +0.0. A tensor may hold -0.0 there (magnitude pruning
multiplies negative weights by 0); equal as values, the sign bits differ. `keep_zero_signs`
stores those sign bits too (one bit per zero), for files identical to the bit.

Lossy values are checked against the quantiser's own bound before anything is written: a
decoded weight further from its source than its value type allows is a bug, not a report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ticketc.errors import UserError
from ticketc.formats import quantize
from ticketc.formats.compact_positions import mask_entropy_bits
from ticketc.formats.quantize import FP16_MAX, assign_nearest, kmeans_1d
from ticketc.pack.nm import NMPositions, parse_layout
from ticketc.pack.positions import MaskPositions, Positions, position_streams, smallest_positions

__all__ = [
    "SPARSE_DTYPES",
    "VALUES",
    "Encoded",
    "count_nonzero",
    "decode",
    "encode",
    "entropy_bound_bytes",
    "entry_values",
    "int8_scales",
    "positions_of",
    "value_bits",
    "value_error_bound",
]

VALUES = ("lossless", "fp16", "int8", "int4")  # "lossless": stored in the tensor's own dtype
# dtypes whose zeros are packed; others (integers, bool, fp8) are stored as they are
SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CODEBOOK_SIZE = 16


@dataclass(frozen=True, eq=False)
class Encoded:
    """A tensor as stored. `streams` maps a stream name to its array:

    - "positions" (uint8: the rice unary stream, plus "remainders" uint8 [k, ceil(entries / 8)],
      or the bitmask) or "codes" (N:M: uint8 / uint16) — absent for a dense tensor;
    - "values": entries in the value type (a torch tensor for lossless and fp16: bf16 has no
      numpy dtype), or the whole tensor, flattened, when dense;
    - "scale" (int8) / "codebook" (int4): fp16 side information;
    - "zero_signs": packed bits, one per zero outside the entries (keep_zero_signs only).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str  # "dense" | "rice" | "bitmask" | "N:M" | "N:M@0"
    values: str  # one of VALUES ("lossless" for dense tensors)
    nnz: int  # nonzeros of the source; -1 when not known (read back from a file)
    entries: int
    streams: dict[str, np.ndarray | torch.Tensor] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored stream."""
        return sum(_nbytes(a) for a in self.streams.values())

    @property
    def dense_nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _nbytes(a: np.ndarray | torch.Tensor) -> int:
    if isinstance(a, torch.Tensor):
        return a.numel() * a.element_size()
    return int(a.nbytes)


def value_bits(kind: str, dtype: torch.dtype) -> int:
    return {"lossless": 8 * dtype.itemsize, "fp16": 16, "int8": 8, "int4": 4}[kind]


def entropy_bound_bytes(numel: int, nnz: int, bits: int, side_bytes: int = 0) -> float:
    """The size floor of a sparse tensor: mask entropy + nnz values of `bits` each + side info."""
    return (mask_entropy_bits(numel, nnz) + nnz * bits) / 8 + side_bytes


# ------------------------------------------------------------------------------- encode
def encode(
    tensor: torch.Tensor, values: str = "lossless", *, keep_zero_signs: bool = False
) -> Encoded:
    """Store `tensor` in the smallest exact layout for its zeros, values as `values`.

    Tensors of other dtypes than SPARSE_DTYPES, or without zeros, or that would not get smaller
    stay dense (and lossless whatever `values` says). Raises UserError when a lossy value type
    cannot hold the tensor (NaN / Inf, or fp16 overflow).
    """
    if values not in VALUES:
        raise ValueError(f"values={values!r} is not one of {VALUES}")
    tensor = tensor.detach().cpu()
    shape, dtype = tuple(tensor.shape), tensor.dtype
    if dtype not in SPARSE_DTYPES or tensor.ndim == 0 or tensor.numel() == 0:
        return _dense(tensor)
    flat = tensor.reshape(-1)
    keep = (flat != 0).numpy()  # NaN != 0: NaNs are entries, stored as they are
    nnz = int(keep.sum())
    if nnz == keep.size:
        return _dense(tensor)
    if values in ("int8", "int4") and quantize.is_vector_like(shape):
        values = "lossless"  # biases and norms stay exact, as in export
    bits = value_bits(values, dtype)
    positions = smallest_positions(keep, shape, bits)
    entries = positions.linear_indices()
    stored = positions.nbytes + (len(entries) * bits + 7) // 8
    if stored >= tensor.numel() * dtype.itemsize:
        return _dense(tensor)
    index = torch.from_numpy(entries)
    streams = position_streams(positions)
    streams.update(_encode_values(flat[index], entries, shape, values))
    if keep_zero_signs:
        streams["zero_signs"] = _zero_signs(flat, entries)
    encoded = Encoded(shape, dtype, positions.kind, values, nnz, len(entries), streams)
    if values != "lossless":
        _check_lossy(tensor, encoded)
    return encoded


def count_nonzero(tensor: torch.Tensor) -> int:
    """Nonzeros of any dtype (fp8 has no count_nonzero kernel: counted in float32)."""
    if tensor.is_floating_point() and tensor.dtype not in SPARSE_DTYPES:
        tensor = tensor.to(torch.float32)
    return int(tensor.count_nonzero()) if tensor.numel() else 0


def _dense(tensor: torch.Tensor) -> Encoded:
    nnz = count_nonzero(tensor)
    return Encoded(
        tuple(tensor.shape),
        tensor.dtype,
        "dense",
        "lossless",
        nnz,
        tensor.numel(),
        {"values": tensor.reshape(-1).contiguous()},
    )


def _rows(entries: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return entries // max(1, math.prod(shape[1:]))


def _encode_values(
    entry_values: torch.Tensor, entries: np.ndarray, shape: tuple[int, ...], kind: str
) -> dict[str, np.ndarray | torch.Tensor]:
    if kind == "lossless":
        return {"values": entry_values.contiguous()}
    x = entry_values.to(torch.float64).numpy()
    if x.size and not np.isfinite(x).all():
        raise UserError("holds NaN or Inf values, which lossy --values cannot store")
    if kind == "fp16":
        if x.size and float(np.abs(x).max()) > FP16_MAX:
            raise UserError(f"holds values beyond fp16's range (|w| > {FP16_MAX:g})")
        return {"values": torch.from_numpy(x.astype(np.float16))}
    if kind == "int8":
        rows = _rows(entries, shape)
        absmax = np.zeros(shape[0])
        np.maximum.at(absmax, rows, np.abs(x))
        scale = int8_scales(absmax)
        s = scale.astype(np.float64)[rows]
        codes = np.rint(np.divide(x, s, out=np.zeros_like(x), where=s > 0))
        return {"values": codes.astype(np.int8), "scale": scale}
    # int4: Deep Compression's shared weights, with 0.0 reserved when an entry must decode to 0.
    has_zero = bool((x == 0).any())
    nonzero = x[x != 0]
    centroids = kmeans_1d(nonzero, _CODEBOOK_SIZE - 1 if has_zero else _CODEBOOK_SIZE)
    if has_zero:
        centroids = np.append(centroids, 0.0)
    codebook = np.unique(centroids.astype(np.float16))
    if codebook.size == 0:
        codebook = np.zeros(1, dtype=np.float16)
    codebook = np.pad(codebook, (0, _CODEBOOK_SIZE - codebook.size), mode="edge")
    codes = assign_nearest(x, codebook.astype(np.float64)).astype(np.uint8)
    codes = np.append(codes, np.uint8(0)) if codes.size & 1 else codes
    half = codes.size // 2
    return {"values": (codes[:half] | (codes[half:] << 4)).astype(np.uint8), "codebook": codebook}


def int8_scales(absmax: np.ndarray) -> np.ndarray:
    """`ticketc.formats.quantize.int8_scales` (fp16 scales absmax / 127 rounded up: every value
    decodes within half a scale of itself); UserError when a scale exceeds fp16."""
    exact_max = float(np.max(absmax)) if np.size(absmax) else 0.0
    if exact_max / 127.0 > FP16_MAX:
        raise UserError(f"holds values too large for int8 with fp16 scales (|w| = {exact_max:g})")
    return quantize.int8_scales(absmax)


def _zero_signs(flat: torch.Tensor, entries: np.ndarray) -> np.ndarray:
    """Sign bits of the elements outside the entries (all zeros), packed little-endian."""
    outside = np.ones(flat.numel(), dtype=bool)
    outside[entries] = False
    return np.packbits(torch.signbit(flat).numpy()[outside], bitorder="little")


# ------------------------------------------------------------------------------- decode
def positions_of(encoded: Encoded) -> Positions:
    """The position layout of a sparse `encoded`, checked (ValueError when broken)."""
    s = encoded.streams
    parsed = parse_layout(encoded.layout)
    if parsed is not None:
        n, m, axis = parsed
        codes = s["codes"]
        assert isinstance(codes, np.ndarray)
        nm = NMPositions(encoded.shape, n, m, codes, axis)
        nm.check()
        if nm.entries != encoded.entries:
            raise ValueError(
                f"{nm.kind} codes hold {nm.entries} entries, expected {encoded.entries}"
            )
        return nm
    positions, remainders = s["positions"], s.get("remainders")
    assert isinstance(positions, np.ndarray)
    assert remainders is None or isinstance(remainders, np.ndarray)
    mask = MaskPositions(encoded.layout, encoded.numel, positions, remainders)
    mask.check(encoded.entries)
    return mask


def entry_values(encoded: Encoded, entries: np.ndarray) -> torch.Tensor:
    """Entry values as stored ("lossless": the tensor's dtype) or dequantised (float32)."""
    s, count = encoded.streams, encoded.entries
    values = s["values"]
    if encoded.values == "lossless":
        assert isinstance(values, torch.Tensor)
        return values
    if encoded.values == "fp16":
        assert isinstance(values, torch.Tensor)
        return values.to(torch.float32)
    assert isinstance(values, np.ndarray)
    if encoded.values == "int8":
        scale = s["scale"]
        assert isinstance(scale, np.ndarray)
        rows = _rows(entries, encoded.shape)
        return torch.from_numpy(values.astype(np.float32) * scale.astype(np.float32)[rows])
    codebook = s["codebook"]
    assert isinstance(codebook, np.ndarray)
    codes = np.concatenate([values & 0x0F, values >> 4])[:count]
    return torch.from_numpy(codebook.astype(np.float32)[codes])


def decode(encoded: Encoded) -> torch.Tensor:
    """The dense tensor, in its original dtype. Raises ValueError on inconsistent streams."""
    if encoded.layout == "dense":
        dense = encoded.streams["values"]
        assert isinstance(dense, torch.Tensor)
        return dense.reshape(encoded.shape)
    _check_streams(encoded)
    entries = positions_of(encoded).linear_indices()
    values = entry_values(encoded, entries)
    flat = torch.zeros(encoded.numel, dtype=encoded.dtype)
    flat[torch.from_numpy(entries)] = values.to(encoded.dtype)
    signs = encoded.streams.get("zero_signs")
    if signs is not None:
        assert isinstance(signs, np.ndarray)
        outside = np.ones(encoded.numel, dtype=bool)
        outside[entries] = False
        where = np.flatnonzero(outside)
        negative = np.unpackbits(signs, count=where.size, bitorder="little").astype(bool)
        flat[torch.from_numpy(where[negative])] = -0.0
    return flat.reshape(encoded.shape)


def _check_streams(encoded: Encoded) -> None:
    s, count = encoded.streams, encoded.entries
    values = s.get("values")
    expected = (count + 1) // 2 if encoded.values == "int4" else count
    length = values.numel() if isinstance(values, torch.Tensor) else getattr(values, "size", -1)
    if length != expected:
        raise ValueError(f"{encoded.values} values hold {length} entries, expected {expected}")
    if encoded.values == "int8" and getattr(s.get("scale"), "shape", None) != (encoded.shape[0],):
        raise ValueError(f"int8 scale must have {encoded.shape[0]} rows")
    if encoded.values == "int4" and getattr(s.get("codebook"), "shape", None) != (16,):
        raise ValueError("int4 codebook must have 16 entries")


# ------------------------------------------------------------------------------- checks
def value_error_bound(source: np.ndarray, encoded: Encoded, entries: np.ndarray) -> np.ndarray:
    """Per entry: the largest |decoded - source| the value type allows (float64).

    fp16: half an ulp (2^-11 relative; 2^-25 absolute among subnormals). int8: half a step of
    the row's scale (scales round up, so nothing clips). int4: the distance to the nearest
    codebook entry (decoding must pick the nearest). A 1e-6 relative slack covers float32
    arithmetic in the decoder.
    """
    ax = np.abs(source)
    if encoded.values == "fp16":
        bound = np.maximum(ax * 2.0**-11, 2.0**-25)
    elif encoded.values == "int8":
        scale = encoded.streams["scale"]
        assert isinstance(scale, np.ndarray)
        s = scale.astype(np.float64)[_rows(entries, encoded.shape)]
        bound = s / 2
    elif encoded.values == "int4":
        book = encoded.streams["codebook"]
        assert isinstance(book, np.ndarray)
        bound = np.abs(source[:, None] - book.astype(np.float64)[None, :]).min(axis=1)
    else:
        bound = np.zeros_like(ax)
    return bound + 1e-6 * ax + 1e-12


def _check_lossy(tensor: torch.Tensor, encoded: Encoded) -> None:
    entries = positions_of(encoded).linear_indices()
    source = tensor.reshape(-1)[torch.from_numpy(entries)].to(torch.float64).numpy()
    decoded = entry_values(encoded, entries).to(torch.float64).numpy()
    excess = np.abs(decoded - source) - value_error_bound(source, encoded, entries)
    if excess.size and float(excess.max()) > 0:
        worst = int(np.argmax(excess))
        raise UserError(
            f"{encoded.values} decoding of entry {int(entries[worst])} gives "
            f"{decoded[worst]!r} for {source[worst]!r}, beyond the value type's bound "
            "(an encoder bug): nothing written"
        )
