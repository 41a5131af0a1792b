"""Round trips and invariants of the sparse formats (CSR, BSR, tiled, Compact)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.models_for_tests import masked_weight
from ticketc.formats import (
    BSR,
    CSR,
    POSITIONS_KINDS,
    VALUES_KINDS,
    Compact,
    Tiled,
    block_occupancy,
    mask_entropy_bits,
)
from ticketc.formats.compact_values import VALUE_BITS
from ticketc.formats.decode_check import check_decoded
from ticketc.formats.quantize import kmeans_1d

FAST = settings(max_examples=40, deadline=None)


@st.composite
def masked_weights(draw: st.DrawFn, max_dim: int = 24) -> torch.Tensor:
    """A masked weight: 1-D, 2-D (incl. 1xN, Nx1) or conv 4-D; densities 0, 1 or random;
    some rows forced empty."""
    rank = draw(st.sampled_from([1, 2, 2, 2, 4]))
    if rank == 4:
        shape = (draw(st.integers(1, 6)), draw(st.integers(1, 4)), 3, 3)
    else:
        shape = tuple(draw(st.integers(1, max_dim)) for _ in range(rank))
    density = draw(st.sampled_from([0.0, 1.0, 0.05, 0.3, 0.7]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(shape, generator=gen)
    mask = torch.rand(shape, generator=gen) < density
    if rank > 1 and draw(st.booleans()):
        mask[:: max(2, shape[0] // 2)] = False  # empty rows
    return dense * mask


def _bytes(*arrays: np.ndarray | torch.Tensor | None) -> int:
    total = 0
    for a in arrays:
        if isinstance(a, torch.Tensor):
            total += a.numel() * a.element_size()
        elif a is not None:
            total += a.size * a.itemsize
    return total


# --------------------------------------------------------------------------- CSR
@FAST
@given(masked_weights(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_csr_round_trip(dense, dtype):
    dense = dense.to(dtype)
    csr = CSR.from_dense(dense)
    csr.check()
    assert torch.equal(csr.to_dense(), dense)
    assert csr.to_dense().dtype == dtype
    assert csr.nnz == int(dense.count_nonzero())
    assert csr.values.dtype == dtype
    assert csr.nbytes == _bytes(csr.crow_indices, csr.col_indices, csr.values, csr.row_order)
    if csr.nnz and dense.dim() == 2:
        assert torch.equal(csr.to_torch().to_dense(), dense)


def test_csr_index_dtypes_follow_the_column_count():
    narrow = CSR.from_dense(torch.eye(3, 32768))
    wide = CSR.from_dense(torch.eye(3, 32769))
    assert narrow.col_indices.dtype == torch.int16
    assert wide.col_indices.dtype == torch.int32
    assert narrow.crow_indices.dtype == torch.int32
    # Consumers widen as they need; the last column index survives int16.
    last = CSR.from_dense(torch.zeros(1, 32768).index_fill_(1, torch.tensor([32767]), 1.0))
    assert int(last.col_indices.int()[0]) == 32767


def test_csr_views_conv_weights_as_rows_by_fan_in():
    w = torch.randn(4, 3, 3, 3) * (torch.rand(4, 3, 3, 3) < 0.4)
    csr = CSR.from_dense(w)
    assert (csr.rows, csr.cols) == (4, 27)
    assert torch.equal(csr.to_dense(), w)


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("crow_indices", torch.tensor([0, 2, 1, 3], dtype=torch.int32), "non-decreasing"),
        ("crow_indices", torch.tensor([1, 1, 2, 3], dtype=torch.int32), r"crow_indices\[0\]"),
        ("col_indices", torch.tensor([0, 9, 1], dtype=torch.int16), "out of range"),
        ("crow_indices", torch.tensor([0, 1, 3], dtype=torch.int32), "rows \\+ 1"),
    ],
)
def test_csr_check_names_the_broken_invariant(field, bad, message):
    csr = CSR.from_dense(torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]]))
    broken = CSR(**{**csr.__dict__, field: bad})
    with pytest.raises(ValueError, match=message):
        broken.check()


def test_csr_check_rejects_unsorted_columns_within_a_row():
    csr = CSR.from_dense(torch.tensor([[1.0, 2.0, 0], [0, 0, 3.0]]))
    broken = CSR(
        csr.shape, csr.crow_indices, torch.tensor([1, 0, 2], dtype=torch.int16), csr.values
    )
    with pytest.raises(ValueError, match="strictly increasing"):
        broken.check()


def test_csr_rejects_non_tensors():
    with pytest.raises(TypeError, match="list"):
        CSR.from_dense([[1.0]])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- BSR
@FAST
@given(masked_weights(), st.sampled_from([1, 2, 3, 4, 8]))
def test_bsr_round_trip_pads_and_crops(dense, blocksize):
    bsr = BSR.from_dense(dense, blocksize)
    bsr.check()
    assert torch.equal(bsr.to_dense(), dense)
    assert bsr.values.shape[1:] == (blocksize, blocksize)
    assert bsr.nnz == int(dense.count_nonzero())
    assert bsr.nbytes == _bytes(bsr.crow_indices, bsr.col_indices, bsr.values)
    grid = bsr.block_grid
    assert bsr.nblocks == round(block_occupancy(dense, blocksize) * grid[0] * grid[1])


def test_block_occupancy_counts_blocks_with_a_nonzero():
    w = torch.zeros(8, 8)
    assert block_occupancy(w, 4) == 0.0
    w[0, 0] = 1.0
    w[5, 7] = 1.0
    assert block_occupancy(w, 4) == 0.5
    assert block_occupancy(torch.ones(5, 5), 4) == 1.0  # padding blocks count as blocks
    assert block_occupancy(w, 8) == 1.0
    with pytest.raises(ValueError, match="blocksize"):
        block_occupancy(w, 0)


def test_bsr_matches_torch_layout():
    w = torch.randn(6, 8) * (torch.rand(6, 8) < 0.3)
    ours = BSR.from_dense(w, 2)
    ref = w.to_sparse_bsr((2, 2))
    assert torch.equal(ours.crow_indices.long(), ref.crow_indices())
    assert torch.equal(ours.col_indices.long(), ref.col_indices())
    assert torch.equal(ours.values, ref.values())


def test_bsr_check_rejects_nonzeros_in_padding():
    bsr = BSR.from_dense(torch.ones(3, 3), 2)
    values = bsr.values.clone()
    values[-1, 1, 1] = 5.0  # row 3 / col 3 lie outside the 3x3 shape
    with pytest.raises(ValueError, match="padding"):
        BSR(bsr.shape, 2, bsr.crow_indices, bsr.col_indices, values).check()


# --------------------------------------------------------------------------- tiled
@FAST
@given(masked_weights(), st.sampled_from([16, 32, 64]))
def test_tiled_round_trip(dense, tile_m):
    tiled = Tiled.from_dense(dense, tile_m=tile_m)
    tiled.check()
    assert torch.equal(tiled.to_dense(), dense)
    assert tiled.nnz == int(dense.count_nonzero())
    assert tiled.bitmaps.shape == (tiled.tile_col.numel(), tile_m)
    assert tiled.nbytes == _bytes(*tiled.buffers().values())


@pytest.mark.parametrize(
    ("field", "change", "message"),
    [
        ("tile_offsets", lambda t: t + 1, "tile_offsets"),
        ("row_offsets", lambda t: t.flip(1), "row_offsets"),
        ("tile_col", lambda t: t + 5, "out of range"),
        ("values", lambda t: t[:-1], "bitmaps mark"),
    ],
)
def test_tiled_check_names_the_broken_invariant(field, change, message):
    tiled = Tiled.from_dense(torch.randn(20, 70) * (torch.rand(20, 70) < 0.5), tile_m=16)
    broken = dataclasses.replace(tiled, **{field: change(getattr(tiled, field))})
    with pytest.raises(ValueError, match=message):
        broken.check()


def test_inspect_counts_the_bytes_the_cpu_runtime_stores():
    from ticketc.compile.modules import SparseLinear
    from ticketc.inspect import layer_stats

    w = torch.randn(30, 200) * (torch.rand(30, 200) < 0.1)
    layer = SparseLinear.from_dense(w, None, "csr", device="cpu")
    stored = sum(t.numel() * t.element_size() for t in layer.buffers())
    assert layer.col_indices.dtype == torch.int32
    assert layer_stats("w", w).csr_bytes == stored


# ------------------------------------------------- the arrays as the ops take them, all formats


@pytest.mark.parametrize("density", [0.0, 0.001, 0.036, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (37, 70)])
def test_pack_csr_round_trips_and_sorts_rows(shape, density):
    w = masked_weight(*shape, density)
    p = CSR.from_dense(w).buffers()
    assert torch.equal(CSR.from_buffers(shape, p).to_dense(), w)
    assert p["crow_indices"].dtype == torch.int32 and p["row_order"].dtype == torch.int32
    assert p["col_indices"].dtype == torch.int16
    lengths = (p["crow_indices"][1:] - p["crow_indices"][:-1])[p["row_order"].long()]
    assert (lengths[:-1] >= lengths[1:]).all(), "row_order must list longest rows first"
    assert sorted(p["row_order"].tolist()) == list(range(shape[0]))
    assert p["values"].numel() == int((w != 0).sum())


def test_pack_csr_index_dtype_follows_k():
    assert CSR.from_dense(torch.ones(2, 32768)).col_indices.dtype == torch.int16
    wide = torch.zeros(1, 32769)
    wide[0, -1] = 1.0
    p = CSR.from_dense(wide).buffers()
    assert p["col_indices"].dtype == torch.int32 and p["col_indices"].item() == 32768
    assert CSR.from_dense(torch.ones(2, 3), index_dtype=torch.int32).col_indices.dtype == (
        torch.int32
    )


def test_pack_keeps_explicit_zeros_under_a_mask_and_flattens_conv_weights():
    w = torch.zeros(4, 2, 3, 3)
    mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    mask[1, 0, 0, 0] = mask[3, 1, 2, 2] = True
    p = CSR.from_dense(w, mask=mask).buffers()
    assert p["values"].numel() == 2
    assert p["crow_indices"].tolist() == [0, 0, 1, 1, 2]
    assert p["col_indices"].tolist() == [0, 17]
    assert Tiled.from_dense(w, mask=mask).values.numel() == 2
    assert BSR.from_dense(w, 2, mask=mask).col_indices.numel() == 2


@pytest.mark.parametrize("blocksize", [1, 3, 16])
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0])
def test_pack_bsr_round_trips(blocksize, density):
    w = masked_weight(37, 70, density)
    p = BSR.from_dense(w, blocksize).buffers()
    assert torch.equal(BSR.from_buffers(w.shape, p).to_dense(), w)
    assert p["values"].shape[1:] == (blocksize, blocksize)
    mb = -(-37 // blocksize)
    assert p["crow_indices"].numel() == mb + 1
    nonzero_blocks = {(r // blocksize, c // blocksize) for r, c in (w != 0).nonzero().tolist()}
    assert p["values"].shape[0] == len(nonzero_blocks)


@pytest.mark.parametrize("tile_m", [16, 32, 64])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_pack_tiled_round_trips_and_offsets_locate_rows(tile_m, density):
    w = masked_weight(70, 100, density)
    p = Tiled.from_dense(w, tile_m=tile_m).buffers()
    assert torch.equal(Tiled.from_buffers(w.shape, p).to_dense(), w)
    assert p["bitmaps"].shape == p["row_offsets"].shape == (p["tile_col"].numel(), tile_m)
    # Decode every tile row through the offsets, as the kernel does, and compare.
    rows = torch.repeat_interleave(
        torch.arange(p["tile_crow"].numel() - 1), (p["tile_crow"][1:] - p["tile_crow"][:-1]).long()
    )
    for t in range(p["tile_col"].numel()):
        for i in range(tile_m):
            word = int(p["bitmaps"][t, i]) & 0xFFFFFFFF
            cols = [j for j in range(32) if word >> j & 1]
            start = int(p["tile_offsets"][t]) + int(p["row_offsets"][t, i])
            r = int(rows[t]) * tile_m + i
            got = p["values"][start : start + len(cols)]
            want = w[r, [32 * int(p["tile_col"][t]) + j for j in cols]] if cols else got
            assert torch.equal(got, want)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 80),
    density=st.sampled_from([0.0, 0.02, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_all_formats_round_trip(m, k, density, seed):
    w = masked_weight(m, k, density, seed)
    for stored in (CSR.from_dense(w), BSR.from_dense(w, 16), Tiled.from_dense(w, tile_m=16)):
        assert torch.equal(type(stored).from_buffers((m, k), stored.buffers()).to_dense(), w)


def test_packers_reject_bad_input():
    with pytest.raises(ValueError, match="at least 1 dimension"):
        CSR.from_dense(torch.ones(()))
    with pytest.raises(TypeError, match="floating point"):
        CSR.from_dense(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="index_dtype"):
        CSR.from_dense(torch.ones(2, 2), index_dtype=torch.int8)
    with pytest.raises(ValueError, match="K = 40000"):
        CSR.from_dense(torch.ones(1, 40000), index_dtype=torch.int16)
    with pytest.raises(ValueError, match="mask shape"):
        CSR.from_dense(torch.ones(2, 2), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="blocksize"):
        BSR.from_dense(torch.ones(2, 2), 0)
    with pytest.raises(ValueError, match="tile_m"):
        Tiled.from_dense(torch.ones(2, 2), tile_m=8)


# --------------------------------------------------------------------------- Compact
def _assert_decoded(dense: torch.Tensor, compact: Compact, t: int = 0) -> None:
    """Tensor t of `compact` decodes to `dense` within what its value kind promises."""
    decoded = torch.from_numpy(compact.to_dense()[t])
    assert decoded.shape == dense.shape
    zero = dense == 0
    assert not decoded[zero].any(), "a pruned weight came back nonzero"
    kind = compact.values_kind
    if kind in ("fp32", "fp64"):
        assert torch.equal(decoded, dense.to(decoded.dtype))
    elif kind == "fp16":
        assert torch.equal(decoded, dense.half().float())
    elif kind == "bf16":
        assert torch.equal(decoded, dense.bfloat16().float())
    elif kind == "int8":
        assert compact.scale is not None
        err = (decoded - dense).abs().max().item() if dense.numel() else 0.0
        assert err <= float(compact.scale.astype(np.float32).max()) / 2 * 1.0001 + 1e-12
    else:
        assert compact.codebook is not None
        assert compact.codebook_sizes is not None
        first = int(compact.codebook_sizes[:t].sum())
        own = compact.codebook[first : first + int(compact.codebook_sizes[t])]
        book = torch.from_numpy(own.astype(np.float32))
        book = book[book != 0] if (book != 0).any() else book  # only zeros take an exact 0.0
        nz = dense[~zero]
        if nz.numel():
            nearest = (nz[:, None] - book[None, :]).abs().min(1).values
            assert bool(((decoded[~zero] - nz).abs() <= nearest + 1e-6).all())
    if len(compact.shapes) == 1:
        (check,) = check_decoded(compact, [dense.numpy()], [decoded.to(dense.dtype).numpy()])
        assert check.within_bound


@FAST
@given(masked_weights(), st.sampled_from(VALUES_KINDS), st.sampled_from(("auto", *POSITIONS_KINDS)))
def test_compact_round_trip(dense, values, positions):
    compact = Compact.from_dense(dense, values=values, positions=positions)
    compact.check()
    _assert_decoded(dense, compact)
    if compact.positions_kind != "dense":  # dense positions count what the codes hold
        assert compact.nnz().tolist() == [int(dense.count_nonzero())]
    assert (
        compact.nbytes
        == _bytes(
            compact.positions, compact.values, compact.scale, compact.codebook, compact.remainders
        )
        + compact.table_nbytes
    )
    assert compact.nbytes_per_tensor().sum() == pytest.approx(compact.nbytes)
    if positions != "auto":
        assert compact.positions_kind == positions


@FAST
@given(st.lists(masked_weights(max_dim=12), min_size=1, max_size=4), st.sampled_from(VALUES_KINDS))
def test_compact_holds_several_tensors_in_one_stream(tensors, values):
    compact = Compact.from_dense(tensors, values=values)
    compact.check()
    assert compact.shapes == tuple(tuple(t.shape) for t in tensors)
    for t, dense in enumerate(tensors):
        _assert_decoded(dense, compact, t)
    originals = [t.numpy() for t in tensors]
    decoded = [d.astype(np.float32) for d in compact.to_dense()]
    assert all(c.within_bound for c in check_decoded(compact, originals, decoded))
    if compact.positions_kind != "dense":
        assert compact.nnz().tolist() == [int(t.count_nonzero()) for t in tensors]


@FAST
@given(masked_weights(), st.sampled_from(VALUES_KINDS))
def test_compact_auto_picks_the_smallest_positions(dense, values):
    auto = Compact.from_dense(dense, values=values)
    sizes = [Compact.from_dense(dense, values=values, positions=p).nbytes for p in POSITIONS_KINDS]
    # side info (int4's exact 0 for dense positions) may differ by a few bytes from the estimate
    assert auto.nbytes <= min(sizes) + 4


def test_rice_parameter_grows_as_density_falls():
    gen = torch.Generator().manual_seed(0)
    ks = []
    for density in (0.5, 0.1, 0.01, 0.001):
        w = torch.rand(200, 500, generator=gen) < density
        c = Compact.from_dense(w.float(), positions="rice")
        assert c.rice_k is not None
        ks.append(c.rice_k)
    assert ks == sorted(ks) and ks[0] < ks[-1]


@pytest.mark.parametrize("values", VALUES_KINDS)
def test_rice_codes_huge_gaps(values):
    dense = torch.zeros(1, 300_000)
    dense[0, [0, 5, 299_999]] = torch.tensor([1.0, -2.0, 0.5])
    compact = Compact.from_dense(dense, values=values, positions="rice")
    compact.check()
    assert compact.entries.tolist() == compact.nnz().tolist() == [3]
    _assert_decoded(dense, compact)


@pytest.mark.parametrize("positions", ["rice", "bitmask"])
def test_a_stream_of_only_set_bits_ends_in_a_clear_byte(positions):
    dense = torch.arange(1, 9, dtype=torch.float32)  # 8 nonzeros of 8: every bit set
    compact = Compact.from_dense(dense, positions=positions)
    compact.check()
    assert compact.positions[-1] == 0
    _assert_decoded(dense, compact)


def test_compact_int4_reserves_an_exact_zero_only_for_dense_positions():
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(1, 2000, generator=gen)
    dense[0, 100:1000] = 0
    dense_positions = Compact.from_dense(dense, values="int4", positions="dense")
    rice_positions = Compact.from_dense(dense, values="int4", positions="rice")
    assert dense_positions.codebook is not None and rice_positions.codebook is not None
    assert 0.0 in dense_positions.codebook.tolist()
    assert 0.0 not in rice_positions.codebook.tolist()
    assert np.unique(rice_positions.codebook).size == 16
    _assert_decoded(dense, dense_positions)
    assert dense_positions.nnz().tolist() == [1100]


def test_compact_int4_packs_two_codes_per_byte():
    dense = torch.arange(1, 8, dtype=torch.float32)  # 7 distinct values: codebook is exact
    compact = Compact.from_dense(dense, values="int4", positions="rice")
    assert compact.values.size == 4  # ceil(7 / 2)
    assert np.array_equal(compact.to_dense()[0], dense.numpy())


def test_compact_int8_rows_of_zeros_and_tiny_values():
    dense = torch.zeros(3, 5)
    dense[1, 2] = 1e-9  # the scale underflows fp16: decodes to 0, never to garbage
    dense[2] = torch.tensor([1.0, -2.0, 0.0, 3.0, -127.0])
    compact = Compact.from_dense(dense, values="int8")
    compact.check()
    decoded = compact.to_dense()[0]
    assert (decoded[0] == 0).all() and np.abs(decoded[1]).max() <= 1e-9
    assert decoded[2, 4] == -127.0


def test_int8_scales_rows_apart_where_one_scale_would_blur_the_small_rows():
    """Rows of few entries share one scale, unless their magnitudes lie far apart (a folded
    BatchNorm's per-channel scales): then each row keeps its own, and every row decodes within
    its own half step."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((32, 64)) * (rng.random((32, 64)) < 0.1)  # ~6 entries a row
    alike = Compact.from_dense([weight.astype(np.float32)], values="int8")
    assert alike.scale.size == 1
    spread = weight * np.geomspace(1e-3, 1.0, 32)[:, None]  # rows 1000x apart
    apart = Compact.from_dense([spread.astype(np.float32)], values="int8")
    assert apart.scale.size == 32
    decoded = apart.to_dense()[0].astype(np.float64)
    for row in range(32):
        step = np.abs(spread[row]).max() / 127
        assert np.abs(decoded[row] - spread[row]).max() <= 0.51 * step + 1e-12


@pytest.mark.parametrize("density", [0.01, 0.036, 0.2])
def test_compact_entropy_bound_and_ratio_on_a_random_ticket(density):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 784, generator=gen) * (torch.rand(300, 784, generator=gen) < density)
    nnz = int(w.count_nonzero())
    for values, bits in [("fp32", 32), ("fp16", 16), ("int8", 8), ("int4", 4)]:
        c = Compact.from_dense(w, values=values)
        expected = mask_entropy_bits(w.numel(), nnz) + nnz * bits
        assert c.entropy_bound_bits() == pytest.approx(expected)
        # Rice-coded gaps sit within a few percent of the entropy of a random mask.
        assert c.positions_kind == "rice"
        overhead = c.side_nbytes + c.table_nbytes
        assert 1.0 < (c.nbytes - overhead) * 8 / c.entropy_bound_bits() < 1.03
        bitmask = Compact.from_dense(w, values=values, positions="bitmask")
        assert bitmask.nbytes > c.nbytes


