"""Pure-torch references and the torch.ops.ticketc custom ops on CPU."""

import pytest
import torch

from tests.models_for_tests import masked_weight
from ticketc import ops
from ticketc.formats import BSR, CSR, Tiled
from ticketc.ops import registration

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR) tensor support is in beta")
TILED_KEYS = ("tile_crow", "tile_col", "tile_offsets", "row_offsets", "bitmaps", "values")


def rand(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def dense_ref(x, w, bias):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def assert_matches(y, ref, dtype):
    assert torch.isfinite(y).all()
    scale = ref.abs().max().item() + 1.0
    assert (y.double() - ref).abs().max().item() <= TOL[dtype] * scale


def csr_args(w, x, bias, **kw):
    p = CSR.from_dense(w, **kw).buffers()
    return (x, p["crow_indices"], p["col_indices"], p["values"], p["row_order"], bias)


def bsr_args(w, x, bias, blocksize):
    p = BSR.from_dense(w, blocksize).buffers()
    return (x, p["crow_indices"], p["col_indices"], p["values"], bias, w.shape[0])


def tiled_args(w, x, bias, tile_m=32):
    p = Tiled.from_dense(w, tile_m=tile_m).buffers()
    return (x, *(p[key] for key in TILED_KEYS), bias, w.shape[0])


# ---------------------------------------------------------------------------- references


@pytest.mark.parametrize("density", [0.0, 0.036, 1.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_references_match_dense_float64(density, with_bias):
    w = masked_weight(37, 70, density).double()
    x = rand(5, 70).double()
    bias = rand(37, seed=2).double() if with_bias else None
    ref = dense_ref(x, w, bias)
    for y in (
        ops.csr_linear_reference(*csr_args(w, x, bias)),
        ops.bsr_linear_reference(*bsr_args(w, x, bias, 16)),
        ops.tiled_linear_reference(*tiled_args(w, x, bias)),
    ):
        assert y.dtype == torch.float64
        assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- ops on the CPU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 17, 40])
def test_ops_on_cpu_match_dense(dtype, n):
    w = masked_weight(37, 70, 0.1, dtype=dtype)
    x, bias = rand(n, 70, dtype=dtype), rand(37, seed=2, dtype=dtype)
    ref = dense_ref(x, w, bias)
    outputs = [
        torch.ops.ticketc.csr_linear(*csr_args(w, x, bias)),
        torch.ops.ticketc.csr_linear(*csr_args(w, x, bias, index_dtype=torch.int32)),
        torch.ops.ticketc.bsr_linear(*bsr_args(w, x, bias, 16)),
        torch.ops.ticketc.bsr_linear(*bsr_args(w, x, bias, 5)),
        torch.ops.ticketc.tiled_linear(*tiled_args(w, x, bias)),
    ]
    for y in outputs:
        assert y.shape == (n, 37) and y.dtype == dtype
        if n:
            assert_matches(y, ref, dtype)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 31, 65])  # rows kernel (1), columns kernel, ragged chunks
def test_cpu_csr_op_is_row_major_in_every_dtype(dtype, n):
    w = masked_weight(37, 70, 0.1, dtype=dtype)
    bias = rand(37, seed=2, dtype=dtype)
    x = rand(n, 70, seed=n, dtype=dtype)
    y = torch.ops.ticketc.csr_linear(*csr_args(w, x, bias))
    assert y.dtype == dtype and y.shape == (n, 37) and y.is_contiguous()
    ref = dense_ref(x, w, bias)
    if dtype == torch.float64:  # fp64 runs on MKL: fp64 accumulation
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    else:
        assert_matches(y, ref, dtype)


@pytest.mark.parametrize("n", [1, 40])  # the rows and the columns kernel
def test_cpu_csr_refuses_an_input_narrower_than_the_weight(n):
    w = masked_weight(20, 30, 0.5)
    args = csr_args(w, rand(1, 30), None)[1:]
    with pytest.raises(ValueError, match="out of range for 10 input features"):
        torch.ops.ticketc.csr_linear(rand(n, 10), *args)


def chain_args(widths, density, x, relus, seed=0):
    layers = [masked_weight(m, k, density, seed=seed + i) for i, (k, m) in
              enumerate(zip(widths, widths[1:], strict=False))]  # fmt: skip
    packed = [CSR.from_dense(w).buffers() for w in layers]
    biases = [rand(w.shape[0], seed=seed + 10 + i) if i % 2 == 0 else None
              for i, w in enumerate(layers)]  # fmt: skip
    args = (x, [p["crow_indices"] for p in packed], [p["col_indices"] for p in packed],
            [p["values"] for p in packed], biases, relus)  # fmt: skip
    ref = x.double()
    for w, b, relu in zip(layers, biases, relus, strict=True):
        ref = dense_ref(ref, w, b)
        ref = ref.clamp_min(0) if relu else ref
    return args, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 3, 40])
