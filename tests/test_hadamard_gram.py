"""The fused hadamard_gram_sum op against its dense reference, opcheck, gradients, errors."""
import pytest
import torch

from lazyfast import _ext, reference
from lazyfast._ops.hadamard_gram import hadamard_gram_sum
from lazyfast.testing import DTYPES, RTOL, assert_close_rel, devices

needs_ext = pytest.mark.skipif(not _ext.HAS_CPU_KERNELS, reason="compiled extension not built")


def _factors(k, n, ws, vs, dtype, device, gen):
    d = [torch.randn(k, n, w, dtype=dtype, device=device, generator=gen) for w in ws]
    h = [torch.randn(n, v, dtype=dtype, device=device, generator=gen) for v in vs]
    return d, h


# n chosen to cross the CPU row panels (512 symmetric, 1024 otherwise) and leave ragged edges; k = 1 and 3; widths odd on purpose.
CASES = [
    # (k, n1, n2, ws, vs)
    (1, 7, 5, [3], [4]),
    (3, 6, 9, [5, 1, 3], [2, 7, 5]),
    (2, 300, 270, [17, 2], [9, 33]),
    (1, 513, 513, [4, 9, 1], [6, 4, 9]),
    (2, 1100, 30, [3], [2]),  # crosses the CPU row panel (≤ 1024) in the non-symmetric case
]


@needs_ext
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_reference(device, dtype, case, mode, symmetric):
    k, n1, n2, ws, vs = case
    if mode == "full" and n1 > 400:
        pytest.skip("large full case covered by trace")
    g = torch.Generator(device=device).manual_seed(1)
    d1, h1 = _factors(k, n1, ws, vs, dtype, device, g)
    d2, h2 = (None, None) if symmetric else _factors(k, n2, ws, vs, dtype, device, g)
    gam = [0.5 + l for l in range(len(ws))]
    bet = [float(l % 2) for l in range(len(ws))]
    got = hadamard_gram_sum(d1, h1, d2, h2, h_scale=gam, beta=bet, mode=mode)
    ref = reference.hadamard_gram_sum([t.double() for t in d1], [t.double() for t in h1],
                                      None if symmetric else [t.double() for t in d2],
                                      None if symmetric else [t.double() for t in h2], gam, bet, mode=mode)
    assert got.dtype == dtype
    # float32: errors of a w-long dot product, relative to the largest entry
    assert_close_rel(got, ref, rtol=RTOL[torch.float64] if dtype == torch.float64 else 2e-5)
    if symmetric:
        sw = got.transpose(0, 1) if mode == "trace" else got.permute(1, 0, 3, 2)
        assert torch.equal(got, sw)


@needs_ext
def test_noncontiguous_and_empty():
    g = torch.Generator().manual_seed(2)
    d = [torch.randn(7, 2, 5, dtype=torch.float64, generator=g).transpose(0, 1)]  # (2, 7, 5) non-contiguous
    h = [torch.randn(4, 7, dtype=torch.float64, generator=g).T]
    got = hadamard_gram_sum(d, h, h_scale=[2.0], beta=[1.0], mode="full")
    ref = reference.hadamard_gram_sum(d, h, None, None, [2.0], [1.0], mode="full")
    assert_close_rel(got, ref)
    e = hadamard_gram_sum([torch.zeros(2, 0, 3)], [torch.zeros(0, 4)], mode="full")
    assert e.shape == (0, 0, 2, 2)
    e2 = hadamard_gram_sum([torch.zeros(1, 3, 3)], [torch.ones(3, 4)], [torch.zeros(1, 0, 3)], [torch.zeros(0, 4)])
    assert e2.shape == (3, 0)


@needs_ext
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck(full, symmetric):
    g = torch.Generator().manual_seed(3)
    d1, h1 = _factors(2, 5, [3, 2], [4, 3], torch.float64, "cpu", g)
    d2, h2 = ([], []) if symmetric else _factors(2, 4, [3, 2], [4, 3], torch.float64, "cpu", g)
    for t in d1 + h1 + d2 + h2:
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.lazyfast.hadamard_gram_sum, (d1, h1, d2, h2, [1.5, 0.5], [1.0, 0.0], full))


