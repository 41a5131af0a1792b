"""The CPU inference kernels (csr_chain_cpu, csr_conv_cpu) and their threads (cpu_threads):
float64 references, ragged batches, every split of the work, helpers that never join."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ticketc.formats import CSR
from ticketc.kernels import cpu_threads, csr_chain_cpu, csr_conv_cpu


def _weight(m: int, k: int, density: float, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) < density)
    if m > 2 and 0 < density < 1:
        w[0] = 0.0  # an empty row
        w[1] = torch.randn(k, generator=g)  # a full one
    return w


def _chain(widths, relus, g, *, bias=True, density=0.3):
    """A CsrChain over random layers widths[0] -> widths[1] -> ..., and its float64 twin."""
    layers, packed = [], []
    for k, m in zip(widths, widths[1:], strict=False):
        w = _weight(m, k, density, g)
        b = torch.randn(m, generator=g) if bias else None
        layers.append((w, b))
        p = CSR.from_dense(w, index_dtype=torch.int32).buffers()
        packed.append(
            csr_chain_cpu.CsrLayer.of(p["crow_indices"], p["col_indices"], p["values"], b, k)
        )

    def reference(x):
        y = x.double()
        for (w, b), relu in zip(layers, relus, strict=True):
            y = y @ w.double().t() + (0 if b is None else b.double())
            y = y.clamp_min(0) if relu else y
        return y

    return csr_chain_cpu.CsrChain(packed, relus), reference


@pytest.fixture(params=["one thread", "helpers"])
def threads(request, monkeypatch):
    """Every call on the calling thread alone, or cut into chunks for 2 threads whatever its
    size; scratch buffers poisoned so that no call can read what an earlier one left."""
    if request.param == "helpers":
        monkeypatch.setattr(csr_chain_cpu, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(csr_conv_cpu, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(csr_conv_cpu, "_CHUNK_WORK", 64)
        monkeypatch.setattr(csr_conv_cpu, "_FILL_WORK", 16)
        monkeypatch.setattr(csr_chain_cpu, "_CHUNK_WORK", 64)
    monkeypatch.setattr(cpu_threads, "SCRATCH", _Poisoned())
    return 1 if request.param == "one thread" else 2


class _Poisoned(cpu_threads.Scratch):
    def get(self, name, shape):
        view = super().get(name, shape)
        view[...] = np.nan
        return view


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 64, 100])
@pytest.mark.parametrize(
    ("widths", "relus"),
    [([5, 19], [False]), ([70, 19], [True]), ([1, 33, 7], [True, False]),
     ([64, 300, 100, 10], [True, True, False]), ([9, 40, 40, 3], [False, True, True])],
)  # fmt: skip
def test_chain_matches_float64(threads, n, widths, relus) -> None:
    g = torch.Generator().manual_seed(n * 1000 + sum(widths))
    chain, reference = _chain(widths, relus, g)
    x = torch.randn(n, widths[0], generator=g)
    want = reference(x)
    for inp in (x, x.t().contiguous().t(), torch.randn(n, 2 * widths[0])[:, ::2].copy_(x)):
        y = chain(inp, threads=threads)  # row-major, feature-major, a strided view
        assert y.shape == (n, widths[-1]) and y.is_contiguous()
        # fp32 sums over up to 300 terms, four layers deep
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max())


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_chain_of_empty_and_full_layers_without_bias(threads, density) -> None:
    g = torch.Generator().manual_seed(3)
    chain, reference = _chain([20, 17, 6], [True, False], g, bias=False, density=density)
    for n in (1, 40):
        x = torch.randn(n, 20, generator=g)
        y = chain(x, threads=threads)
        torch.testing.assert_close(y.double(), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 17, 40, 128, 161, 250])
def test_chain_tiles_of_every_width_match_float64(threads, n) -> None:
    """Rows of 0 to 9 entries (the four sets of sums, and the rest one at a time), 37 inputs
    (not a whole number of vectors), chunks of columns that end in tiles of 64, 32 and 16
    columns and inside a tile, ReLU on the first layer."""
    g = torch.Generator().manual_seed(n)
    w = torch.zeros(23, 37)
    for m in range(23):
        w[m, torch.randperm(37, generator=g)[: m % 10]] = torch.randn(m % 10, generator=g)
    w2 = torch.randn(5, 23, generator=g) * (torch.rand(5, 23, generator=g) < 0.5)
    b, b2 = torch.randn(23, generator=g), torch.randn(5, generator=g)
    layers = [
        csr_chain_cpu.CsrLayer.of(
            p["crow_indices"], p["col_indices"], p["values"], bias, wt.shape[1]
        )
        for wt, bias in ((w, b), (w2, b2))
        for p in [CSR.from_dense(wt, index_dtype=torch.int32).buffers()]
    ]
    chain = csr_chain_cpu.CsrChain(layers, [True, False])
    x = torch.randn(n, 37, generator=g)
    want = (x.double() @ w.double().t() + b.double()).clamp_min(0) @ w2.double().t() + b2
    y = chain(x, threads=threads)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max())


def test_chain_reads_negative_column_indices_from_the_end() -> None:
    g = torch.Generator().manual_seed(6)
    w = _weight(24, 40, 0.3, g)
    p = CSR.from_dense(w, index_dtype=torch.int32).buffers()
    args = (p["crow_indices"], p["col_indices"], p["values"], None, 40)
    wrapped = (p["crow_indices"], p["col_indices"] - 40, p["values"], None, 40)
    plain = csr_chain_cpu.CsrChain([csr_chain_cpu.CsrLayer.of(*args)], [False])
    negative = csr_chain_cpu.CsrChain([csr_chain_cpu.CsrLayer.of(*wrapped)], [False])
    for n in (1, 3, 100):
        x = torch.randn(n, 40, generator=g)
        assert torch.equal(negative(x), plain(x))


def test_chain_gives_the_same_bits_on_any_thread_count(monkeypatch) -> None:
    monkeypatch.setattr(csr_chain_cpu, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(csr_chain_cpu, "_CHUNK_WORK", 64)
    g = torch.Generator().manual_seed(4)
    chain, _ = _chain([50, 40, 30], [True, False], g)
    for n in (1, 5, 100):
        x = torch.randn(n, 50, generator=g)
        assert torch.equal(chain(x, threads=1), chain(x, threads=2))


def test_chain_leaves_its_input_alone_and_reuses_no_output() -> None:
    g = torch.Generator().manual_seed(9)
    chain, _ = _chain([40, 12], [False], g, bias=False, density=0.5)
    x = torch.randn(64, 40, generator=g)
    before = x.clone()
    first = chain(x)
    second = chain(2 * x)
    assert torch.equal(x, before) and first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(second, 2 * first)


def test_chain_refuses_mismatched_layers_and_inputs() -> None:
    g = torch.Generator().manual_seed(5)

    def layer(m, k):
        p = CSR.from_dense(_weight(m, k, 0.5, g), index_dtype=torch.int32).buffers()
        return csr_chain_cpu.CsrLayer.of(p["crow_indices"], p["col_indices"], p["values"], None, k)

    a, b = layer(8, 4), layer(3, 7)
    with pytest.raises(ValueError, match="layer 0 outputs 8 features, layer 1 takes 7"):
        csr_chain_cpu.CsrChain([a, b], [False, False])
    with pytest.raises(ValueError, match="2 relu flags"):
        csr_chain_cpu.CsrChain([a], [False, False])
    chain = csr_chain_cpu.CsrChain([a], [False])
    with pytest.raises(ValueError, match=r"expected \[N, 4\] float32"):
        chain(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"expected \[N, 4\] float32"):
        chain(torch.randn(2, 4, dtype=torch.float64))


CONVS = [  # (C, M, kernel, stride, padding, dilation, groups, H, W)
    (4, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 9, 7),
    (4, 8, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 2, 9, 7),
    (6, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6, 8, 8),
    (4, 8, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 5, 5),
    (4, 8, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, 5, 6),
    (3, 5, (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), 1, 11, 13),
    (4, 4, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1, 9, 9),
    (4, 4, (3, 3), (3, 3), (0, 0, 0, 0), (1, 1), 1, 10, 10),
    (8, 16, (7, 7), (1, 1), (3, 3, 3, 3), (1, 1), 8, 12, 12),
    (3, 8, (16, 16), (16, 16), (0, 0, 0, 0), (1, 1), 1, 32, 32),
    (4, 8, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1, 5, 5),
    (4, 4, (3, 3), (1, 2), (0, 2, 1, 0), (1, 1), 1, 6, 80),  # an output row wider than a tile
]


@pytest.mark.parametrize(("c", "m", "k", "s", "p", "d", "groups", "h", "w"), CONVS)
@pytest.mark.parametrize("n", [1, 3])
def test_conv_matches_conv2d(threads, c, m, k, s, p, d, groups, h, w, n) -> None:
    g = torch.Generator().manual_seed(c * m + h)
    weight = _weight(m, c // groups * k[0] * k[1], 0.4, g).reshape(m, c // groups, *k)
    bias = torch.randn(m, generator=g)
    packed = CSR.from_dense(weight, index_dtype=torch.int32).buffers()
    geometry = csr_conv_cpu.ConvGeometry(c, m, k, s, p, d, groups)
    conv = csr_conv_cpu.CsrConv(
        packed["crow_indices"], packed["col_indices"], packed["values"], bias, geometry
    )
    x = torch.randn(n, c, h, w, generator=g)
    xp = F.pad(x.double(), (p[2], p[3], p[0], p[1]))
    want = F.conv2d(xp, weight.double(), bias.double(), s, 0, d, groups)
    for relu in (False, True):
        y = conv(x, relu=relu, threads=threads)
        assert y.shape == want.shape and y.is_contiguous()
        ref = want.clamp_min(0) if relu else want
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())


def test_threads_follow_torch(monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert cpu_threads.num_threads() == min(64, cpu_threads._CPUS)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu_threads.num_threads() == 1


def test_a_call_finishes_without_helpers(monkeypatch) -> None:
    """Helpers that never run (their cores busy, or none exist after a fork) cost nothing:
    the calling thread claims every chunk."""
    monkeypatch.setattr(csr_chain_cpu, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(cpu_threads._POOL, "post", lambda *args: None)
    g = torch.Generator().manual_seed(6)
    chain, reference = _chain([30, 20], [True], g)
    x = torch.randn(100, 30, generator=g)
    torch.testing.assert_close(chain(x, threads=4).double(), reference(x), rtol=1e-5, atol=1e-5)


def test_concurrent_callers_get_their_own_results() -> None:
    g = torch.Generator().manual_seed(7)
    chain, reference = _chain([64, 48, 8], [True, False], g)
    xs = [torch.randn(96, 64, generator=g) for _ in range(4)]
    out: list = [None] * 4

    def work(i):
        for _ in range(20):
            out[i] = chain(xs[i], threads=2)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for x, y in zip(xs, out, strict=True):
        torch.testing.assert_close(y.double(), reference(x), rtol=1e-5, atol=1e-4)


def test_import_starts_no_thread_and_sets_no_thread_state() -> None:
    code = (
        "import threading, torch; before = torch.get_num_threads(); "
        "import ticketc.kernels.cpu_threads, ticketc.kernels.csr_chain_cpu; "
        "print(threading.active_count(), torch.get_num_threads() == before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "True"]
