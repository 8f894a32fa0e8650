"""Fused two-layer ops (lazyfast.two_layer) against the dense reference, the generic
torch.func references and the per-example-gradient oracle, on the CPU."""
from __future__ import annotations

import copy

import pytest
import torch

import lazyfast
from lazyfast import reference as R
from lazyfast._ops import two_layer as TL
from lazyfast._engine.two_layer import model_ntk
from lazyfast.models import ACTIVATIONS
from lazyfast.testing import RTOL, assert_close_rel, knobs
from two_layer_cases import inputs, make_model, tangents, upcast, weights

pytestmark = pytest.mark.skipif(lazyfast._ext._C is None, reason="lazyfast._C not built")

DTYPES = (torch.float64, torch.float32)


def _dense_ntk(x1, x2, A, c, B, scale, act, mode):
    """Dense reference evaluated in float64 from the same (possibly float32) numbers."""
    x1, x2, A, c, B = upcast(x1, x2, A, c, B)
    return R.two_layer_ntk_dense(x1, x2, A, c, B, scale, act, mode)


# ----------------------------------------------------------------------------- eNTK
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("same", [False, True])
def test_ntk_matches_dense_and_oracle(dtype, activation, bias, k, mode, same):
    model = make_model(5, 33, k, activation, bias, dtype=dtype)
    A, c, B = weights(model)
    x1 = inputs(7, 5, dtype)
    x2 = None if same else inputs(4, 5, dtype, seed=3)
    out = TL.two_layer_ntk(x1, x2, A=A, B=B, c=c, scale=model.scale, activation=activation, mode=mode)
    assert out.dtype == dtype
    ref = _dense_ntk(x1, x2, A, c, B, model.scale, activation, mode)
    assert_close_rel(out, ref, dtype, what="fused vs dense")
    if dtype == torch.float64:
        oracle = R.ntk_oracle(model, x1, x2, mode=mode)
        assert_close_rel(out, oracle, dtype, what="fused vs oracle")
        assert_close_rel(ref, oracle, dtype, what="dense vs oracle")


@pytest.mark.parametrize("n", [1, 7, 129])
@pytest.mark.parametrize("m", [1, 33, 1000])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_ntk_odd_sizes(n, m, activation):
    model = make_model(6, m, 2, activation, bias=True)
    A, c, B = weights(model)
    x1, x2 = inputs(n, 6), inputs(n + 2, 6, seed=5)
    for mode in ("trace", "full"):
        for xx2 in (None, x2):
            out = TL.two_layer_ntk(x1, xx2, A=A, B=B, c=c, scale=model.scale, activation=activation, mode=mode)
            assert_close_rel(out, _dense_ntk(x1, xx2, A, c, B, model.scale, activation, mode), torch.float64)
    if n <= 7:
        jac = R.ntk_jacobian(model, x1, x2, mode="full")
        out = model_ntk(model, x1, x2, mode="full")
        assert_close_rel(out, jac, torch.float64, what="fused vs torch.func Jacobian contraction")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("same", [False, True])
def test_ntk_many_chunks_and_blocks(dtype, mode, same):
    # A 64 KiB workspace forces row blocks of ~30 rows and 64-neuron chunks.
    with knobs(LAZYFAST_TWO_LAYER_WORKSPACE_BYTES="65536"):
        model = make_model(4, 1000, 3, "gelu", bias=True, dtype=dtype)
        A, c, B = weights(model)
        x1, x2 = inputs(129, 4, dtype), inputs(70, 4, dtype, seed=9)
        xx2 = None if same else x2
        out = TL.two_layer_ntk(x1, xx2, A=A, B=B, c=c, scale=model.scale, activation="gelu", mode=mode)
        assert_close_rel(out, _dense_ntk(x1, xx2, A, c, B, model.scale, "gelu", mode), dtype)


def test_ntk_symmetric_output_is_symmetric():
    model = make_model(8, 300, 1, "relu")
    A, c, B = weights(model)
    x = inputs(200, 8)
    out = TL.two_layer_ntk(x, A=A, B=B, c=c, scale=model.scale)
    assert torch.equal(out, out.T)
    full = TL.two_layer_ntk(x, A=A, B=B, c=c, scale=model.scale, mode="full")
    assert torch.equal(full, full.permute(1, 0, 3, 2))