def test_mask_entropy_bits():
    assert mask_entropy_bits(64, 32) == pytest.approx(64.0)
    assert mask_entropy_bits(100, 0) == mask_entropy_bits(100, 100) == 0.0
    d = 0.036
    assert mask_entropy_bits(1000, 36) == pytest.approx(
        1000 * -(d * math.log2(d) + (1 - d) * math.log2(1 - d))
    )
    with pytest.raises(ValueError, match="nnz=5"):
        mask_entropy_bits(4, 5)


def test_compact_rejects_bad_arguments():
    w = torch.ones(2, 2)
    with pytest.raises(ValueError, match="'int3'"):
        Compact.from_dense(w, values="int3")
    with pytest.raises(ValueError, match="'gap4'"):
        Compact.from_dense(w, positions="gap4")
    with pytest.raises(ValueError, match="0-d"):
        Compact.from_dense(torch.tensor(1.0))
    with pytest.raises(TypeError, match="float"):
        Compact.from_dense([1.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="fp16 cannot hold"):
        Compact.from_dense(torch.tensor([1e6]), values="fp16")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"positions": np.array([0xFF, 0x01], np.uint8)}, "bitmask must be 1 bytes"),
        ({"positions": np.array([5], np.uint16)}, "must be a 1-D uint8"),
        ({"values": np.zeros(3, np.float32)}, "fp32 values must be float32 of 2"),
        ({"entries": np.array([3], np.int64)}, "positions hold 2 entries"),
        ({"scale": np.ones(2, np.float16)}, "scales must be present exactly"),
        ({"remainders": np.zeros((1, 1), np.uint8)}, "only stored for rice"),
        ({"positions": np.array([0x05 | 0x40], np.uint8)}, "bits set past the last element"),
        ({"scale_rows": np.ones(1, np.int64)}, "scales must be present exactly"),
    ],
)
def test_compact_check_names_the_broken_invariant(change, message):
    compact = Compact.from_dense(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), positions="bitmask")
    compact.check()
    broken = Compact(**{**compact.__dict__, **change})
    with pytest.raises(ValueError, match=message):
        broken.check()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"remainders": None}, "need uint8 remainder planes"),
        ({"remainders": np.zeros((2, 3), np.uint8)}, r"must be \[1 <= k <= \d+, 1\]"),
        ({"remainders": np.zeros((0, 1), np.uint8)}, r"must be \[1 <= k <= \d+, 1\]"),
        ({"remainders": np.full((2, 1), 0xF0, np.uint8)}, "past the last entry"),
        ({"positions": np.array([1, 0, 0, 0, 0, 0, 0, 0x40], np.uint8)}, "one terminator"),
    ],
)
def test_compact_check_rice_invariants(change, message):
    dense = torch.zeros(1, 40)
    dense[0, [3, 9, 30]] = 1.0
    compact = Compact.from_dense(dense, positions="rice")
    compact.check()
    with pytest.raises(ValueError, match=message):
        Compact(**{**compact.__dict__, **change}).check()


