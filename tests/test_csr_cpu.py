"""The Numba CPU kernels against float64 references: ragged shapes, empty and full rows,
densities 0 to 1, stacked groups and a shared input."""

from __future__ import annotations

import pytest
import torch

from ticketc.kernels import csr_cpu

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

SHAPES = [(1, 1, 1), (7, 13, 3), (33, 65, 60), (300, 784, 64), (5, 9, 17)]  # (M, K, N)
DENSITIES = [0.0, 0.036, 0.5, 1.0]


def _csr(dense: torch.Tensor, index: torch.dtype = torch.int64):
    csr = dense.to_sparse_csr()
    return (csr.crow_indices().to(index), csr.col_indices().to(index), csr.values().float())


def _weight(m: int, k: int, density: float, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) < density)
    if m > 2:
        w[0] = 0.0  # an empty row
        w[1] = torch.randn(k, generator=g)  # a full one
    return w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("index", [torch.int16, torch.int64])
def test_matmul_t_matches_float64(shape, density, index) -> None:
    m, k, n = shape
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    w, x, bias = _weight(m, k, density, g), torch.randn(n, k, generator=g), torch.randn(m)
    crow, col, values = _csr(w, torch.int64)
    col = col.to(index)
    out = csr_cpu.csr_matmul_t(crow, col, values, x.t().contiguous(), bias)
    ref = (x.double() @ w.double().t() + bias.double()).t()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)  # fp32 sums of <= 784
    no_bias = csr_cpu.csr_matmul_t(crow, col, values, x.t().contiguous())
    torch.testing.assert_close(
        no_bias.double(), (x.double() @ w.double().t()).t(), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("shared", [False, True])
def test_groups_read_their_own_input(shared: bool) -> None:
    g = torch.Generator().manual_seed(3)
    groups, m, k, n = 3, 11, 19, 8
    ws = [_weight(m, k, 0.3, g) for _ in range(groups)]
    xt = torch.randn(1 if shared else groups, k, n, generator=g)
    crow, col, values = _csr(torch.cat(ws))
    out = csr_cpu.csr_matmul_t(crow, col, values, xt, groups=groups).view(groups, m, n)
    for i, w in enumerate(ws):
        torch.testing.assert_close(out[i], w @ xt[0 if shared else i], rtol=1e-5, atol=1e-5)


def test_sampled_grad_is_the_dense_gradient_at_stored_entries() -> None:
    g = torch.Generator().manual_seed(4)
    groups, m, k, n = 2, 13, 29, 24
    ws = [_weight(m, k, 0.2, g) for _ in range(groups)]
    xt, g_t = torch.randn(groups, k, n, generator=g), torch.randn(groups * m, n, generator=g)
    crow, col, _ = _csr(torch.cat(ws))
    got = csr_cpu.csr_sampled_grad(crow, col, g_t, xt, groups=groups)
    dense = torch.cat(
        [g_t[i * m : (i + 1) * m].double() @ xt[i].double().t() for i in range(groups)]
    )  # [groups * m, k]
    rows = torch.repeat_interleave(torch.arange(groups * m), crow.diff())
    torch.testing.assert_close(got.double(), dense[rows, col], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 8, 13, 60])  # below, at and past whole 8-row blocks
def test_gather_t_picks_transposes_and_zero_pads(n: int) -> None:
    source = torch.randn(50, 7)
    index = torch.randint(0, 50, (2, n), generator=torch.Generator().manual_seed(n))
    index[0, 0] = index[0, -1] = 49  # repeated rows, the last row
    out = csr_cpu.gather_t(source, index)
    assert out.shape == (2, 7, csr_cpu.padded(n)) and csr_cpu.padded(n) % 8 == 0
    assert torch.equal(out[:, :, :n], source[index].transpose(1, 2))
    assert not out[:, :, n:].any()
    x = torch.randn(2, 9, 5)
    padded = csr_cpu.transpose_padded(x)
    assert padded.shape == (2, 5, 16) and torch.equal(padded[..., :9], x.transpose(1, 2))
    assert not padded[..., 9:].any()


def test_rejects_mismatched_groups() -> None:
    crow, col, values = _csr(torch.eye(5))
    with pytest.raises(ValueError, match="groups"):
        csr_cpu.csr_matmul_t(crow, col, values, torch.randn(2, 5, 3), groups=2)


def test_kernels_run_on_torch_threads_and_leave_numba_as_it_was(monkeypatch) -> None:
    """Each call sets Numba's thread count to torch's for its duration only: the caller's Numba
    setting is the same afterwards (no state left behind by a constructor or a call)."""
    import numba

    started = numba.config.NUMBA_NUM_THREADS
    if started < 2:
        pytest.skip("Numba started one thread: nothing to change")
    numba.set_num_threads(2)
    seen: list[int] = []
    real = numba.set_num_threads
    monkeypatch.setattr(numba, "set_num_threads", lambda n: seen.append(n) or real(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    g = torch.Generator().manual_seed(0)
    w = _weight(9, 13, 0.5, g)
    crow, col, values = _csr(w)
    assert csr_cpu.use_torch_threads() == 1 and numba.get_num_threads() == 2
    csr_cpu.csr_matmul_t(crow, col, values, torch.randn(13, 8, generator=g))
    assert seen == [1, 2] and numba.get_num_threads() == 2
