"""CUDA versions of the two-layer op tests: the CUDA Gram (shared ATen/cuBLAS driver with the
CUDA epilogue kernels) and the CUDA JVP / VJP / NTK·v against the float64 dense reference and
the CPU ops.
Skipped without a GPU and lazyfast's CUDA kernels."""
from __future__ import annotations

import pytest
import torch

import lazyfast
from lazyfast import reference as R
from lazyfast._ops import two_layer as TL
from lazyfast._engine.two_layer import model_ntk
from lazyfast.models import ACTIVATIONS
from lazyfast.testing import assert_close_rel, knobs, rel_err
from two_layer_cases import inputs, make_model, tangents, upcast, weights

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and lazyfast._ext.HAS_CUDA_KERNELS),
                       reason="needs a CUDA device and lazyfast's CUDA kernels"),
]

DTYPES = (torch.float64, torch.float32)


def _cuda(*ts, dtype=None):
    return [None if t is None else t.to(device="cuda", dtype=dtype or t.dtype) for t in ts]


def _ref_ntk(x1, x2, A, c, B, s, act, mode):
    x1, x2, A, c, B = upcast(*[None if t is None else t.cpu() for t in (x1, x2, A, c, B)])
    return R.two_layer_ntk_dense(x1, x2, A, c, B, s, act, mode)


@pytest.fixture(autouse=True)
def _no_tf32():
    # Float32 tolerances (1e-5) assume IEEE float32 products in the cuBLAS GEMMs too.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("same", [False, True])
def test_cuda_ntk_matches_reference(dtype, activation, bias, k, mode, same):
    model = make_model(5, 70, k, activation, bias)
    A, c, B = _cuda(*weights(model), dtype=dtype)
    x1 = _cuda(inputs(131, 5), dtype=dtype)[0]
    x2 = None if same else _cuda(inputs(67, 5, seed=3), dtype=dtype)[0]
    out = TL.two_layer_ntk(x1, x2, A=A, B=B, c=c, scale=model.scale, activation=activation, mode=mode)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert_close_rel(out.cpu(), _ref_ntk(x1, x2, A, c, B, model.scale, activation, mode), dtype)
    if same:
        full = out if mode == "full" else out.unsqueeze(-1).unsqueeze(-1)
        assert torch.equal(full, full.permute(1, 0, 3, 2)), "symmetric kernel must be exactly symmetric"