def test_ntk_noncontiguous_inputs():
    model = make_model(5, 40, 3, "softplus", bias=True)
    A, c, B = weights(model)
    big = inputs(9, 10)
    x1 = big[:, ::2]  # (9, 5), column stride 2
    x2 = inputs(5, 6).T.contiguous().T[:, :5]  # transposed storage
    At = A.T.contiguous().T  # column-major A
    Bt = torch.cat([B, B], 1)[:, ::2] * 0 + B  # fresh values, strided storage
    Bs = torch.empty(3, 80, dtype=B.dtype)[:, ::2]
    Bs.copy_(B)
    cs = torch.empty(80, dtype=c.dtype)[::2]
    cs.copy_(c)
    assert not (x1.is_contiguous() or x2.is_contiguous() or At.is_contiguous() or Bs.is_contiguous())
    for mode in ("trace", "full"):
        out = TL.two_layer_ntk(x1, x2, A=At, B=Bs, c=cs, scale=0.3, activation="softplus", mode=mode)
        ref = R.two_layer_ntk_dense(x1.contiguous(), x2.contiguous(), A, c, Bt, 0.3, "softplus", mode)
        assert_close_rel(out, ref, torch.float64)


@pytest.mark.parametrize("mode", ["trace", "full"])
def test_ntk_empty_batches(mode):
    model = make_model(3, 10, 2)
    A, c, B = weights(model)
    e, x = inputs(0, 3), inputs(4, 3)
    kw = dict(A=A, B=B, c=c, scale=model.scale, mode=mode)
    tail = (2, 2) if mode == "full" else ()
    assert TL.two_layer_ntk(e, **kw).shape == (0, 0) + tail
    assert TL.two_layer_ntk(e, x, **kw).shape == (0, 4) + tail
    out = TL.two_layer_ntk(x, e, **kw)
    assert out.shape == (4, 0) + tail


# ----------------------------------------------------------------------------- JVP / VJP / NTK·v
def _param_dict(model, dA, dc, dB):
    d = {"hidden.weight": dA, "output.weight": dB}
    if model.hidden.bias is not None:
        d["hidden.bias"] = dc
    return {k: v for k, v in d.items() if v is not None}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_jvp_vjp_ntkvp_match_references(dtype, activation, bias, k):
    model = make_model(5, 33, k, activation, bias, dtype=dtype)
    A, c, B = weights(model)
    x, x2 = inputs(7, 5, dtype), inputs(4, 5, dtype, seed=4)
    dA, dc, dB = tangents(3, 33, 5, k, dtype)
    dc = dc if bias else None
    s = model.scale
    m64 = copy.deepcopy(model).double()  # the same numbers, differentiated in float64
    ref_j = R.jvp(m64, *upcast(x), _param_dict(m64, *upcast(dA, dc, dB)))
    out_j = TL.two_layer_jvp(x, A=A, B=B, c=c, scale=s, activation=activation, dA=dA, dc=dc, dB=dB)
    assert out_j.shape == (3, 7, k)
    assert_close_rel(out_j, ref_j, dtype, what="jvp vs torch.func")
    assert_close_rel(R.two_layer_jvp_dense(*upcast(x, A, c, B), s, activation, *upcast(dA, dc, dB)), ref_j,
                     torch.float64, what="dense jvp vs torch.func")

    r = inputs(7, k, dtype, seed=6)
    ref_v = R.vjp(m64, *upcast(x, r))
    gA, gc, gB = TL.two_layer_vjp(x, r, A=A, B=B, c=c, scale=s, activation=activation)
    assert_close_rel(gA, ref_v["hidden.weight"], dtype, what="vjp dA")
    assert_close_rel(gB, ref_v["output.weight"], dtype, what="vjp dB")
    if bias:
        assert_close_rel(gc, ref_v["hidden.bias"], dtype, what="vjp dc")

    v = inputs(4, k, dtype, seed=7)
    ref_n = R.ntk_vp(m64, *upcast(x, v, x2))
    out_n = TL.two_layer_ntk_vp(x, v, x2, A=A, B=B, c=c, scale=s, activation=activation)
    assert_close_rel(out_n, ref_n, dtype, what="ntk_vp vs torch.func")
    v1 = inputs(7, k, dtype, seed=8)
    out_s = TL.two_layer_ntk_vp(x, v1, A=A, B=B, c=c, scale=s, activation=activation)
    assert_close_rel(out_s, R.ntk_vp(m64, *upcast(x, v1)), dtype, what="ntk_vp x2=None")
    if dtype == torch.float64:
        # Θ·v equals the oracle Gram times v.
        full = R.ntk_oracle(model, x, x2, mode="full")
        assert_close_rel(out_n, torch.einsum("ijab,jb->ia", full, v), dtype, what="ntk_vp vs oracle Θ·v")


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("which", ["dA", "dc", "dB", "dA+dc"])
def test_jvp_tangent_subsets(k, which):
    model = make_model(4, 50, k, "tanh", bias=True)
    A, c, B = weights(model)
    x = inputs(9, 4)
    dA, dc, dB = tangents(2, 50, 4, k)
    kw = {n: t for n, t in (("dA", dA), ("dc", dc), ("dB", dB)) if n in which}
    out = TL.two_layer_jvp(x, A=A, B=B, c=c, scale=model.scale, activation="tanh", **kw)
    names = {"dA": "hidden.weight", "dc": "hidden.bias", "dB": "output.weight"}
    ref = R.jvp(model, x, {names[n]: t for n, t in kw.items()})
    assert_close_rel(out, ref, torch.float64)


