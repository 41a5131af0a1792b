"""Triton kernels against a float64 oracle: on a GPU when present, else in the interpreter.

Outputs are NaN-poisoned before each launch so a tile the kernel forgets to write fails.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of ticketc.kernels: @triton.jit picks interpreter mode then.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from ticketc.formats import BSR, CSR, Tiled  # noqa: E402
from ticketc.kernels import bsr_linear, csr_linear, tiled_linear  # noqa: E402
from ticketc.kernels._launch import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreting(), reason="no GPU and Triton not in interpreter mode"
)

SHAPES = [(1, 70), (37, 1), (37, 70), (70, 130)]  # 1 x K, M x 1, ragged both ways
DENSITIES = [0.0, 0.001, 0.036, 0.5, 1.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def make_weight(m: int, k: int, density: float, dtype: torch.dtype, seed: int = 0):
    """Random masked weight with, where there is room, one empty and one full row."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(m, k, generator=gen) < density
    if m >= 3 and 0.0 < density < 1.0:
        keep[0] = False
        keep[m // 2] = True
    w = torch.randn(m, k, generator=gen) * keep
    return w.to(dtype), keep


def make_x(n: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen).to(dtype)


def assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias) -> None:
    """|y - x W^T| within output rounding plus fp32 accumulation error, all finite."""
    assert y.dtype == x.dtype
    x64, w64 = x.double().cpu(), w.double().cpu()
    ref = x64 @ w64.T
    if bias is not None:
        ref += bias.double().cpu()
    scale = x64.abs() @ w64.abs().T + (0 if bias is None else bias.double().cpu().abs())
    tol = 2 * UNIT_ROUNDOFF[x.dtype] * ref.abs() + 1e-6 * scale + 1e-30
    got = y.double().cpu()
    assert torch.isfinite(got).all(), "unwritten (NaN) or overflowed outputs"
    err = (got - ref).abs()
    assert (err <= tol).all(), (
        f"max error {err.max().item():.3g}, worst ratio {(err / tol).max():.3g}"
    )


def poisoned(n: int, m: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n, m), float("nan"), dtype=dtype, device=DEVICE)


def to_device(buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.to(DEVICE) for name, t in buffers.items()}


def bias_for(m: int, dtype: torch.dtype, with_bias: bool):
    return (
        torch.randn(m, generator=torch.Generator().manual_seed(2)).to(dtype) if with_bias else None
    )


def run_csr(x, w, bias, config=None):
    p = to_device(CSR.from_dense(w).buffers())
    out = poisoned(x.shape[0], w.shape[0], x.dtype)
    b = None if bias is None else bias.to(DEVICE)
    y = csr_linear(x.to(DEVICE), p["crow_indices"], p["col_indices"], p["values"],
                   p["row_order"], b, config=config, out=out)  # fmt: skip
    assert y.data_ptr() == out.data_ptr()
    return y


def run_bsr(x, w, bias, blocksize, config=None):
    p = to_device(BSR.from_dense(w, blocksize).buffers())
    out = poisoned(x.shape[0], w.shape[0], x.dtype)
    b = None if bias is None else bias.to(DEVICE)
    return bsr_linear(x.to(DEVICE), p["crow_indices"], p["col_indices"], p["values"], b,
                      w.shape[0], config=config, out=out)  # fmt: skip


TILED_KEYS = ("tile_crow", "tile_col", "tile_offsets", "row_offsets", "bitmaps", "values")


def run_tiled(x, w, bias, tile_m, config=None):
    p = to_device(Tiled.from_dense(w, tile_m=tile_m).buffers())
    out = poisoned(x.shape[0], w.shape[0], x.dtype)
    b = None if bias is None else bias.to(DEVICE)
    return tiled_linear(x.to(DEVICE), *(p[key] for key in TILED_KEYS), b, w.shape[0],
                        config=config, out=out)  # fmt: skip


# ------------------------------------------------------------------------------------ CSR


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_csr_shapes_densities(shape, density):
    m, k = shape
    w, _ = make_weight(m, k, density, torch.float32)
    x = make_x(3, k, torch.float32)
    bias = bias_for(m, torch.float32, with_bias=density > 0.01)
    assert_close(run_csr(x, w, bias), x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 16, 19])
def test_csr_dtypes_and_batches(dtype, n):
    w, _ = make_weight(37, 70, 0.2, dtype)
    x = make_x(n, 70, dtype)
    bias = bias_for(37, dtype, with_bias=True)
    assert_close(run_csr(x, w, bias), x, w, bias)


@pytest.mark.parametrize(
    "config",
    [
        {"ROWS": 1, "BLOCK_NNZ": 16, "BLOCK_N": 1, "num_warps": 1},
        {"ROWS": 4, "BLOCK_NNZ": 16, "BLOCK_N": 2, "num_warps": 2},  # rows span several chunks
        {"ROWS": 8, "BLOCK_NNZ": 64, "BLOCK_N": 4, "num_warps": 4},  # rows past M are masked
    ],
)
def test_csr_launch_configs(config):
    w, _ = make_weight(37, 130, 0.3, torch.float16, seed=3)
    x = make_x(5, 130, torch.float16)
    assert_close(run_csr(x, w, None, config), x, w, None)


def test_csr_int32_indices_and_noncontiguous_x():
    w, _ = make_weight(20, 40, 0.3, torch.float32)
    p = to_device(CSR.from_dense(w, index_dtype=torch.int32).buffers())
    x = make_x(40, 6, torch.float32).t()  # [6, 40] with strides (1, 6)
    y = csr_linear(x.to(DEVICE), p["crow_indices"], p["col_indices"], p["values"], p["row_order"])
    assert_close(y, x, w, None)