@pytest.mark.parametrize("values", ["int8", "int4", "fp16"])
def test_check_decoded_fails_a_wrong_weight_the_output_error_would_hide(values):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 64, generator=gen) * (torch.rand(64, 64, generator=gen) < 0.3)).numpy()
    compact = Compact.from_dense(w, values=values)
    (decoded,) = compact.to_dense()
    assert check_decoded(compact, [w], [decoded])[0].within_bound
    wrong = decoded.copy()
    i = int(np.flatnonzero(w)[7])
    wrong[np.unravel_index(i, w.shape)] += 0.05 * np.abs(w).max()  # small, but past the bound
    (result,) = check_decoded(compact, [w], [wrong])
    assert not result.within_bound and result.worst == i
    revived = decoded.copy()
    revived[np.unravel_index(int(np.flatnonzero(w == 0)[0]), w.shape)] = 1e-7  # a pruned weight
    assert not check_decoded(compact, [w], [revived])[0].within_bound


@pytest.mark.filterwarnings("error")  # inf - inf warned "invalid value" on stderr
def test_check_decoded_counts_an_infinity_decoded_as_itself_as_no_error():
    w = np.zeros((4, 8), np.float32)
    w[0, 1], w[2, 3], w[3, 7] = np.inf, -np.inf, 0.5
    compact = Compact.from_dense(w)
    (decoded,) = compact.to_dense()
    (check,) = check_decoded(compact, [w], [decoded])
    assert check.within_bound and check.max_abs_error == 0.0
    flipped = decoded.copy()
    flipped[0, 1] = -np.inf
    assert not check_decoded(compact, [w], [flipped])[0].within_bound


