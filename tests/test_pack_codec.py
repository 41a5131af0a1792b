"""The packed tensor codec: exact round trips, the smallest layout, lossy bounds, corrupt input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ticketc.errors import UserError
from ticketc.formats.compact_positions import mask_entropy_bits
from ticketc.pack.codec import decode, encode, value_error_bound
from ticketc.pack.nm import NMPositions, detect_nm, parse_layout
from ticketc.pack.pattern import sparsity_pattern
from ticketc.pack.shard_index import format_index, parse_index, stream_shapes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _sparse(shape, density, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return (w * (torch.rand(shape, generator=g) < density)).to(dtype)


def _n_m(shape, n, m, *, axis=-1, seed=0, dtype=torch.float32):
    """Keep the n largest of every m along `axis` (-1, or 0 of a matrix)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    view = w if axis == -1 else w.T
    groups = view.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.abs().topk(n, dim=1).indices, True)
    out = (groups * keep).reshape(view.shape)
    return out if axis == -1 else out.T.contiguous()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (4, 3, 5, 5)])
def test_lossless_round_trip_is_exact(dtype, density, shape):
    w = _sparse(shape, density, dtype)
    encoded = encode(w)
    back = decode(encoded)
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(back, w)
    assert encoded.nbytes <= w.numel() * w.element_size()


def test_nan_inf_and_extremes_survive_lossless():
    w = torch.zeros(64)
    w[3], w[10], w[11], w[40] = float("nan"), float("inf"), -float("inf"), 3.4e38
    back = decode(encode(w))
    assert torch.equal(_bits(back), _bits(w))


def test_zero_signs_are_kept_only_when_asked():
    w = _sparse((40, 40), 0.2)
    w = torch.where(w == 0, -torch.randint(0, 2, w.shape).float() * 0.0, w)
    assert torch.signbit(w[w == 0]).any()
    plain = decode(encode(w))
    assert torch.equal(plain, w) and not torch.equal(_bits(plain), _bits(w))
    assert not torch.signbit(plain[plain == 0]).any()
    exact = decode(encode(w, keep_zero_signs=True))
    assert torch.equal(_bits(exact), _bits(w))


@pytest.mark.parametrize("density", [0.02, 0.1, 0.3, 0.5])
def test_unstructured_positions_are_within_a_few_percent_of_the_entropy(density):
    w = _sparse((256, 512), density, torch.float16)
    encoded = encode(w)
    nnz = int(w.count_nonzero())
    position_bytes = encoded.nbytes - 2 * nnz
    assert position_bytes <= 1.05 * mask_entropy_bits(w.numel(), nnz) / 8 + 64


