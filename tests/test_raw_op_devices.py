"""Every raw ``torch.ops.lazyfast.*`` op checks the device, dtype and layout of EVERY tensor
argument (optional ones and each element of a tensor list too), naming the argument (issue 18,
"exact on every call").

A call with one tensor on ``meta`` and the others on the CPU dispatches to the Meta kernel
(the fake kernel registered in Python); it used to return an uninitialized CPU tensor (values
that differ between two identical calls). Now it raises, as the C++ launchers do for any mix
of devices, dtypes or layouts they are reached with (sparse / mkldnn / nested tensors dispatch
to the launchers, which refuse them naming the argument).
"""
from __future__ import annotations

import re

import pytest
import torch

import lazyfast
from lazyfast import reference as R

pytestmark = pytest.mark.skipif(lazyfast._ext._C is None, reason="lazyfast._C not built")

D64 = torch.float64


def _t(*shape, seed=0, dtype=D64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the ops and their tensor arguments
# Each case builds fresh, small float64 arguments with EVERY optional tensor given, and lists the
# tensor arguments as (name, path): path is the position in the argument tuple, and for a
# tensor-list argument (position, element).
def _two_layer_weights():
    return _t(6, 3, seed=1), _t(6, seed=2), _t(2, 6, seed=3)  # A (m, d), c (m,), B (k, m)


def _ntk():
    A, c, B = _two_layer_weights()
    return (_t(5, 3, seed=4), _t(4, 3, seed=5), A, c, B, 0.7, 1, False)


def _ntk_full():
    A, c, B = _two_layer_weights()
    return (_t(5, 3, seed=4), _t(4, 3, seed=5), A, c, B, 0.7, 2, True)


def _jvp():
    A, c, B = _two_layer_weights()
    return (_t(5, 3, seed=4), A, c, B, 0.7, 3, _t(2, 6, 3, seed=6), _t(2, 6, seed=7), _t(2, 2, 6, seed=8))


def _vjp():
    A, c, B = _two_layer_weights()
    return (_t(5, 3, seed=4), A, c, B, 0.7, 1, _t(5, 2, seed=9))


def _ntk_vp():
    A, c, B = _two_layer_weights()
    return (_t(5, 3, seed=4), _t(4, 3, seed=5), A, c, B, 0.7, 4, _t(4, 2, seed=10))


def _gram():
    return (_t(4, 6, seed=11), _t(3, 6, seed=12), False)


def _hadamard():
    d1 = [_t(2, 4, 3, seed=13), _t(2, 4, 5, seed=14)]
    h1 = [_t(4, 2, seed=15), _t(4, 3, seed=16)]
    d2 = [_t(2, 3, 3, seed=17), _t(2, 3, 5, seed=18)]
    h2 = [_t(3, 2, seed=19), _t(3, 3, seed=20)]
    return (d1, h1, d2, h2, [1.5, 0.5], [1.0, 0.0], True)


_TWO_LAYER_NTK = [("x1", 0), ("x2", 1), ("A", 2), ("c", 3), ("B", 4)]
OPS = {
    "two_layer_ntk": (_ntk, _TWO_LAYER_NTK),
    "two_layer_ntk[full]": (_ntk_full, _TWO_LAYER_NTK),
    "two_layer_jvp": (_jvp, [("x", 0), ("A", 1), ("c", 2), ("B", 3), ("dA", 6), ("dc", 7), ("dB", 8)]),
    "two_layer_vjp": (_vjp, [("x", 0), ("A", 1), ("c", 2), ("B", 3), ("r", 6)]),
    "two_layer_ntk_vp": (_ntk_vp, [("x1", 0), ("x2", 1), ("A", 2), ("c", 3), ("B", 4), ("v", 7)]),
    "gram": (_gram, [("j1", 0), ("j2", 1)]),
    "hadamard_gram_sum": (_hadamard, [(f"{lst}[{l}]", (i, l)) for i, lst in enumerate(("d1", "h1", "d2", "h2"))
                                      for l in range(2)]),
}
ARGS = [(op, name) for op, (_, names) in OPS.items() for name, _ in names]


def _op(op):
    return getattr(torch.ops.lazyfast, op.split("[")[0])


def _replace(args, path, fn):
    """``args`` with the tensor at ``path`` replaced by ``fn(tensor)``."""
    args = list(args)
    if isinstance(path, tuple):
        i, l = path
        args[i] = list(args[i])
        args[i][l] = fn(args[i][l])
    else:
        args[path] = fn(args[path])
    return tuple(args)


def _call(op, args):
    return _op(op)(*args)


def _result(op):
    out = _call(op, OPS[op][0]())
    return out if isinstance(out, tuple) else (out,)


# ----------------------------------------------------------------------------- meta
def _meta(a):
    if isinstance(a, torch.Tensor):
        return a.to("meta")
    if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
        return [t.to("meta") for t in a]
    return a


@pytest.mark.parametrize("op,name", ARGS)
def test_one_argument_on_meta_is_refused_naming_it(op, name):
    build, names = OPS[op]
    args = _replace(build(), dict(names)[name], lambda t: t.to("meta"))
    with pytest.raises(RuntimeError) as info:
        _call(op, args)
    msg = str(info.value)
    assert re.search(rf"lazyfast: {op.split('[')[0]}: .*(?<![\w\[]){re.escape(name)} is on meta", msg), msg
    assert "cpu" in msg, msg
    # every argument on meta is still served by the fake kernel (torch.compile, shape propagation)
    out = _call(op, tuple(_meta(a) for a in build()))
    got = out if isinstance(out, tuple) else (out,)
    assert [o.device.type for o in got] == ["meta"] * len(got)
    assert [o.shape for o in got] == [w.shape for w in _result(op)]


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("op,name", ARGS)
def test_sparse_argument_is_refused_naming_it(op, name):
    build, names = OPS[op]
    args = _replace(build(), dict(names)[name], lambda t: t.to_sparse())
    with pytest.raises(RuntimeError) as info:
        _call(op, args)
    msg = str(info.value)
    assert re.search(rf"lazyfast: {op.split('[')[0]}: {re.escape(name)} must be a strided", msg), msg


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_csr_argument_is_refused_naming_it():
    args = _replace(_ntk(), 4, lambda t: t.to_sparse_csr())
    with pytest.raises(RuntimeError, match=r"two_layer_ntk: B must be a strided"):
        _call("two_layer_ntk", args)
    args = _replace(_gram(), 1, lambda t: t.to_sparse_csr())
    with pytest.raises(RuntimeError, match=r"gram: j2 must be a strided"):
        _call("gram", args)


def test_mkldnn_argument_is_refused_naming_it():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without mkldnn")
    A, c, B = (t.float() for t in _two_layer_weights())
    x = _t(5, 3, seed=4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"two_layer_vjp: A must be a strided"):
        torch.ops.lazyfast.two_layer_vjp(x, A.to_mkldnn(), c, B, 1.0, 1, _t(5, 2, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=r"gram: j1 must be a strided"):
        torch.ops.lazyfast.gram(_t(4, 6).float().to_mkldnn(), _t(3, 6).float(), False)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nested_and_quantized_arguments_are_refused_naming_them():
    nested = torch.nested.nested_tensor([_t(2, 6), _t(3, 6)])  # strided layout, but not one matrix
    with pytest.raises(RuntimeError, match=r"gram: j2 must be a strided \(dense\) tensor, got a nested tensor"):
        torch.ops.lazyfast.gram(_t(4, 6), nested, False)
    q = torch.quantize_per_tensor(_t(3, 6).float(), 0.1, 0, torch.qint8)
    with pytest.raises(RuntimeError, match=r"gram: j2 has dtype QInt8 but j1 has dtype Float"):
        torch.ops.lazyfast.gram(_t(4, 6).float(), q, False)


# ----------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("op,name", ARGS)
def test_float32_argument_among_float64_is_refused_naming_op_and_argument(op, name):
    build, names = OPS[op]
    args = _replace(build(), dict(names)[name], lambda t: t.float())
    with pytest.raises(RuntimeError) as info:
        _call(op, args)
    msg = str(info.value)
    assert re.search(rf"lazyfast: {op.split('[')[0]}: .*(?<![\w\[]){re.escape(name)} has dtype Float", msg), msg


# ----------------------------------------------------------------------------- the correct call is unchanged
def _reference(op):
    args = OPS[op][0]()
    if op.startswith("two_layer_ntk["):
        x1, x2, A, c, B, s, _, _ = args
        return (R.two_layer_ntk_dense(x1, x2, A, c, B, s, "tanh", "full"),)
    if op == "two_layer_ntk":
        x1, x2, A, c, B, s, _, _ = args
        return (R.two_layer_ntk_dense(x1, x2, A, c, B, s, "relu", "trace"),)
    if op == "gram":
        j1, j2, _ = args
        return (j1 @ j2.T,)
    if op == "hadamard_gram_sum":
        d1, h1, d2, h2, gam, bet, _ = args
        return (R.hadamard_gram_sum(d1, h1, d2, h2, gam, bet, mode="full"),)
    return None


@pytest.mark.parametrize("op", list(OPS))
def test_correct_call_matches_before_and_after_refused_calls(op):
    build, names = OPS[op]
    before = _result(op)
    assert all(b.device.type == "cpu" and b.dtype == D64 for b in before)
    ref = _reference(op)
    if ref is not None:
        for b, r in zip(before, ref):
            torch.testing.assert_close(b, r, rtol=1e-10, atol=1e-12)
    for name, path in names:
        for bad in (lambda t: t.to("meta"), lambda t: t.to_sparse()):
            with pytest.raises(RuntimeError):
                _call(op, _replace(build(), path, bad))
    after = _result(op)
    assert all(torch.equal(b, a) for b, a in zip(before, after))


# ----------------------------------------------------------------------------- CUDA: every tensor on the same GPU
@pytest.mark.skipif(not (torch.cuda.is_available() and lazyfast._ext.HAS_CUDA_KERNELS),
                    reason="needs a CUDA device and lazyfast's CUDA kernels")
@pytest.mark.parametrize("op,name", ARGS)
def test_cuda_one_argument_on_cpu_is_refused_naming_it(op, name):
    def cuda(a):
        if isinstance(a, torch.Tensor):
            return a.cuda()
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [t.cuda() for t in a]
        return a

    build, names = OPS[op]
    args = _replace(tuple(cuda(a) for a in build()), dict(names)[name], lambda t: t.cpu())
    with pytest.raises(RuntimeError) as info:
        _call(op, args)
    msg = str(info.value)
    assert re.search(rf"(?<![\w\[]){re.escape(name)} is on cpu", msg), msg