# ------------------------------------------------------------------------------------ BSR


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bsr_shapes_densities(shape, density):
    m, k = shape
    w, _ = make_weight(m, k, density, torch.float32)
    x = make_x(3, k, torch.float32)
    bias = bias_for(m, torch.float32, with_bias=True)
    assert_close(run_bsr(x, w, bias, 16), x, w, bias)


@pytest.mark.parametrize("blocksize", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bsr_dtypes_blocksizes(dtype, blocksize):
    m, k = 70, 100
    gen = torch.Generator().manual_seed(4)
    # block-pruned: whole b x b blocks kept or dropped, one ragged edge block row/column
    blocks = torch.rand(-(-m // blocksize), -(-k // blocksize), generator=gen) < 0.5
    keep = blocks.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1)[:m, :k]
    w = (torch.randn(m, k, generator=gen) * keep).to(dtype)
    x = make_x(20, k, dtype)
    bias = bias_for(m, dtype, with_bias=True)
    assert_close(run_bsr(x, w, bias, blocksize), x, w, bias)


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bsr_split_k(split_k, dtype):
    w, _ = make_weight(40, 128, 0.3, dtype, seed=5)
    x = make_x(5, 128, dtype)
    bias = bias_for(40, dtype, with_bias=True)
    y = run_bsr(x, w, bias, 16, {"SPLIT_K": split_k, "BLOCK_N": 16})
    assert_close(y, x, w, bias)


# ---------------------------------------------------------------------------------- tiled


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_tiled_shapes_densities(shape, density):
    m, k = shape
    w, _ = make_weight(m, k, density, torch.float32)
    x = make_x(3, k, torch.float32)
    bias = bias_for(m, torch.float32, with_bias=True)
    assert_close(run_tiled(x, w, bias, 16), x, w, bias)


@pytest.mark.parametrize("tile_m", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_dtypes_tile_sizes(dtype, tile_m):
    w, _ = make_weight(70, 100, 0.3, dtype)
    w[:, 31] = 1  # bit 31 of the bitmap word: the sign bit of an int32
    x = make_x(20, 100, dtype)
    bias = bias_for(70, dtype, with_bias=tile_m != 32)
    assert_close(run_tiled(x, w, bias, tile_m), x, w, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiled_split_k(dtype):
    w, _ = make_weight(40, 200, 0.3, dtype, seed=6)
    x = make_x(5, 200, dtype)
    bias = bias_for(40, dtype, with_bias=True)
    assert_close(run_tiled(x, w, bias, 32, {"SPLIT_K": 3}), x, w, bias)


# --------------------------------------------------------------------------------- errors


def test_wrappers_reject_bad_inputs(monkeypatch):
    w, _ = make_weight(8, 16, 0.5, torch.float32)
    p = to_device(CSR.from_dense(w).buffers())
    args = (p["crow_indices"], p["col_indices"], p["values"], p["row_order"])
    with pytest.raises(TypeError, match="x must be float32"):
        csr_linear(torch.ones(2, 16, dtype=torch.int32, device=DEVICE), *args)
    with pytest.raises(ValueError, match="bias must have shape"):
        csr_linear(make_x(2, 16, torch.float32).to(DEVICE), *args, torch.ones(3, device=DEVICE))
    q = to_device(BSR.from_dense(w, 8).buffers())
    with pytest.raises(ValueError, match="blocksize must be one of"):
        bsr_linear(make_x(2, 16, torch.float32).to(DEVICE), q["crow_indices"],
                   q["col_indices"], q["values"], None, 8)  # fmt: skip
    q = to_device(BSR.from_dense(w, 16).buffers())
    with pytest.raises(ValueError, match="out_features=40"):
        bsr_linear(make_x(2, 16, torch.float32).to(DEVICE), q["crow_indices"],
                   q["col_indices"], q["values"], None, 40)  # fmt: skip
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA tensors"):
            csr_linear(make_x(2, 16, torch.float32), *args)


# ------------------------------------------------------------------------------- autotune


def test_pick_config_times_candidates_once_per_key(monkeypatch):
    import triton.testing

    from ticketc.kernels import _launch

    monkeypatch.setattr(_launch, "_TUNED", {})
    calls = []

    def fake_bench(fn, **kwargs):
        fn()
        return calls[-1]["cost"]

    def launch(cfg):
        if cfg.get("broken"):
            raise RuntimeError("out of resources")
        calls.append(cfg)

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    default = {"cost": 3.0}
    candidates = [{"cost": 2.0}, {"broken": True}, {"cost": 1.0}, {"cost": 5.0}]
    assert _launch.pick_config(("k", 1), default, candidates, launch) == {"cost": 1.0}
    assert len(calls) == 4  # the broken candidate is skipped
    assert _launch.pick_config(("k", 1), default, candidates, launch) == {"cost": 1.0}
    assert len(calls) == 4, "a tuned key is served from the cache"
    assert _launch.pick_config(("k", 2), default, [{"broken": True}], launch) == default


def test_autotuning_is_opt_in_and_cuda_only(monkeypatch):
    from ticketc.kernels._launch import autotuning

    monkeypatch.setenv("TICKETC_AUTOTUNE", "1")
    assert not autotuning(torch.device("cpu"))
    assert autotuning(torch.device("cuda", 0))
    monkeypatch.setenv("TICKETC_AUTOTUNE", "0")
    assert not autotuning(torch.device("cuda", 0))
