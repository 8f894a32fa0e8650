import math

import pytest
import torch

import lazyfast
from lazyfast.models import ACTIVATIONS, MLP, TwoLayer, resnet18, vgg11

F64 = torch.float64


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_two_layer_formula(activation):
    m = TwoLayer(5, 8, 2, activation=activation, bias=True, dtype=F64)
    x = torch.randn(3, 5, dtype=F64)
    A, c, B = m.hidden.weight, m.hidden.bias, m.output.weight
    act = lazyfast.models.activation_fn(activation)
    want = (act(x @ A.T + c) @ B.T) / math.sqrt(8)
    assert torch.allclose(m(x), want, rtol=1e-13, atol=1e-13)
    assert m.scale == pytest.approx(1 / math.sqrt(8))


def test_two_layer_scales_and_init_scale():
    assert TwoLayer(3, 16, scale="mean_field").scale == pytest.approx(1 / 16)
    assert TwoLayer(3, 16, scale=0.3).scale == pytest.approx(0.3)
    torch.manual_seed(0)
    a = TwoLayer(3, 16, init_scale=1.0, dtype=F64)
    torch.manual_seed(0)
    b = TwoLayer(3, 16, init_scale=2.5, dtype=F64)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pb, 2.5 * pa)


@pytest.mark.parametrize("bias", [False, True])
def test_symmetric_init_gives_zero_output(bias):
    m = TwoLayer(7, 10, 3, symmetric=True, bias=bias, activation="gelu", dtype=F64)
    assert torch.equal(m(torch.randn(11, 7, dtype=F64)), torch.zeros(11, 3, dtype=F64))
    # ...but a non-degenerate tangent kernel.
    assert lazyfast.empirical_ntk(m, torch.randn(4, 7, dtype=F64)).diagonal().min() > 0


def test_mlp_parametrizations_same_function_at_matched_weights():
    torch.manual_seed(0)
    ntk = MLP(4, [6, 5], 2, parametrization="ntk", dtype=F64)
    std = MLP(4, [6, 5], 2, parametrization="standard", dtype=F64)
    with torch.no_grad():
        for ln, ls in zip(ntk.layers, std.layers):
            ls.weight.copy_(ln.weight / math.sqrt(ln.fan_in))
            ls.bias.copy_(ln.bias)
    x = torch.randn(3, 4, dtype=F64)
    assert torch.allclose(ntk(x), std(x), rtol=1e-12, atol=1e-12)


def test_cnns_shapes():
    x = torch.randn(2, 3, 32, 32)
    assert vgg11()(x).shape == (2, 10)
    assert resnet18(num_classes=4)(x).shape == (2, 4)
    assert vgg11(in_channels=1, num_classes=5)(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    pools = sum(isinstance(mod, torch.nn.MaxPool2d) for mod in vgg11().modules())
    assert pools == 5  # the standard VGG-11, not the six-pool variant
    for mod in vgg11().modules():
        if isinstance(mod, torch.nn.Conv2d):
            assert mod.bias is not None and torch.equal(mod.bias, torch.zeros_like(mod.bias))
    with pytest.raises(ValueError, match="32, 32"):
        vgg11()(torch.randn(1, 3, 28, 28))


def test_resnet18_divisor_divides_every_width():
    full = dict(resnet18(10, 1).named_parameters())
    narrow = dict(resnet18(10, 1, divisor=4).named_parameters())
    assert list(narrow) == list(full)  # same modules, same names
    for name, p in full.items():
        q = narrow[name]
        if name == "classifier.weight":
            assert q.shape == (10, p.shape[1] // 4)  # 10 outputs, in features ÷4
        elif name == "classifier.bias":
            assert q.shape == p.shape
        elif name == "conv1.weight":
            assert q.shape == (p.shape[0] // 4, 1, 3, 3)  # one input channel
        else:
            assert q.shape == (p.shape[0] // 4, p.shape[1] // 4) + p.shape[2:]  # out and in channels ÷4
    assert resnet18(10, 1, divisor=4)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert resnet18(10, 3, width=2, divisor=2).conv1.out_channels == 64  # 64 * width // divisor
    with pytest.raises(ValueError, match="divisor must divide 64"):
        resnet18(divisor=3)
    with pytest.raises(ValueError, match="divisor must be a positive int"):
        resnet18(divisor=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d=0, m=4), "d must be a positive int"),
        (dict(d=3, m=5, symmetric=True), "even width"),
        (dict(d=3, m=4, activation="swish"), "activation must be one of"),
        (dict(d=3, m=4, scale="big"), "scale must be"),
        (dict(d=3, m=4, init_scale=float("nan")), "init_scale must be finite"),
        (dict(d=3, m=4, init_scale=0.0), "init_scale must be finite and > 0"),
    ],
)
def test_two_layer_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoLayer(**kwargs)


def test_mlp_bad_arguments():
    with pytest.raises(ValueError, match="parametrization"):
        MLP(3, [4], parametrization="mup")
    with pytest.raises(ValueError, match=r"widths\[1\]"):
        MLP(3, [4, 0])