@pytest.mark.parametrize("n", [1, 7, 129])
@pytest.mark.parametrize("m", [1, 33, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ntk_odd_sizes_many_chunks(n, m, dtype):
    with knobs(LAZYFAST_TWO_LAYER_WORKSPACE_BYTES="65536"):  # 64-neuron chunks
        model = make_model(7, m, 2, "gelu", bias=True)
        A, c, B = _cuda(*weights(model), dtype=dtype)
        x1, x2 = _cuda(inputs(n, 7), inputs(n + 130, 7, seed=2), dtype=dtype)
        for mode in ("trace", "full"):
            for xx2 in (None, x2):
                out = TL.two_layer_ntk(x1, xx2, A=A, B=B, c=c, scale=model.scale, activation="gelu", mode=mode)
                ref = _ref_ntk(x1, xx2, A, c, B, model.scale, "gelu", mode)
                rtol = None
                if dtype == torch.float32:
                    # With m = 1 the kernel has a single term per entry and cancellation in x1.x2 + 1:
                    # allow twice PyTorch's own float32 error on the same numbers (flash-attention's rule).
                    own = R.two_layer_ntk_dense(*(None if t is None else t.cpu() for t in (x1, xx2, A, c, B)),
                                                model.scale, "gelu", mode)
                    rtol = max(1e-5, 2 * rel_err(own, ref))
                assert_close_rel(out.cpu(), ref, dtype, rtol=rtol)


def test_cuda_ntk_agrees_with_cpu_op_and_oracle():
    model = make_model(4, 40, 3, "tanh", bias=True)
    x1, x2 = inputs(6, 4), inputs(5, 4, seed=1)
    oracle = R.ntk_oracle(model, x1, x2, mode="full")
    cpu = model_ntk(model, x1, x2, mode="full")
    gpu = model_ntk(model.cuda(), x1.cuda(), x2.cuda(), mode="full").cpu()
    assert_close_rel(gpu, oracle, torch.float64)
    assert_close_rel(gpu, cpu, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("k", [1, 3])
def test_cuda_products_match_reference(dtype, activation, k):
    model = make_model(6, 90, k, activation, bias=True)
    A64, c64, B64 = weights(model)
    A, c, B = _cuda(A64, c64, B64, dtype=dtype)
    w = dict(A=A, B=B, c=c, scale=model.scale, activation=activation)
    x, x2 = _cuda(inputs(33, 6), inputs(21, 6, seed=5), dtype=dtype)
    dA, dc, dB = _cuda(*tangents(4, 90, 6, k), dtype=dtype)
    ref = R.two_layer_jvp_dense(*upcast(x.cpu(), A.cpu(), c.cpu(), B.cpu()), model.scale, activation,
                                *upcast(dA.cpu(), dc.cpu(), dB.cpu()))
    assert_close_rel(TL.two_layer_jvp(x, dA=dA, dc=dc, dB=dB, **w).cpu(), ref, dtype)
    r = _cuda(inputs(33, k, seed=6), dtype=dtype)[0]
    want = R.two_layer_vjp_dense(*upcast(x.cpu(), A.cpu(), c.cpu(), B.cpu()), model.scale, activation,
                                 *upcast(r.cpu()))
    for got, ref in zip(TL.two_layer_vjp(x, r, **w), want):
        assert_close_rel(got.cpu(), ref, dtype)
    v = _cuda(inputs(21, k, seed=7), dtype=dtype)[0]
    ref = R.two_layer_ntk_vp_dense(*upcast(x.cpu(), x2.cpu(), A.cpu(), c.cpu(), B.cpu()), model.scale, activation,
                                   *upcast(v.cpu()))
    assert_close_rel(TL.two_layer_ntk_vp(x, v, x2, **w).cpu(), ref, dtype)


def test_cuda_noncontiguous_and_empty():
    model = make_model(5, 20, 2, "relu", bias=True)
    A, c, B = _cuda(*weights(model))
    w = dict(A=A.T.contiguous().T, B=B, c=c, scale=model.scale, activation="relu")
    x = inputs(6, 10).cuda()[:, ::2]
    out = TL.two_layer_ntk(x, x.flip(0), mode="full", **w)
    ref = R.two_layer_ntk_dense(x.cpu().contiguous(), x.flip(0).cpu().contiguous(), A.cpu(), c.cpu(), B.cpu(),
                                model.scale, "relu", "full")
    assert_close_rel(out.cpu(), ref, torch.float64)
    e = x[:0]
    assert TL.two_layer_ntk(e, x, **w).shape == (0, 6)
    assert TL.two_layer_jvp(e, dB=B[None], **w).shape == (1, 0, 2)
    gA, gc, gB = TL.two_layer_vjp(e, e[:, :2], **w)
    assert not gA.any() and not gB.any()


def test_cuda_gradcheck_and_opcheck():
    model = make_model(3, 6, 2, "tanh", bias=True)
    A, c, B = _cuda(*weights(model))
    w = dict(A=A, B=B, c=c, scale=model.scale, activation="tanh")
    x = inputs(4, 3).cuda()
    dA, dc, dB = (t.cuda().requires_grad_() for t in tangents(2, 6, 3, 2))
    assert torch.autograd.gradcheck(lambda a, b, e: TL.two_layer_jvp(x, dA=a, dc=b, dB=e, **w), (dA, dc, dB))
    r = inputs(4, 2, seed=2).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda rr: TL.two_layer_vjp(x, rr, **w), (r,))
    v = inputs(4, 2, seed=3).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda vv: TL.two_layer_ntk_vp(x, vv, **w), (v,))
    ops = torch.ops.lazyfast
    x2 = inputs(3, 3, seed=4).cuda()
    samples = [
        (ops.two_layer_ntk.default, (x, x2, A, c, B, 0.5, 3, False)),
        (ops.two_layer_ntk.default, (x, None, A, None, B, 0.5, 1, True)),
        (ops.two_layer_jvp.default, (x, A, c, B, 0.5, 2, dA.detach().requires_grad_(), None, None)),
        (ops.two_layer_vjp.default, (x, A, c, B, 0.5, 4, r.detach().requires_grad_())),
        (ops.two_layer_ntk_vp.default, (x, x2, A, c, B, 0.5, 0, inputs(3, 2).cuda().requires_grad_())),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_cuda_public_api_uses_fused():
    model = make_model(8, 256, 1, "relu").cuda()
    x = inputs(100, 8).cuda()
    fused = lazyfast.empirical_ntk(model, x)
    jac = lazyfast.empirical_ntk(model, x, implementation="jacobian")
    assert fused.is_cuda
    assert_close_rel(fused, jac, torch.float64)


def test_cuda_large_float32_against_float64():
    # A size where the kernel runs many tiles and several chunks: error stays at float32 level.
    model = make_model(100, 4096, 1, "relu")
    A, c, B = _cuda(*weights(model), dtype=torch.float32)
    x = _cuda(inputs(2048, 100), dtype=torch.float32)[0]
    out = TL.two_layer_ntk(x, A=A, B=B, c=c, scale=model.scale)
    ref = TL.two_layer_ntk(x.double(), A=A.double(), B=B.double(), scale=model.scale)
    assert_close_rel(out, ref, torch.float32)


def test_cuda_random_shapes_match_cpu():
    # Property test (hypothesis) over random shapes: CUDA ops equal the CPU ops in float64.
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=20, deadline=None, derandomize=True)
    @given(st.integers(0, 150), st.integers(0, 150), st.integers(1, 9), st.integers(1, 300), st.integers(1, 3),
           st.booleans(), st.booleans(), st.sampled_from(ACTIVATIONS), st.sampled_from(["trace", "full"]))
    def check(n1, n2, d, m, k, bias, same, act, mode):
        g = torch.Generator().manual_seed(n1 * 7919 + n2 * 104729 + m)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        A, B = r(m, d), r(k, m)
        c = r(m) if bias else None
        x1 = r(n1, d)
        x2 = None if same else r(n2, d)
        w = dict(A=A, B=B, c=c, scale=0.37, activation=act)
        wc = {key: (v.cuda() if isinstance(v, torch.Tensor) else v) for key, v in w.items()}
        cpu = TL.two_layer_ntk(x1, x2, mode=mode, **w)
        gpu = TL.two_layer_ntk(x1.cuda(), None if x2 is None else x2.cuda(), mode=mode, **wc)
        assert_close_rel(gpu.cpu(), cpu, torch.float64)
        v = r(n1 if same else n2, k)
        assert_close_rel(TL.two_layer_ntk_vp(x1.cuda(), v.cuda(), None if x2 is None else x2.cuda(), **wc).cpu(),
                         TL.two_layer_ntk_vp(x1, v, x2, **w), torch.float64)

    check()