@pytest.mark.parametrize("n", [1, 7, 129])
@pytest.mark.parametrize("m", [1, 33, 1000])
def test_products_odd_sizes_and_small_workspace(n, m):
    with knobs(LAZYFAST_TWO_LAYER_WORKSPACE_BYTES="65536"):
        model = make_model(6, m, 3, "gelu", bias=True)
        A, c, B = weights(model)
        w = dict(A=A, B=B, c=c, scale=model.scale, activation="gelu")
        x = inputs(n, 6)
        dA, dc, dB = tangents(5, m, 6, 3)
        assert_close_rel(TL.two_layer_jvp(x, dA=dA, dc=dc, dB=dB, **w),
                         R.two_layer_jvp_dense(x, A, c, B, model.scale, "gelu", dA, dc, dB), torch.float64)
        r = inputs(n, 3, seed=2)
        for got, want in zip(TL.two_layer_vjp(x, r, **w), R.two_layer_vjp_dense(x, A, c, B, model.scale, "gelu", r)):
            assert_close_rel(got, want, torch.float64)
        x2 = inputs(n + 3, 6, seed=3)
        v = inputs(n + 3, 3, seed=4)
        assert_close_rel(TL.two_layer_ntk_vp(x, v, x2, **w),
                         R.two_layer_ntk_vp_dense(x, x2, A, c, B, model.scale, "gelu", v), torch.float64)
        # k = 1 takes the other JVP formulation.
        model1 = make_model(6, m, 1, "relu")
        A1, c1, B1 = weights(model1)
        dB1 = dB[:, :1]
        assert_close_rel(TL.two_layer_jvp(x, A=A1, B=B1, scale=0.7, dA=dA, dB=dB1),
                         R.two_layer_jvp_dense(x, A1, None, B1, 0.7, "relu", dA, None, dB1), torch.float64)