def test_csr_chain_op_matches_its_layers(dtype, n):
    x = rand(n, 30, dtype=dtype)
    args, ref = chain_args([30, 20, 17, 5], 0.3, x, [True, False, True])
    y = torch.ops.ticketc.csr_chain(*args)
    assert y.shape == (n, 5) and y.dtype == dtype
    assert_matches(y, ref, dtype) if dtype != torch.float64 else torch.testing.assert_close(
        y, ref, rtol=1e-12, atol=1e-12
    )
    twin = registration._csr_chain_default(*args)  # the reference, layer by layer
    assert_matches(twin, ref, dtype) if dtype != torch.float64 else torch.testing.assert_close(
        twin, ref, rtol=1e-12, atol=1e-12
    )


def test_csr_chain_op_rejects_mismatched_lists():
    x = rand(2, 30)
    args, _ = chain_args([30, 20, 5], 0.3, x, [True, False])
    with pytest.raises(ValueError, match="one per layer"):
        torch.ops.ticketc.csr_chain(x, args[1], args[2], args[3], args[4], [True])


def conv_args(x, weight_shape, density, stride, padding, dilation, groups, relu, bias=True):
    w = masked_weight(weight_shape[0], int(torch.Size(weight_shape[1:]).numel()), density)
    w = w.reshape(weight_shape)
    p = CSR.from_dense(w).buffers()
    b = rand(weight_shape[0], seed=3) if bias else None
    args = (x, p["crow_indices"], p["col_indices"], p["values"], b, list(weight_shape),
            list(stride), list(padding), list(dilation), groups, relu)  # fmt: skip
    pt, pb, pl, pr = padding
    xp = torch.nn.functional.pad(x.double(), (pl, pr, pt, pb))
    ref = torch.nn.functional.conv2d(xp, w.double(), None if b is None else b.double(),
                                     tuple(stride), 0, tuple(dilation), groups)  # fmt: skip
    return args, ref.clamp_min(0) if relu else ref


