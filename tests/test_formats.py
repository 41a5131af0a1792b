"""Round trips and invariants of the sparse formats (CSR, BSR, Compact) and their registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ticketc.formats import (
    BSR,
    CSR,
    FORMATS,
    POSITIONS_KINDS,
    VALUES_KINDS,
    Compact,
    block_occupancy,
    get_format,
    mask_entropy_bits,
)
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


# --------------------------------------------------------------------------- registry
def test_registry_lists_every_format_and_rejects_unknown_names():
    assert {"csr": CSR, "bsr": BSR, "compact": Compact} == FORMATS
    assert get_format("bsr") is BSR
    with pytest.raises(ValueError, match="'coo'.*bsr, compact, csr"):
        get_format("coo")


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
    assert csr.nbytes == _bytes(csr.crow_indices, csr.col_indices, csr.values)
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


# --------------------------------------------------------------------------- Compact
def _assert_decoded(dense: torch.Tensor, compact: Compact) -> None:
    decoded = compact.to_dense()
    assert decoded.dtype == torch.float32
    assert decoded.shape == dense.shape
    zero = dense == 0
    assert not decoded[zero].any(), "a pruned weight came back nonzero"
    kind = compact.values_kind
    if kind == "fp32":
        assert torch.equal(decoded, dense)
    elif kind == "fp16":
        assert torch.equal(decoded, dense.half().float())
    elif kind == "int8":
        assert compact.scale is not None
        rows = dense.reshape(dense.shape[0], -1)
        scale = torch.from_numpy(compact.scale.astype(np.float32))
        # fp16 rounding of the scale can push |w| / scale just past 127: allow the clip's excess.
        bound = scale / 2 + (rows.abs().amax(1) - 127 * scale).clamp(min=0)
        err = (decoded.reshape(rows.shape) - rows).abs()
        assert bool((err <= bound[:, None] * 1.0001 + 1e-12).all())
    else:
        assert compact.codebook is not None
        book = torch.from_numpy(compact.codebook.astype(np.float32))
        nz = dense[~zero]
        nearest = (nz[:, None] - book[None, :]).abs().min(1).values
        assert torch.allclose((decoded[~zero] - nz).abs(), nearest, rtol=0, atol=1e-6)
        assert np.unique(compact.codebook).size <= 16


@FAST
@given(masked_weights(), st.sampled_from(VALUES_KINDS), st.sampled_from(("auto", *POSITIONS_KINDS)))
def test_compact_round_trip(dense, values, positions):
    compact = Compact.from_dense(dense, values=values, positions=positions)
    compact.check()
    _assert_decoded(dense, compact)
    assert compact.nnz == int(dense.count_nonzero())
    assert compact.density == pytest.approx(compact.nnz / dense.numel())
    assert compact.nbytes == _bytes(
        compact.positions, compact.values, compact.scale, compact.codebook, compact.remainders
    )
    if positions != "auto":
        assert compact.positions_kind == positions


@FAST
@given(masked_weights(), st.sampled_from(VALUES_KINDS))
def test_compact_auto_picks_the_smallest_positions(dense, values):
    auto = Compact.from_dense(dense, values=values)
    sizes = [Compact.from_dense(dense, values=values, positions=p).nbytes for p in POSITIONS_KINDS]
    assert auto.nbytes == min(sizes)


def test_rice_parameter_grows_as_density_falls():
    gen = torch.Generator().manual_seed(0)
    ks = []
    for density in (0.5, 0.1, 0.01, 0.001):
        w = torch.rand(200, 500, generator=gen) < density
        c = Compact.from_dense(w.float(), positions="rice")
        assert c.remainders is not None
        ks.append(c.remainders.shape[0])
    assert ks == sorted(ks) and ks[0] < ks[-1]


@pytest.mark.parametrize("values", VALUES_KINDS)
def test_rice_codes_huge_gaps_without_fillers(values):
    dense = torch.zeros(1, 300_000)
    dense[0, [0, 5, 299_999]] = torch.tensor([1.0, -2.0, 0.5])
    compact = Compact.from_dense(dense, values=values, positions="rice")
    compact.check()
    assert compact.entries == compact.nnz == 3
    _assert_decoded(dense, compact)


@pytest.mark.parametrize("values", VALUES_KINDS)
@pytest.mark.parametrize(("positions", "max_gap"), [("gap8", 256), ("gap16", 65536)])
def test_compact_bridges_long_gaps_with_zero_fillers(values, positions, max_gap):
    dense = torch.zeros(1, 2 * max_gap + 40)
    hits = [0, 1, max_gap + 1, max_gap + 2, 2 * max_gap + 39]  # gaps 1, 1, 256+... , exact max
    dense[0, hits] = torch.tensor([0.5, -1.0, 2.0, 0.25, -3.0])
    compact = Compact.from_dense(dense, values=values, positions=positions)
    compact.check()
    assert compact.entries > compact.nnz == len(hits)
    assert int(compact.positions.max()) == max_gap - 1  # the filler's maximal gap
    _assert_decoded(dense, compact)
    gaps = np.diff(compact.linear_indices(), prepend=-1)
    assert gaps.min() >= 1 and gaps.max() <= max_gap


def test_compact_gap_of_exactly_the_maximum_needs_no_filler():
    dense = torch.zeros(600)
    dense[[255, 511]] = 1.0  # gaps 256 and 256
    compact = Compact.from_dense(dense, positions="gap8")
    assert compact.entries == compact.nnz == 2
    assert compact.positions.tolist() == [255, 255]


def test_compact_int4_reserves_an_exact_zero_only_with_fillers():
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(1, 2000, generator=gen)
    dense[0, 100:1000] = 0  # one gap of 901 > 256
    with_fillers = Compact.from_dense(dense, values="int4", positions="gap8")
    without = Compact.from_dense(dense, values="int4", positions="gap16")
    assert with_fillers.entries > with_fillers.nnz
    assert 0.0 in with_fillers.codebook.tolist()
    assert 0.0 not in without.codebook.tolist()
    assert np.unique(without.codebook).size == 16


def test_compact_int4_packs_two_codes_per_byte():
    dense = torch.arange(1, 8, dtype=torch.float32)  # 7 distinct values: codebook is exact
    compact = Compact.from_dense(dense, values="int4", positions="gap8")
    assert compact.values.size == 4  # ceil(7 / 2)
    assert torch.equal(compact.to_dense(), dense)


def test_compact_int8_rows_of_zeros_and_tiny_values():
    dense = torch.zeros(3, 5)
    dense[1, 2] = 1e-9  # the scale underflows fp16: decodes to 0, never to garbage
    dense[2] = torch.tensor([1.0, -2.0, 0.0, 3.0, -127.0])
    compact = Compact.from_dense(dense, values="int8")
    compact.check()
    decoded = compact.to_dense()
    assert decoded[0].eq(0).all() and decoded[1].abs().max() <= 1e-9
    assert decoded[2, 4] == -127.0


@pytest.mark.parametrize("density", [0.01, 0.036, 0.2])
def test_compact_entropy_bound_and_ratio_on_a_random_ticket(density):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 784, generator=gen) * (torch.rand(300, 784, generator=gen) < density)
    nnz = int(w.count_nonzero())
    for values, bits in [("fp32", 32), ("fp16", 16), ("int8", 8), ("int4", 4)]:
        c = Compact.from_dense(w, values=values)
        expected = mask_entropy_bits(w.numel(), nnz) / 8 + nnz * bits / 8 + c.side_nbytes
        assert c.entropy_bound_bytes == pytest.approx(expected)
        # Rice-coded gaps sit within a few percent of the entropy of a random mask.
        assert c.positions_kind == "rice"
        assert 1.0 < c.nbytes / c.entropy_bound_bytes < 1.03
        gap8 = Compact.from_dense(w, values=values, positions="gap8")
        assert gap8.nbytes > c.nbytes


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
    with pytest.raises(TypeError, match="list"):
        Compact.from_dense([1.0])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"positions": np.array([0, 250], np.uint8)}, "run past the end"),
        ({"positions": np.array([0, 1], np.uint16)}, "must be uint8"),
        ({"values": np.zeros(3, np.float32)}, "fp32 values must be float32 of 2"),
        ({"nnz": 3}, "nnz = 3"),
        ({"scale": np.ones(2, np.float16)}, "scale must be present exactly"),
        ({"remainders": np.zeros((1, 1), np.uint8)}, "only stored for rice"),
    ],
)
def test_compact_check_names_the_broken_invariant(change, message):
    compact = Compact.from_dense(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), positions="gap8")
    broken = Compact(**{**compact.__dict__, **change})
    with pytest.raises(ValueError, match=message):
        broken.check()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"remainders": None}, "need uint8 remainder planes"),
        ({"remainders": np.zeros((2, 3), np.uint8)}, r"must be \[1 <= k <= 16, 1\]"),
        ({"remainders": np.zeros((0, 1), np.uint8)}, r"must be \[1 <= k <= 16, 1\]"),
        ({"remainders": np.full((2, 1), 0xF0, np.uint8)}, "past the last entry"),
        ({"positions": np.array([1, 0, 0, 0, 0, 0, 0, 0xC0], np.uint8)}, "run past the end"),
    ],
)
def test_compact_check_rice_invariants(change, message):
    dense = torch.zeros(1, 40)
    dense[0, [3, 9, 30]] = 1.0
    compact = Compact.from_dense(dense, positions="rice")
    compact.check()
    with pytest.raises(ValueError, match=message):
        Compact(**{**compact.__dict__, **change}).check()


def test_compact_check_rejects_a_nonzero_filler():
    dense = torch.zeros(600)
    dense[[0, 599]] = 1.0
    compact = Compact.from_dense(dense, positions="gap8")
    values = compact.values.copy()
    values[1] = 7.0  # the filler
    with pytest.raises(ValueError, match="fillers"):
        Compact(**{**compact.__dict__, "values": values}).check()


def test_kmeans_is_exact_on_few_values_and_reduces_error():
    assert kmeans_1d(np.array([3.0, 1.0, 3.0, 2.0]), 16).tolist() == [1.0, 2.0, 3.0]
    x = np.random.default_rng(0).standard_normal(5000)
    centroids = kmeans_1d(x, 16)
    assert centroids.size == 16 and np.all(np.diff(centroids) > 0)
    err = np.abs(x[:, None] - centroids[None]).min(1)
    uniform = np.linspace(x.min(), x.max(), 16)
    err_uniform = np.abs(x[:, None] - uniform[None]).min(1)
    assert (err**2).mean() < (err_uniform**2).mean()
