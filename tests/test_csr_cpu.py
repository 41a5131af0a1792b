"""The Numba CPU kernels against float64 references: ragged shapes, empty and full rows,
densities 0 to 1, stacked groups and a shared input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ticketc.kernels import csr_cpu

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
    torch.testing.assert_close(no_bias.double(), (x.double() @ w.double().t()).t(),
                               rtol=1e-4, atol=1e-4)


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
    dense = torch.cat([g_t[i * m:(i + 1) * m].double() @ xt[i].double().t()
                       for i in range(groups)])  # [groups * m, k]
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


def _chain(widths, relus, g, *, bias=True, density=0.3):
    """A CsrChain over random layers widths[0] -> widths[1] -> ..., and its float64 twin."""
    layers, arrays = [], []
    for k, m in zip(widths, widths[1:], strict=False):
        w = _weight(m, k, density, g)
        b = torch.randn(m, generator=g) if bias else None
        layers.append((w, b))
        crow, col, values = _csr(w, torch.int32)
        arrays.append(csr_cpu.CsrArrays.of(crow, col, values, b, in_features=k))

    def reference(x):
        y = x.double()
        for (w, b), relu in zip(layers, relus, strict=True):
            y = y @ w.double().t() + (0 if b is None else b.double())
            y = y.clamp_min(0) if relu else y
        return y

    return csr_cpu.CsrChain(arrays, relus), reference


# How CsrChain runs a batch: on the calling thread, split by batch columns (one parallel
# region for the whole chain), or by each layer's rows (narrow batches).
KERNELS = ["serial", "columns or rows"]


@pytest.fixture
def kernel(request, monkeypatch):
    if request.param == "serial":
        monkeypatch.setattr(csr_cpu, "_SERIAL_BELOW", 1 << 40)
    else:  # parallel whatever the work; n < 2 * MIN_COLUMNS takes the rows kernel
        monkeypatch.setattr(csr_cpu, "_SERIAL_BELOW", 0)
        monkeypatch.setattr(csr_cpu, "use_torch_threads", lambda: 2)
    # Poison the scratch buffer: nothing may read activations a previous call left there.
    poison = np.full(1 << 20, np.nan, np.float32)
    monkeypatch.setattr(csr_cpu._scratch, "buffer", poison, raising=False)
    return request.param


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 64, 100])
@pytest.mark.parametrize(
    ("widths", "relus"),
    [([5, 19], [False]), ([70, 19], [True]), ([1, 33, 7], [True, False]),
     ([64, 300, 100, 10], [True, True, False]), ([9, 40, 40, 3], [False, True, True])],
)
def test_chain_matches_float64(kernel, n, widths, relus) -> None:
    g = torch.Generator().manual_seed(n * 1000 + sum(widths))
    chain, reference = _chain(widths, relus, g)
    x = torch.randn(n, widths[0], generator=g)
    want = reference(x)
    for inp in (x, x.t().contiguous().t(), torch.randn(n, 2 * widths[0])[:, ::2].copy_(x)):
        y = chain(inp)  # batch-major, feature-major, a strided view
        assert y.shape == (n, widths[-1]) and y.stride() == (1, n)  # [M, N] storage
        # fp32 sums over up to 300 terms, four layers deep
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max())


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_chain_of_empty_and_full_layers_without_bias(kernel, density) -> None:
    g = torch.Generator().manual_seed(3)
    chain, reference = _chain([20, 17, 6], [True, False], g, bias=False, density=density)
    x = torch.randn(40, 20, generator=g)
    torch.testing.assert_close(chain(x).double(), reference(x), rtol=1e-5, atol=1e-5)


def test_chain_leaves_its_input_alone_and_reuses_no_output() -> None:
    g = torch.Generator().manual_seed(9)
    chain, _ = _chain([40, 12], [False], g, bias=False, density=0.5)
    x = torch.randn(64, 40, generator=g)
    before = x.clone()
    first = chain(x)
    second = chain(2 * x)
    assert torch.equal(x, before) and first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(second, 2 * first)


def test_chain_sees_in_place_updates_of_its_weights() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    crow, col, values = _csr(w, torch.int32)
    chain = csr_cpu.CsrChain([csr_cpu.CsrArrays.of(crow, col, values, in_features=2)], [False])
    x = torch.ones(40, 2)
    values.mul_(3)  # the arrays are views: no stale copy inside the chain
    torch.testing.assert_close(chain(x), torch.tensor([[3.0, 6.0]]).expand(40, 2))


def test_chain_refuses_mismatched_layers_and_inputs() -> None:
    g = torch.Generator().manual_seed(5)
    a = csr_cpu.CsrArrays.of(*_csr(_weight(8, 4, 0.5, g), torch.int32), in_features=4)
    b = csr_cpu.CsrArrays.of(*_csr(_weight(3, 7, 0.5, g), torch.int32), in_features=7)
    with pytest.raises(ValueError, match="layer 0 outputs 8 features, layer 1 takes 7"):
        csr_cpu.CsrChain([a, b], [False, False])
    with pytest.raises(ValueError, match="2 relu flags"):
        csr_cpu.CsrChain([a], [False, False])
    chain = csr_cpu.CsrChain([a], [False])
    with pytest.raises(ValueError, match=r"expected \[N, 4\] float32"):
        chain(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"expected \[N, 4\] float32"):
        chain(torch.randn(2, 4, dtype=torch.float64))