def test_kmeans_is_exact_on_few_values_and_reduces_error():
    assert kmeans_1d(np.array([3.0, 1.0, 3.0, 2.0]), 16).tolist() == [1.0, 2.0, 3.0]
    x = np.random.default_rng(0).standard_normal(5000)
    centroids = kmeans_1d(x, 16)
    assert centroids.size == 16 and np.all(np.diff(centroids) > 0)
    err = np.abs(x[:, None] - centroids[None]).min(1)
    uniform = np.linspace(x.min(), x.max(), 16)
    err_uniform = np.abs(x[:, None] - uniform[None]).min(1)
    assert (err**2).mean() < (err_uniform**2).mean()


@pytest.mark.parametrize("values", ["fp64", "fp32", "bf16", "fp16", "int8", "int4"])
@pytest.mark.parametrize("positions", ["rice", "bitmask"])
def test_a_dense_tail_costs_its_values_and_table_rows_only(values, positions):
    """A fully dense bias after a sparse matrix stores no positions: its bytes are its values,
    its side info (int8 scale, int4 codebook) and its rows of the per-tensor tables."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)) * (rng.random((64, 32)) < 0.1)
    bias = rng.standard_normal(512)
    weight, bias = weight.astype(np.float32), bias.astype(np.float32)
    alone = Compact.from_dense([weight], values, positions, rice_k=3)
    both = Compact.from_dense([weight, bias], values, positions, rice_k=3, dense_tail=1)
    both.check()
    assert both.positions.nbytes == alone.positions.nbytes
    value_bytes = 512 * VALUE_BITS[values] // 8
    side = {"int8": 2, "int4": 2 * 16}.get(values, 0)
    tables = both.table_nbytes - alone.table_nbytes
    assert tables == both.table_nbytes // 2  # one more row in each table
    assert both.nbytes - alone.nbytes == value_bytes + side + tables
    decoded = both.to_dense()
    if values in ("fp64", "fp32"):
        np.testing.assert_array_equal(decoded[1], bias)
        np.testing.assert_array_equal(decoded[0], weight)
    # the bias's entries that decode to a nonzero (int8: a tiny value may take code 0)
    assert both.nnz().tolist() == [int((weight != 0).sum()), int((decoded[1] != 0).sum())]
    shares = both.nbytes_per_tensor()
    assert shares.sum() == pytest.approx(both.nbytes)


def test_a_dense_tail_keeps_zeros_exact_and_is_refused_where_it_means_nothing():
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((8, 8)) * (rng.random((8, 8)) < 0.2)).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    bias[3] = 0.0
    for values in ("fp16", "int8", "int4"):
        c = Compact.from_dense([weight, bias], values, "rice", dense_tail=1)
        assert c.to_dense()[1][3] == 0.0
        assert c.nnz()[1] <= 15
    with pytest.raises(ValueError, match="dense_tail"):
        Compact.from_dense([weight, bias], "fp32", "dense", dense_tail=1)
    with pytest.raises(ValueError, match="dense_tail"):
        Compact.from_dense([weight, bias], "fp32", "rice", dense_tail=2)


def test_dense_positions_count_the_codes_a_tiny_weight_quantised_to_zero():
    """auto picks dense positions for a full tensor; int8 rounds -0.003 (scale 1/127) to code 0,
    within its bound, and nnz counts the codes: the round-trip test once assumed otherwise."""
    dense = torch.tensor([[1.0, -0.003, 0.9, 0.7], [0.5, 0.6, -0.8, 0.95],
                          [1.0, 1.0, 1.0, 1.0], [0.3, 0.4, 0.5, 0.6]])  # fmt: skip
    compact = Compact.from_dense(dense, values="int8")
    assert compact.positions_kind == "dense" and compact.nnz().tolist() == [15]
    assert Compact.from_dense(dense, values="int8", positions="rice").nnz().tolist() == [16]
    _assert_decoded(dense, compact)