@pytest.mark.parametrize(
    ("n", "m", "axis"), [(2, 4, -1), (1, 4, -1), (2, 8, -1), (4, 8, -1), (2, 4, 0), (4, 16, -1)]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_n_m_weights_are_stored_as_n_m(n, m, axis, dtype):
    w = _n_m((32, 64), n, m, axis=axis, dtype=dtype)
    encoded = encode(w)
    assert parse_layout(encoded.layout) == (n, m, axis)
    assert torch.equal(decode(encoded), w)
    codes = NMPositions.code_bytes(w.numel() // m, n, m)
    assert encoded.nbytes == codes + w.numel() * n // m * w.element_size()
    expected = f"{n}:{m}" + (" (along dim 0)" if axis == 0 else "")
    assert sparsity_pattern(w) == expected


def test_two_four_codes_cost_less_than_a_bitmask():
    w = _n_m((64, 128), 2, 4)
    encoded = encode(w)
    assert encoded.layout == "2:4"
    assert NMPositions.code_bytes(w.numel() // 4, 2, 4) * 8 <= 2.67 * w.numel() / 4 + 8
    assert encoded.nbytes < w.numel() // 8 + 4 * w.numel() // 2  # bitmask + the same values


def test_groups_that_keep_fewer_than_n_store_exact_zeros():
    w = _n_m((64, 64), 2, 4)
    w[0, :4] = torch.tensor([0.0, 1.5, 0.0, 0.0])  # one nonzero in this group
    w[1, :4] = 0.0  # none in this one
    encoded = encode(w)
    assert encoded.layout == "2:4"
    assert torch.equal(decode(encoded), w)


def test_every_2_of_4_pattern_round_trips():
    patterns = list(itertools.combinations(range(4), 2))
    keep = np.zeros((len(patterns), 4), dtype=bool)
    for i, p in enumerate(patterns):
        keep[i, list(p)] = True
    shape = (len(patterns), 4)
    nm = NMPositions.from_mask(keep.reshape(-1), shape, 2, 4)
    nm.check()
    assert np.array_equal(nm.linear_indices(), np.flatnonzero(keep))


def test_random_sparsity_does_not_pass_as_n_m():
    assert detect_nm((torch.rand(64, 64) < 0.1).numpy().reshape(-1), (64, 64)) is None
    assert sparsity_pattern(_sparse((64, 64), 0.1)) == "unstructured"


def test_block_pattern_is_reported():
    w = torch.zeros(64, 64)
    w[:16, 16:32] = torch.randn(16, 16)
    w[32:48, :16] = torch.randn(16, 16)
    assert sparsity_pattern(w) == "block(16x16)"
    assert sparsity_pattern(torch.randn(8, 8)) == "dense"


@pytest.mark.parametrize("values", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("maker", ["unstructured", "2:4"])
def test_lossy_values_are_within_their_bound(values, maker):
    w = _sparse((48, 64), 0.2) if maker == "unstructured" else _n_m((48, 64), 2, 4)
    encoded = encode(w, values)
    back = decode(encoded).double().reshape(-1)
    src = w.double().reshape(-1)
    nz = src != 0
    entries = np.flatnonzero(nz.numpy())
    bound = torch.from_numpy(value_error_bound(src.numpy()[entries], encoded, entries))
    assert bool(((back[nz] - src[nz]).abs() <= bound).all())
    assert bool((back[~nz] == 0).all())  # pruned weights stay exactly zero
    if values == "int8":  # half a step of the row's scale, and no clipping
        step = w.abs().amax(dim=1) / 127
        err = (decode(encoded) - w).abs().amax(dim=1)
        assert bool((err <= step / 2 * 1.01 + 1e-3 * step).all())


def test_lossy_values_refuse_what_they_cannot_hold():
    w = _sparse((16, 16), 0.3)
    w[0, 0] = 1e6
    with pytest.raises(UserError, match="fp16"):
        encode(w, "fp16")
    w[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        encode(w, "int8")


def test_dense_and_integer_tensors_stay_dense():
    assert encode(torch.randn(8, 8)).layout == "dense"
    ints = torch.tensor([0, 0, 0, 5, 0, 0])
    assert encode(ints).layout == "dense" and torch.equal(decode(encode(ints)), ints)
    assert encode(torch.tensor(0.0)).layout == "dense"


def test_index_lines_round_trip():
    index = {
        "model.layers.0.mlp.up_proj.weight": ["BF16", "rice", [128, 64], 800, 3, 410],
        "model.layers.0.mlp.down_proj.weight": ["BF16", "2:4", [64, 128], 4096],
        "a name with spaces": ["F32", "bitmask", [3, 3], 2],
        "scalar": ["F64", "dense", [], 1],
    }
    assert parse_index(format_index(index)) == index


def test_stream_shapes_match_what_the_encoder_writes():
    for w in (_sparse((20, 30), 0.1), _sparse((20, 30), 0.6), _n_m((20, 32), 2, 4)):
        for values in ("lossless", "int8", "int4"):
            encoded = encode(w, values)
            rice = None
            if encoded.layout == "rice":
                rice = (encoded.streams["remainders"].shape[0], encoded.streams["positions"].size)
            shapes = stream_shapes(
                "F32", encoded.layout, encoded.shape, encoded.entries, rice, values, False
            )
            got = {k: tuple(v.shape) for k, v in encoded.streams.items()}
            assert got == {s: shape for s, _, shape in shapes}
            assert math.prod(encoded.shape) == w.numel()


def test_corrupt_streams_are_refused():
    encoded = encode(_sparse((32, 32), 0.1))
    streams = dict(encoded.streams)
    streams["positions"] = streams["positions"][:-1]
    broken = type(encoded)(
        encoded.shape,
        encoded.dtype,
        encoded.layout,
        encoded.values,
        encoded.nnz,
        encoded.entries,
        streams,
    )
    with pytest.raises(ValueError):
        decode(broken)
    nm = encode(_n_m((8, 16), 2, 4))
    codes = nm.streams["codes"].copy()
    codes[0] = 255  # 6^3 = 216 is the largest valid byte
    broken = type(nm)(
        nm.shape, nm.dtype, nm.layout, nm.values, nm.nnz, nm.entries, {**nm.streams, "codes": codes}
    )
    with pytest.raises(ValueError, match="out of range"):
        decode(broken)


def test_every_dtype_packs_and_unpacks_without_transformers(tmp_path):
    """A .safetensors state dict of mixed dtypes: sparse floats packed, the rest kept."""
    from safetensors.torch import load_file, save_file

    from ticketc.pack import load_packed, pack, unpack

    state = {
        "w.bf16": _sparse((64, 96), 0.1, torch.bfloat16),
        "w.f64": _sparse((16, 16), 0.3, torch.float64),
        "w.24": _n_m((32, 64), 2, 4, dtype=torch.float16),
        "fp8": torch.randn(8, 8).to(torch.float8_e4m3fn),
        "ids": torch.tensor([0, 0, 7, 0]),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(0.0),
        "zeros": torch.zeros(100),
    }
    save_file(state, str(tmp_path / "m.safetensors"))
    result = pack(tmp_path / "m.safetensors", tmp_path / "packed")
    layouts = {r.name: r.layout for r in result.card.layers}
    assert layouts["w.bf16"] == "rice" and layouts["w.24"] == "2:4"
    assert layouts["fp8"] == layouts["ids"] == layouts["flags"] == "dense"
    back = load_packed(tmp_path / "packed")
    assert isinstance(back, dict) and back.keys() == state.keys()
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype, name
        if tensor.dtype == torch.float8_e4m3fn:  # no torch.equal kernel: compare the bytes
            assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8))
        else:
            assert torch.equal(back[name], tensor), name
    unpack(tmp_path / "packed", tmp_path / "dense")
    dense = load_file(str(tmp_path / "dense" / "m.safetensors"))
    assert dense.keys() == state.keys()


@pytest.mark.parametrize("values", ["int8", "int4"])
def test_integer_values_leave_bias_like_tensors_exact(values):
    bias = _sparse((64,), 0.3, torch.float32)
    weight = _sparse((64, 32), 0.3, torch.float32)
    assert encode(bias, values).values == "lossless"
    assert encode(weight, values).values == values