def test_products_noncontiguous_and_empty():
    model = make_model(5, 20, 2, "relu", bias=True)
    A, c, B = weights(model)
    w = dict(A=A.T.contiguous().T, B=B, c=c, scale=model.scale, activation="relu")
    x = inputs(6, 10)[:, ::2]
    dA, dc, dB = tangents(3, 20, 5, 2)
    dA_nc = dA.transpose(1, 2).contiguous().transpose(1, 2)
    out = TL.two_layer_jvp(x, dA=dA_nc, dc=dc[:, :], dB=dB, **w)
    assert_close_rel(out, R.two_layer_jvp_dense(x.contiguous(), A, c, B, model.scale, "relu", dA, dc, dB),
                     torch.float64)
    r = inputs(2, 6).T  # (6, 2) non-contiguous
    for got, want in zip(TL.two_layer_vjp(x, r, **w), R.two_layer_vjp_dense(x, A, c, B, model.scale, "relu", r)):
        assert_close_rel(got, want, torch.float64)
    e = inputs(0, 5)
    assert TL.two_layer_jvp(e, dA=dA, **w).shape == (3, 0, 2)
    assert TL.two_layer_jvp(x, dA=dA[:0], **w).shape == (0, 6, 2)
    gA, gc, gB = TL.two_layer_vjp(e, inputs(0, 2), **w)
    assert gA.shape == (20, 5) and gc.shape == (20,) and gB.shape == (2, 20)
    assert not gA.any() and not gB.any()
    assert TL.two_layer_ntk_vp(e, inputs(6, 2), x, **w).shape == (0, 2)
    assert not TL.two_layer_ntk_vp(x, inputs(0, 2), e, **w).any()


# ----------------------------------------------------------------------------- public API routing
@pytest.mark.parametrize("bias", [False, True])
def test_public_api_routes_two_layer_to_fused(bias):
    model = make_model(4, 30, 2, "tanh", bias)
    x1, x2 = inputs(6, 4), inputs(5, 4, seed=1)
    for mode in ("trace", "full"):
        fused = lazyfast.empirical_ntk(model, x1, x2, mode=mode, implementation="fused")
        auto = lazyfast.empirical_ntk(model, x1, x2, mode=mode)
        jac = lazyfast.empirical_ntk(model, x1, x2, mode=mode, implementation="jacobian")
        vp = lazyfast.empirical_ntk(model, x1, x2, mode=mode, implementation="ntk_vp")
        assert torch.equal(fused, auto)
        assert_close_rel(fused, jac, torch.float64)
        assert_close_rel(fused, vp, torch.float64)
    dA, dc, dB = tangents(2, 30, 4, 2)
    tang = _param_dict(model, dA, dc, dB)
    assert_close_rel(lazyfast.jvp(model, x1, tang, implementation="fused"),
                     lazyfast.jvp(model, x1, tang, implementation="generic"), torch.float64)
    r = inputs(6, 2, seed=3)
    got = lazyfast.vjp(model, x1, r, implementation="fused")
    want = lazyfast.vjp(model, x1, r, implementation="generic")
    assert set(got) == set(want)
    for name in want:
        assert_close_rel(got[name], want[name], torch.float64, what=name)
    v = inputs(5, 2, seed=4)
    assert_close_rel(lazyfast.ntk_vp(model, x1, v, x2), lazyfast.ntk_vp(model, x1, v, x2, implementation="generic"),
                     torch.float64)


def test_public_api_fused_needs_two_layer():
    mlp = lazyfast.MLP(3, [8], 1, dtype=torch.float64)
    x = inputs(4, 3)
    with pytest.raises(ValueError, match="fused"):
        lazyfast.empirical_ntk(mlp, x, implementation="fused")
    # "auto" on a non-TwoLayer still works (generic path).
    assert lazyfast.empirical_ntk(mlp, x).shape == (4, 4)
    # A TwoLayer with a frozen layer is differentiated only in its trainable parameters: generic path.
    model = make_model(3, 10, 1)
    model.output.weight.requires_grad_(False)
    assert_close_rel(lazyfast.empirical_ntk(model, x), R.ntk_oracle(model, x), torch.float64)


# ----------------------------------------------------------------------------- autograd
def test_gradcheck_linear_arguments():
    model = make_model(3, 6, 2, "tanh", bias=True)
    A, c, B = weights(model)
    w = dict(A=A, B=B, c=c, scale=model.scale, activation="tanh")
    x, x2 = inputs(4, 3), inputs(3, 3, seed=1)
    dA, dc, dB = (t.requires_grad_() for t in tangents(2, 6, 3, 2))
    assert torch.autograd.gradcheck(lambda a, b, e: TL.two_layer_jvp(x, dA=a, dc=b, dB=e, **w), (dA, dc, dB))
    r = inputs(4, 2, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda rr: TL.two_layer_vjp(x, rr, **w), (r,))
    v = inputs(3, 2, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda vv: TL.two_layer_ntk_vp(x, vv, x2, **w), (v,))
    v1 = inputs(4, 2, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda vv: TL.two_layer_ntk_vp(x, vv, **w), (v1,))
    assert torch.autograd.gradgradcheck(lambda rr: TL.two_layer_vjp(x, rr, **w), (r,))