CONVS = [  # weight_shape, stride, padding (t, b, l, r), dilation, groups
    ((8, 4, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((8, 2, 3, 3), (2, 1), (1, 1, 0, 2), (1, 1), 2),  # asymmetric padding, groups
    ((6, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 6),  # depthwise, stride 2
    ((5, 4, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # 1x1: read in place
    ((5, 4, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),  # 1x1 stride 2: subsampled plane
    ((4, 4, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),  # dilation
    ((3, 4, 4, 4), (4, 4), (0, 0, 0, 0), (1, 1), 1),  # patchify (ViT, ConvNeXt stems)
    ((4, 4, 1, 5), (1, 3), (0, 0, 2, 2), (1, 1), 1),  # a Conv1d as a height of 1
]


@pytest.mark.parametrize(("shape", "stride", "padding", "dilation", "groups"), CONVS)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("relu", [False, True])
def test_csr_conv2d_op_matches_conv2d(shape, stride, padding, dilation, groups, n, relu):
    h = 1 if shape[2] == 1 and shape[3] == 5 else 11
    x = rand(n, shape[1] * groups, h, 13)
    args, ref = conv_args(x, shape, 0.4, stride, padding, dilation, groups, relu)
    y = torch.ops.ticketc.csr_conv2d(*args)
    assert y.shape == ref.shape and y.is_contiguous()
    assert_matches(y, ref, torch.float32)
    assert_matches(ops.csr_conv2d_reference(*args), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_csr_conv2d_op_in_other_dtypes(dtype):
    x = rand(2, 4, 9, 9, dtype=dtype)
    args, ref = conv_args(x, (8, 4, 3, 3), 0.3, (1, 1), (1, 1, 1, 1), (1, 1), 1, False)
    args = (x, *args[1:3], args[3].to(dtype), args[4].to(dtype), *args[5:])
    y = torch.ops.ticketc.csr_conv2d(*args)
    assert y.dtype == dtype
    assert_matches(y, ref, dtype) if dtype != torch.float64 else torch.testing.assert_close(
        y, ref, rtol=1e-10, atol=1e-10
    )


def test_csr_conv2d_op_rejects_bad_arguments():
    x = rand(1, 5, 9, 9)
    args, _ = conv_args(rand(1, 4, 9, 9), (8, 4, 3, 3), 0.3, (1, 1), (1,) * 4, (1, 1), 1, False)
    with pytest.raises(ValueError, match="x has 5 channels"):
        torch.ops.ticketc.csr_conv2d(x, *args[1:])


@pytest.mark.parametrize("n", [1, 5])
def test_eager_entry_points_match_the_registered_ops(n):
    w, x, bias = masked_weight(37, 70, 0.1), rand(n, 70), rand(37, seed=2)
    pairs = [
        (ops.csr_linear, torch.ops.ticketc.csr_linear, csr_args(w, x, bias)),
        (ops.bsr_linear, torch.ops.ticketc.bsr_linear, bsr_args(w, x, bias, 16)),
        (ops.tiled_linear, torch.ops.ticketc.tiled_linear, tiled_args(w, x, bias)),
    ]
    for fast, registered, args in pairs:
        y, z = fast(*args), registered(*args)
        assert torch.equal(y, z) and y.stride() == z.stride()
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.csr_linear(*csr_args(w, x, torch.ones(3)))


def test_ops_without_bias_and_on_an_all_zero_weight():
    x = rand(3, 20)
    w = torch.zeros(6, 20)
    assert torch.equal(torch.ops.ticketc.csr_linear(*csr_args(w, x, None)), torch.zeros(3, 6))
    assert torch.equal(torch.ops.ticketc.bsr_linear(*bsr_args(w, x, None, 16)), torch.zeros(3, 6))
    assert torch.equal(torch.ops.ticketc.tiled_linear(*tiled_args(w, x, None)), torch.zeros(3, 6))


@pytest.mark.parametrize("n", [1, 3])
def test_opcheck_chain_and_conv(n):
    checks = ("test_schema", "test_faketensor")
    args, _ = chain_args([30, 20, 5], 0.3, rand(n, 30), [True, False])
    torch.library.opcheck(torch.ops.ticketc.csr_chain.default, args, test_utils=checks)
    args, _ = conv_args(rand(n, 4, 9, 9), (8, 2, 3, 3), 0.3, (2, 1), (1, 1, 0, 2), (1, 1), 2, True)
    torch.library.opcheck(torch.ops.ticketc.csr_conv2d.default, args, test_utils=checks)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("op", ["csr", "bsr", "tiled"])
def test_opcheck(op, n):
    w = masked_weight(20, 40, 0.2)
    x, bias = rand(n, 40), rand(20, seed=2)
    args = {"csr": csr_args(w, x, bias), "bsr": bsr_args(w, x, bias, 16),
            "tiled": tiled_args(w, x, bias)}[op]  # fmt: skip
    target = getattr(torch.ops.ticketc, f"{op}_linear").default
    torch.library.opcheck(target, args, test_utils=("test_schema", "test_faketensor"))


class _SparseLinear(torch.nn.Module):
    def __init__(self, w, bias):
        super().__init__()
        for name, t in CSR.from_dense(w).buffers().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)

    def forward(self, x):
        # the eager entry point: must hand tracing over to torch.ops.ticketc.csr_linear
        return ops.csr_linear(
            x, self.crow_indices, self.col_indices, self.values, self.row_order, self.bias
        )


def test_csr_op_under_torch_compile():
    w, bias = masked_weight(20, 40, 0.2), rand(20, seed=2)
    module = _SparseLinear(w, bias)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = rand(4, 40)
    assert_matches(compiled(x), dense_ref(x, w, bias), torch.float32)


def test_csr_op_under_torch_export():
    w, bias = masked_weight(20, 40, 0.2), rand(20, seed=2)
    x = rand(4, 40)
    exported = torch.export.export(_SparseLinear(w, bias), (x,))
    targets = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    assert torch.ops.ticketc.csr_linear.default in targets
    assert_matches(exported.module()(x), dense_ref(x, w, bias), torch.float32)


def test_ops_reject_bad_arguments():
    w, x = masked_weight(8, 16, 0.5), rand(2, 16)
    args = list(csr_args(w, x, None))
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.ticketc.csr_linear(x[None], *args[1:])
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.ticketc.csr_linear(*args[:5], torch.ones(3))
    with pytest.raises(TypeError, match="crow_indices"):
        torch.ops.ticketc.csr_linear(x, args[1].float(), *args[2:])
    with pytest.raises(ValueError, match="out_features=30"):
        torch.ops.ticketc.bsr_linear(*bsr_args(w, x, None, 4)[:5], 30)
    with pytest.raises(ValueError, match="out_features=40"):
        torch.ops.ticketc.tiled_linear(*tiled_args(w, x, None)[:8], 40)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 16, 64])
def test_ops_on_cuda_match_dense(dtype, n):
    w = masked_weight(300, 784, 0.05, dtype=dtype).cuda()
    x, bias = rand(n, 784, dtype=dtype).cuda(), rand(300, seed=2, dtype=dtype).cuda()
    ref = dense_ref(x, w, bias)
    outputs = [
        torch.ops.ticketc.csr_linear(*csr_args(w, x, bias)),
        torch.ops.ticketc.bsr_linear(*bsr_args(w, x, bias, 16)),
        torch.ops.ticketc.bsr_linear(*bsr_args(w, x, bias, 32)),
        torch.ops.ticketc.tiled_linear(*tiled_args(w, x, bias)),
    ]
    for y in outputs:
        assert y.device.type == "cuda" and y.shape == (n, 300) and y.dtype == dtype
        assert_matches(y, ref, dtype)
