"""Bad input gets a clear error naming the argument."""
import pytest
import torch

import lazyfast
from lazyfast.models import TwoLayer, vgg11

F64 = torch.float64


@pytest.fixture
def model():
    return TwoLayer(4, 6, 2, bias=True, dtype=F64)


@pytest.mark.parametrize(
    "x1,x2,exc,match",
    [
        (torch.randn(4, dtype=F64), None, ValueError, "x1 must have a batch dimension"),
        (torch.randn(3, 5, dtype=F64), None, ValueError, r"x1 must have shape \(n, 4\)"),
        (torch.randn(3, 4, dtype=F64), torch.randn(2, 5, dtype=F64), ValueError, r"x2 must have shape \(n, 4\)"),
        (torch.ones(3, 4, dtype=torch.int64), None, TypeError, "x1 must be a floating-point"),
        (torch.randn(3, 4, dtype=torch.float32), None, TypeError, "x1 has dtype torch.float32"),
        (torch.randn(3, 4, dtype=F64, device="meta"), None, ValueError, "x1 is on meta"),
        (torch.tensor([[float("nan")] * 4], dtype=F64), None, ValueError, "x1 contains NaN"),
        ("not a tensor", None, TypeError, "x1 must be a torch.Tensor"),
    ],
)
def test_empirical_ntk_bad_inputs(model, x1, x2, exc, match):
    with pytest.raises(exc, match=match):
        lazyfast.empirical_ntk(model, x1, x2)


def test_bad_options(model):
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="mode must be"):
        lazyfast.empirical_ntk(model, x, mode="diag")
    with pytest.raises(ValueError, match="implementation must be one of"):
        lazyfast.empirical_ntk(model, x, implementation="magic")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        lazyfast.empirical_ntk(model, x, chunk_size=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lazyfast.empirical_ntk(lambda z: z, x)


def test_generic_model_per_sample_shape_mismatch():
    net = vgg11(in_channels=1, num_classes=2).double()
    x1 = torch.randn(2, 1, 32, 32, dtype=F64)
    with pytest.raises(ValueError, match="x2 has per-sample shape"):
        lazyfast.empirical_ntk(net, x1, torch.randn(2, 3, 32, 32, dtype=F64))


def test_vjp_and_ntk_vp_bad_cotangents(model):
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"cotangent must have shape \(3, 2\)"):
        lazyfast.vjp(model, x, torch.randn(3, 1, dtype=F64))
    with pytest.raises(TypeError, match="cotangent must have the inputs' dtype"):
        lazyfast.vjp(model, x, torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"v must have shape \(3, 2\)"):
        lazyfast.ntk_vp(model, x, torch.randn(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="v contains NaN"):
        lazyfast.ntk_vp(model, x, torch.full((3, 2), float("inf"), dtype=F64))
    with pytest.raises(TypeError, match="tangents must be a non-empty dict"):
        lazyfast.jvp(model, x, {})