@needs_ext
@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck(mode, symmetric):
    g = torch.Generator().manual_seed(4)
    d1, h1 = _factors(2, 4, [3, 2], [2, 3], torch.float64, "cpu", g)
    d2, h2 = _factors(2, 3, [3, 2], [2, 3], torch.float64, "cpu", g)
    ins = d1 + h1 + ([] if symmetric else d2 + h2)
    for t in ins:
        t.requires_grad_(True)

    def fn(*ts):
        a, b = list(ts[:2]), list(ts[2:4])
        c, d = (None, None) if symmetric else (list(ts[4:6]), list(ts[6:8]))
        return hadamard_gram_sum(a, b, c, d, h_scale=[0.7, 1.3], beta=[1.0, 0.0], mode=mode)

    assert torch.autograd.gradcheck(fn, tuple(ins))


def test_bad_inputs_name_the_argument():
    d = [torch.randn(1, 3, 2)]
    h = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="d1\\[0\\]"):
        hadamard_gram_sum([torch.randn(3, 2)], h)
    with pytest.raises(ValueError, match="h1"):
        hadamard_gram_sum(d, [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="h_scale"):
        hadamard_gram_sum(d, h, h_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="beta"):
        hadamard_gram_sum(d, h, beta=[float("nan")])
    with pytest.raises(ValueError, match="h2"):
        hadamard_gram_sum(d, h, [torch.randn(1, 3, 2)], [torch.randn(3, 5)])
    with pytest.raises(TypeError, match="h1\\[0\\]"):
        hadamard_gram_sum(d, [torch.randn(3, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="mode"):
        hadamard_gram_sum(d, h, mode="diag")


@needs_ext
def test_cpp_checks_name_the_argument():
    with pytest.raises(RuntimeError, match="h_scale"):
        torch.ops.lazyfast.hadamard_gram_sum([torch.randn(1, 3, 2)], [torch.randn(3, 4)], [], [], [1.0, 1.0], [0.0],
                                             False)
    with pytest.raises(RuntimeError, match="h1\\[0\\]"):
        torch.ops.lazyfast.hadamard_gram_sum([torch.randn(1, 3, 2)], [torch.randn(2, 4)], [], [], [1.0], [0.0], False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.lazyfast.hadamard_gram_sum([torch.randn(1, 3, 2).half()], [torch.randn(3, 4).half()], [], [], [1.0],
                                             [0.0], False)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_KERNELS), reason="needs a GPU and CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_matches_cpu(dtype, mode, symmetric):
    g = torch.Generator().manual_seed(5)
    d1, h1 = _factors(3, 70, [33, 3], [20, 33], dtype, "cpu", g)
    d2, h2 = (None, None) if symmetric else _factors(3, 45, [33, 3], [20, 33], dtype, "cpu", g)
    cpu = hadamard_gram_sum(d1, h1, d2, h2, h_scale=[0.5, 2.0], beta=[1.0, 0.0], mode=mode)
    cu = lambda ts: None if ts is None else [t.cuda() for t in ts]  # noqa: E731
    gpu = hadamard_gram_sum(cu(d1), cu(h1), cu(d2), cu(h2), h_scale=[0.5, 2.0], beta=[1.0, 0.0], mode=mode)
    assert_close_rel(gpu.cpu(), cpu, rtol=1e-10 if dtype == torch.float64 else 2e-5)


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @needs_ext
    @settings(max_examples=40, deadline=None, derandomize=True)  # reproducible in CI
    @given(k=st.integers(1, 3), n1=st.integers(0, 12), n2=st.integers(0, 12), layers=st.integers(1, 3),
           ws=st.lists(st.integers(1, 9), min_size=3, max_size=3), vs=st.lists(st.integers(1, 9), min_size=3, max_size=3),
           full=st.booleans(), symmetric=st.booleans(), seed=st.integers(0, 2**16))
    def test_property_random_shapes(k, n1, n2, layers, ws, vs, full, symmetric, seed):
        g = torch.Generator().manual_seed(seed)
        d1, h1 = _factors(k, n1, ws[:layers], vs[:layers], torch.float64, "cpu", g)
        d2, h2 = (None, None) if symmetric else _factors(k, n2, ws[:layers], vs[:layers], torch.float64, "cpu", g)
        gam = [float(torch.rand((), generator=g)) for _ in range(layers)]
        bet = [float(torch.rand((), generator=g)) for _ in range(layers)]
        mode = "full" if full else "trace"
        got = hadamard_gram_sum(d1, h1, d2, h2, h_scale=gam, beta=bet, mode=mode)
        ref = reference.hadamard_gram_sum(d1, h1, d2, h2, gam, bet, mode=mode)
        assert got.shape == ref.shape
        assert_close_rel(got, ref, rtol=1e-12)