def test_linearized_model_trains_through_fused_jvp():
    # f_lin(w0 + dw) = f(w0) + J dw: the gradient of a loss through the fused JVP equals
    # the torch.func gradient of the linearized model.
    model = make_model(4, 16, 1, "relu", bias=True)
    A, c, B = weights(model)
    x, y = inputs(10, 4), inputs(10, 1, seed=1)
    dw = [torch.zeros(1, *p.shape, dtype=torch.float64, requires_grad=True) for p in (A, c, B)]
    with torch.no_grad():
        for t in dw:
            t.normal_()
    f0 = model(x)
    out = f0 + TL.two_layer_jvp(x, A=A, B=B, c=c, scale=model.scale, dA=dw[0], dc=dw[1], dB=dw[2])[0]
    loss = ((out - y) ** 2).sum()
    grads = torch.autograd.grad(loss, dw)
    lin = R.jvp(model, x, {"hidden.weight": dw[0].detach(), "hidden.bias": dw[1].detach(),
                           "output.weight": dw[2].detach()})[0]
    ref = R.vjp(model, x, 2 * (f0 + lin - y).detach())
    for g, name in zip(grads, ("hidden.weight", "hidden.bias", "output.weight")):
        assert_close_rel(g[0], ref[name], torch.float64, what=name)


def test_unsupported_gradients_raise():
    model = make_model(3, 5, 1)
    A, c, B = weights(model)
    x = inputs(4, 3).requires_grad_()
    with pytest.raises(RuntimeError, match="not supported"):
        TL.two_layer_ntk(x, A=A, B=B, scale=1.0)
    with pytest.raises(RuntimeError, match="not supported"):
        TL.two_layer_jvp(inputs(4, 3), A=A.clone().requires_grad_(), B=B, scale=1.0, dB=B[None])
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.lazyfast.two_layer_ntk(x, None, A, None, B, 1.0, 1, False).sum().backward()
    with pytest.raises(RuntimeError, match="not supported"):
        torch.ops.lazyfast.two_layer_vjp(x, A, None, B, 1.0, 1, inputs(4, 1))[0].sum().backward()


