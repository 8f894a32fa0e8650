"""Laziness diagnostics and the Theorem 2.2 rate check."""
import copy
import math

import pytest
import torch
from torch import nn

import lazyfast
from lazyfast.diagnostics import (activation_pattern_stability, kernel_distance, lazy_linearized_gap, rate_check,
                                  relative_weight_change, relu_patterns)
from lazyfast.lazy import LazyModel, Linearized
from lazyfast.models import MLP, TwoLayer

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_relative_weight_change():
    torch.manual_seed(0)
    net = TwoLayer(4, 6, 2, bias=True, dtype=F64)
    lazy = LazyModel(net, 5.0)
    assert relative_weight_change(lazy) == 0.0
    w0 = torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])
    with torch.no_grad():
        net.hidden.weight.add_(0.1)
    w = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    expect = float((w - w0).norm() / w0.norm())
    assert relative_weight_change(lazy) == pytest.approx(expect, rel=1e-13)
    assert relative_weight_change(net, lazy.model0) == pytest.approx(expect, rel=1e-13)
    lin = Linearized(net)
    assert relative_weight_change(lin) == 0.0
    with pytest.raises(ValueError, match="model0 is required"):
        relative_weight_change(net)


def test_relu_patterns_catch_functional_and_module_relus():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    tl = TwoLayer(4, 6, 1)
    pats = relu_patterns(tl, x)
    assert list(pats) == ["relu0"]
    assert torch.equal(pats["relu0"], tl.hidden(x) > 0)
    mlp = MLP(4, [6, 5], 2)
    assert [v.shape for v in relu_patterns(mlp, x).values()] == [(5, 6), (5, 5)]
    seq = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 1))
    pats = relu_patterns(seq, x)
    assert list(pats) == ["1", "3"]
    assert torch.equal(pats["1"], seq[0](x) > 0)
    assert torch.equal(pats["3"], seq[2](torch.relu(seq[0](x))) > 0)


def test_activation_pattern_stability_values():
    torch.manual_seed(0)
    net = TwoLayer(4, 50, 1, activation="relu", dtype=F64)
    x = torch.randn(30, 4, dtype=F64)
    lazy = LazyModel(net, 1.0)
    assert activation_pattern_stability(lazy, x) == {"relu0": 1.0, "all": 1.0}
    with torch.no_grad():
        net.hidden.weight.add_(0.3 * torch.randn_like(net.hidden.weight))
    z0 = lazy.model0.hidden(x)
    z = net.hidden(x)
    expect = float(((z > 0) == (z0 > 0)).double().mean())
    got = activation_pattern_stability(lazy, x)
    assert 0.5 < expect < 1.0
    assert got["relu0"] == pytest.approx(expect) and got["all"] == pytest.approx(expect)
    # the Linearized model's current weights are run through the network
    lin = Linearized(TwoLayer(4, 50, 1, dtype=F64))
    with torch.no_grad():
        lin.model.hidden.weight.mul_(-1)
    assert activation_pattern_stability(lin, x)["all"] < 0.1
    with pytest.raises(ValueError, match="no ReLU"):
        activation_pattern_stability(LazyModel(TwoLayer(4, 6, 1, activation="tanh", dtype=F64), 1.0), x)


def test_kernel_distance():
    torch.manual_seed(0)
    net = TwoLayer(4, 20, 2, activation="tanh", dtype=F64)
    x = torch.randn(8, 4, dtype=F64)
    lazy = LazyModel(net, 1.0)
    assert kernel_distance(lazy, x) == 0.0
    K0 = lazyfast.empirical_ntk(net, x, mode="full")
    with torch.no_grad():
        net.hidden.weight.add_(0.2)
    K1 = lazyfast.empirical_ntk(net, x, mode="full")
    expect = float((K1 - K0).norm() / K0.norm())
    assert kernel_distance(lazy, x, mode="full") == pytest.approx(expect, rel=1e-10)
    assert kernel_distance(net, x, lazy.model0, mode="full") == pytest.approx(expect, rel=1e-10)
    assert expect > 1e-3


def test_lazy_linearized_gap():
    torch.manual_seed(0)
    net = TwoLayer(4, 10, 2, activation="tanh", dtype=F64)
    x = torch.randn(6, 4, dtype=F64)
    a, b = LazyModel(copy.deepcopy(net), 3.0), LazyModel(Linearized(net), 3.0)
    assert lazy_linearized_gap(a, b, x) == 0.0
    with torch.no_grad():
        a.model.output.weight.add_(0.1)
    with torch.no_grad():
        expect = math.sqrt(float(((a(x) - b(x)) ** 2).sum()) / 6)
    assert lazy_linearized_gap(a, b, x) == pytest.approx(expect, rel=1e-13) and expect > 0


def test_rate_check_slopes_theorem_2_2():
    """Theorem 2.2 at fixed horizon: ‖w_α − w0‖ ~ α⁻¹, ‖αh − αh̄‖ ~ α⁻¹, ‖w_α − w̄_α‖ ~ α⁻²."""
    out = rate_check(alphas=(10.0, 30.0, 100.0, 300.0), steps=60)
    s = out["slopes"]
    assert abs(s["weight_change"] + 1) <= 0.15, s
    assert abs(s["output_gap"] + 1) <= 0.15, s
    assert abs(s["param_gap"] + 2) <= 0.2, s
    assert len(out["curves"]["param_gap"]) == 4
    assert out["final_loss"][0] < 0.5  # training did something at this horizon


def test_rate_check_symmetric_init():
    """Symmetrized init: weight and parameter-gap rates as in the theorem; the first-order
    kernel change cancels between mirrored neurons, so the output gap falls like α⁻²."""
    out = rate_check(alphas=(10.0, 100.0), steps=30, init="symmetric")
    s = out["slopes"]
    assert abs(s["weight_change"] + 1) <= 0.15, s
    assert abs(s["param_gap"] + 2) <= 0.2, s
    assert abs(s["output_gap"] + 2) <= 0.2, s


def test_rate_check_uncentered_control_fails_the_rates():
    """Without h(w0) = 0 the weights move O(1) whatever α: the theorem's rates do not hold."""
    out = rate_check(alphas=(10.0, 100.0), steps=30, init="uncentered")
    s = out["slopes"]
    assert s["weight_change"] > -0.3 and s["param_gap"] > -0.3, s


def test_rate_check_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"alphas\[1\]"):
        rate_check(alphas=(10.0, -1.0))
    with pytest.raises(ValueError, match="two distinct"):
        rate_check(alphas=(10.0, 10.0))
    with pytest.raises(ValueError, match="init"):
        rate_check(init="xavier")
    with pytest.raises(ValueError, match="steps"):
        rate_check(steps=0)
