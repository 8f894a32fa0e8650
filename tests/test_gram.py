"""The generic Gram op: compiled kernel vs J1 @ J2.T."""
import pytest
import torch

import lazyfast
from lazyfast import _ext
from lazyfast.testing import DTYPES, assert_close_rel, devices

needs_ext = pytest.mark.skipif(not _ext.HAS_CPU_KERNELS, reason="extension not built")
SHAPES = [(1, 1, 1), (7, 5, 33), (33, 17, 1000), (16, 16, 512), (129, 3, 7)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n1,n2,p", SHAPES)
def test_gram_matches_matmul(device, dtype, n1, n2, p):
    j1 = torch.randn(n1, p, dtype=dtype, device=device)
    j2 = torch.randn(n2, p, dtype=dtype, device=device)
    want = (j1.double() @ j2.double().T)
    got = lazyfast.gram(j1, j2)
    assert got.shape == (n1, n2) and got.dtype == dtype and got.device == j1.device
    assert_close_rel(got, want, dtype=dtype)


@pytest.mark.parametrize("device", devices())
def test_gram_accumulate_f64_is_more_accurate(device):
    # Large P with a big common offset: float32 accumulation loses digits, float64 keeps them.
    torch.manual_seed(1)
    j = (torch.randn(8, 200_000, device=device) * 1e-3 + 1.0).float()
    exact = j.double() @ j.double().T
    e32 = (lazyfast.gram(j).double() - exact).abs().max() / exact.abs().max()
    e64 = (lazyfast.gram(j, accumulate_f64=True).double() - exact).abs().max() / exact.abs().max()
    assert e64 <= 1e-7
    assert e64 < e32


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_x2_none_is_symmetric(device, dtype):
    j = torch.randn(23, 41, dtype=dtype, device=device)
    g = lazyfast.gram(j)
    assert torch.equal(g, lazyfast.gram(j, j))
    assert_close_rel(g, j.double() @ j.double().T, dtype=dtype)


@pytest.mark.parametrize("device", devices())
def test_gram_empty_and_zero_columns(device):
    for n1, n2, p in [(0, 4, 3), (4, 0, 3), (0, 0, 3), (3, 2, 0)]:
        j1 = torch.randn(n1, p, dtype=torch.float64, device=device)
        j2 = torch.randn(n2, p, dtype=torch.float64, device=device)
        g = lazyfast.gram(j1, j2)
        assert g.shape == (n1, n2)
        assert torch.equal(g, torch.zeros(n1, n2, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", devices())
def test_gram_non_contiguous(device):
    base = torch.randn(40, 30, dtype=torch.float64, device=device)
    j1 = base.T[:, ::2]  # (30, 20), strided
    j2 = base[::3, :20] # (14, 20), row-strided
    assert not j1.is_contiguous() and not j2.is_contiguous()
    assert_close_rel(lazyfast.gram(j1, j2), j1 @ j2.T, dtype=torch.float64)


@needs_ext
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_opcheck(device, dtype):
    samples = [
        (torch.randn(5, 9, dtype=dtype, device=device), torch.randn(3, 9, dtype=dtype, device=device), False),
        (torch.randn(5, 9, dtype=dtype, device=device, requires_grad=True),
         torch.randn(4, 9, dtype=dtype, device=device, requires_grad=True), True),
        (torch.randn(0, 2, dtype=dtype, device=device), torch.randn(3, 2, dtype=dtype, device=device), False),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.lazyfast.gram.default, args)


@pytest.mark.parametrize("device", devices())
def test_gram_gradcheck(device):
    j1 = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    j2 = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lazyfast.gram(a, b), (j1, j2))
    assert torch.autograd.gradgradcheck(lambda a, b: lazyfast.gram(a, b), (j1, j2))


@needs_ext
def test_gram_under_torch_compile():
    f = torch.compile(lambda a, b: torch.ops.lazyfast.gram(a, b, False) * 2.0, backend="aot_eager", fullgraph=True)
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert_close_rel(f(a, b), 2.0 * (a @ b.T), dtype=torch.float64)


def test_gram_half_precision_routes_to_reference():
    j = torch.randn(6, 8).bfloat16()
    g = lazyfast.gram(j)
    assert g.dtype == torch.bfloat16
    assert torch.allclose(g.float(), (j.float() @ j.float().T), rtol=2e-2, atol=1e-1)


@pytest.mark.parametrize(
    "j1,j2,exc,match",
    [
        (torch.randn(3), None, ValueError, "j1 must be 2-D"),
        (torch.randn(3, 4), torch.randn(3, 5), ValueError, "j2 has 5 columns"),
        (torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64), TypeError, "j2 has dtype"),
        (torch.ones(3, 4, dtype=torch.int64), None, TypeError, "j1 must be a floating-point"),
        ([[1.0]], None, TypeError, "j1 must be a torch.Tensor"),
        (torch.randn(3, 4), torch.randn(2, 4, device="meta"), ValueError, "j2 is on meta"),
    ],
)
def test_gram_bad_inputs(j1, j2, exc, match):
    with pytest.raises(exc, match=match):
        lazyfast.gram(j1, j2)


@needs_ext
def test_gram_op_checks_in_cpp():
    # The C++ launcher names the argument too (callers that bypass the Python wrapper).
    with pytest.raises(RuntimeError, match="j2 has 5 columns"):
        torch.ops.lazyfast.gram(torch.randn(3, 4), torch.randn(2, 5), False)
    with pytest.raises(RuntimeError, match="j1 must be 2-D"):
        torch.ops.lazyfast.gram(torch.randn(3), torch.randn(2, 5), False)
    with pytest.raises(RuntimeError, match="j1 must be float32 or float64"):
        torch.ops.lazyfast.gram(torch.ones(3, 4, dtype=torch.int32), torch.ones(2, 4, dtype=torch.int32), False)