# ----------------------------------------------------------------------------- opcheck
def _opcheck_samples():
    model = make_model(4, 9, 2, "gelu", bias=True)
    A, c, B = weights(model)
    x1, x2 = inputs(5, 4), inputs(3, 4, seed=1)
    dA, dc, dB = tangents(2, 9, 4, 2)
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    s, act = model.scale, 3
    return [
        ("two_layer_ntk", (x1, x2, A, c, B, s, act, False)),
        ("two_layer_ntk", (x1, None, A, None, B, s, 1, True)),
        ("two_layer_ntk", (x1, None, A, c, B, s, 2, False)),
        ("two_layer_jvp", (x1, A, c, B, s, act, rg(dA), rg(dc), rg(dB))),
        ("two_layer_jvp", (x1, A, None, B[:1], s, 1, dA, None, None)),
        ("two_layer_vjp", (x1, A, c, B, s, act, rg(inputs(5, 2, seed=2)))),
        ("two_layer_ntk_vp", (x1, x2, A, c, B, s, act, rg(inputs(3, 2, seed=3)))),
        ("two_layer_ntk_vp", (x1, None, A, None, B, s, 4, inputs(5, 2, seed=3))),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    name, args = _opcheck_samples()[case]
    torch.library.opcheck(getattr(torch.ops.lazyfast, name).default, args)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    model = make_model(3, 5, 2)
    A, c, B = weights(model)
    w = dict(A=A, B=B, scale=1.0)
    x = inputs(4, 3)
    with pytest.raises(ValueError, match="x1"):
        TL.two_layer_ntk(inputs(4, 2), **w)
    with pytest.raises(ValueError, match="x2"):
        TL.two_layer_ntk(x, inputs(4, 5), **w)
    with pytest.raises(TypeError, match="x2"):
        TL.two_layer_ntk(x, x.float(), **w)
    with pytest.raises(ValueError, match="B"):
        TL.two_layer_ntk(x, A=A, B=B[:, :4], scale=1.0)
    with pytest.raises(ValueError, match="c"):
        TL.two_layer_ntk(x, A=A, B=B, c=c[:3] if c is not None else torch.zeros(3, dtype=A.dtype), scale=1.0)
    with pytest.raises(ValueError, match="activation"):
        TL.two_layer_ntk(x, activation="sigmoid", **w)
    with pytest.raises(ValueError, match="mode"):
        TL.two_layer_ntk(x, mode="diag", **w)
    with pytest.raises(ValueError, match="scale"):
        TL.two_layer_ntk(x, A=A, B=B, scale=float("nan"))
    with pytest.raises(ValueError, match="x1"):
        TL.two_layer_ntk(torch.full((2, 3), float("nan"), dtype=A.dtype), **w)
    with pytest.raises(ValueError, match="dA"):
        TL.two_layer_jvp(x, dA=torch.zeros(2, 5, 4, dtype=A.dtype), **w)
    with pytest.raises(ValueError, match="dB"):
        TL.two_layer_jvp(x, dA=torch.zeros(2, 5, 3, dtype=A.dtype), dB=torch.zeros(3, 2, 5, dtype=A.dtype), **w)
    with pytest.raises(ValueError, match="at least one tangent"):
        TL.two_layer_jvp(x, **w)
    with pytest.raises(ValueError, match="r"):
        TL.two_layer_vjp(x, inputs(4, 3), **w)
    with pytest.raises(ValueError, match="v"):
        TL.two_layer_ntk_vp(x, inputs(3, 2), **w)
    with pytest.raises(TypeError, match="A"):
        TL.two_layer_ntk(x, A=A.tolist(), B=B, scale=1.0)
    # The C++ checks name the argument too (direct op calls skip the Python checks).
    ops = torch.ops.lazyfast
    with pytest.raises(RuntimeError, match="x1 has d = 2"):
        ops.two_layer_ntk(inputs(4, 2), None, A, None, B, 1.0, 1, False)
    with pytest.raises(RuntimeError, match="activation code"):
        ops.two_layer_ntk(x, None, A, None, B, 1.0, 9, False)
    with pytest.raises(RuntimeError, match="B must have shape"):
        ops.two_layer_jvp(x, A, None, B.T.contiguous(), 1.0, 1, None, None, B[None])
    with pytest.raises(RuntimeError, match="dc"):
        ops.two_layer_jvp(x, A, None, B, 1.0, 1, None, torch.zeros(2, 4, dtype=A.dtype), None)
    with pytest.raises(RuntimeError, match="r"):
        ops.two_layer_vjp(x, A, None, B, 1.0, 1, inputs(3, 2))
    with pytest.raises(RuntimeError, match="dtype"):
        ops.two_layer_ntk_vp(x, None, A, None, B, 1.0, 1, inputs(4, 2).float())
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.two_layer_ntk(x.half(), None, A.half(), None, B.half(), 1.0, 1, False)


def test_reference_fallback_for_other_dtypes():
    # bfloat16 has no compiled kernel: the wrappers use the dense reference formulas.
    model = make_model(3, 7, 1)
    A, B = weights(model)[0].to(torch.bfloat16), weights(model)[2].to(torch.bfloat16)
    x = inputs(4, 3).to(torch.bfloat16)
    out = TL.two_layer_ntk(x, A=A, B=B, scale=0.5)
    ref = R.two_layer_ntk_dense(*upcast(x, None, A, None, B), 0.5, "relu")
    assert out.dtype == torch.bfloat16
    assert_close_rel(out, ref, rtol=3e-2)


def test_tolerances_are_the_spec():
    assert RTOL[torch.float64] == 1e-10 and RTOL[torch.float32] == 1e-5
