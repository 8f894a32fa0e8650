"""Kernel gradient flow closed forms, their agreement with linearized training, and CG."""
import math

import pytest
import torch

import lazyfast
from lazyfast.lazy import Linearized
from lazyfast.models import TwoLayer
from lazyfast.solvers import (KernelGradientFlow, chunked_ntk_vp, kernel_gradient_flow, kernel_predict,
                              kernel_regression_cg)
from lazyfast.testing import rel_err
from lazyfast.train import TrainConfig, train

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: one thread avoids oversubscription on shared CI cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def problem(n=15, n_test=6, d=4, m=12, k=2, seed=0, bias=True):
    torch.manual_seed(seed)
    net = TwoLayer(d, m, k, activation="tanh", bias=bias, dtype=F64)
    x = torch.randn(n, d, dtype=F64)
    xt = torch.randn(n_test, d, dtype=F64)
    y = torch.randn(n, k, dtype=F64)
    return net, x, xt, y


@pytest.mark.parametrize("k", [1, 2])
def test_linearized_gd_equals_kernel_gd(k):
    """Full-batch GD on a Linearized model with the square loss is kernel GD in function
    space: f_s = y + (I − ηK/n)^s (f_0 − y), at training and test points, every step."""
    net, x, xt, y = problem(k=k)
    lr, steps = 0.7, 100
    K = lazyfast.empirical_ntk(net, x, mode="full")
    Kt = lazyfast.empirical_ntk(net, xt, x, mode="full")
    with torch.no_grad():
        f0, f0t = net(x), net(xt)
    flow = KernelGradientFlow(K, y, f0, lr=lr)
    lin = Linearized(net)
    seen = {}

    def record(state):
        with torch.no_grad():
            seen[state["step"]] = (lin(x).clone(), lin(xt).clone())

    train(lin, x, y, TrainConfig(lr=lr, steps=steps, progress=False), callback=record)
    worst = 0.0
    for s in range(1, steps + 1):
        ftr, fte = seen[s]
        worst = max(worst, rel_err(ftr, flow.train_predictions(steps=s)),
                    rel_err(fte, flow.test_predictions(Kt, f0t, steps=s)))
    assert worst <= 1e-8, worst
    # the run made progress (the check is not vacuous)
    assert float(((seen[steps][0] - y) ** 2).sum()) < 0.5 * float(((f0 - y) ** 2).sum())


def test_shared_kernel_matches_full_kernel_for_k1():
    net, x, xt, y = problem(k=1)
    K = lazyfast.empirical_ntk(net, x, mode="full")
    Kt = lazyfast.empirical_ntk(net, xt, x, mode="full")
    f_full = kernel_gradient_flow(K, y, 3.0, K_test=Kt, lr=0.5)
    f_tr = kernel_gradient_flow(K[:, :, 0, 0], y, 3.0, K_test=Kt[:, :, 0, 0], lr=0.5)
    assert rel_err(f_tr[0], f_full[0]) <= 1e-12 and rel_err(f_tr[1], f_full[1]) <= 1e-12


def test_gd_closed_form_converges_to_flow_and_to_infinity():
    net, x, xt, y = problem(k=2)
    K = lazyfast.empirical_ntk(net, x, mode="full")
    Kt = lazyfast.empirical_ntk(net, xt, x, mode="full")
    with torch.no_grad():
        f0, f0t = net(x), net(xt)
    T = 2.0
    errs = []
    for lr in (0.1, 0.05, 0.025):
        flow = KernelGradientFlow(K, y, f0, lr=lr)
        steps = round(T / lr)
        errs.append(rel_err(flow.test_predictions(Kt, f0t, steps=steps),
                            KernelGradientFlow(K, y, f0, lr=1.0).test_predictions(Kt, f0t, t=T)))
    # forward Euler: first-order convergence in the step size
    assert 1.7 < errs[0] / errs[1] < 2.3 and 1.7 < errs[1] / errs[2] < 2.3
    flow = KernelGradientFlow(K, y, f0, lr=1.0)
    # t = ∞ on the training set: interpolation (K is non-singular here: n·k = 30 < P = 84)
    assert torch.linalg.eigvalsh(K.permute(0, 2, 1, 3).reshape(30, 30)).min() > 1e-8
    assert rel_err(flow.train_predictions(math.inf), y) <= 1e-9
    assert rel_err(flow.train_predictions(1e9), y) <= 1e-9
    # t = ∞ at test points: f0 + K(x*, X) K⁻¹ (y − f0), against a dense solve
    Kf = K.permute(0, 2, 1, 3).reshape(30, 30)
    c = torch.linalg.solve(Kf, (y - f0).reshape(-1))
    expect = f0t + (Kt.permute(0, 2, 1, 3).reshape(-1, 30) @ c).reshape(-1, 2)
    assert rel_err(flow.test_predictions(Kt, f0t, math.inf), expect) <= 1e-8
    # t = 0 returns f0
    assert rel_err(flow.test_predictions(Kt, f0t, 0.0), f0t) <= 1e-14


def test_flow_with_singular_kernel_is_min_norm():
    # n = 40 points but only P = 4·3 + 3 = 15 parameters: Θ has rank ≤ 15
    net, x, xt, y = problem(n=40, m=3, k=1, bias=True)
    K = lazyfast.empirical_ntk(net, x)
    Kt = lazyfast.empirical_ntk(net, xt, x)
    flow = KernelGradientFlow(K, y, lr=1.0)
    pinv = torch.linalg.pinv(K, hermitian=True, rtol=1e-10)
    assert rel_err(flow.test_predictions(Kt, None, math.inf), Kt @ pinv @ y) <= 1e-6
    # finite t stays finite on the null space, and tends to the t = ∞ value
    assert torch.isfinite(flow.coefficients(5.0)).all()
    assert rel_err(flow.test_predictions(Kt, None, 1e12), flow.test_predictions(Kt, None, math.inf)) <= 1e-6


def test_flow_rejects_bad_input():
    K = torch.eye(3, dtype=F64)
    y = torch.zeros(3, 1, dtype=F64)
    with pytest.raises(ValueError, match="K must be square"):
        KernelGradientFlow(torch.zeros(3, 4, dtype=F64), y)
    with pytest.raises(ValueError, match="y must have 3 rows"):
        KernelGradientFlow(K, torch.zeros(4, 1, dtype=F64))
    with pytest.raises(ValueError, match="K contains NaN"):
        KernelGradientFlow(K * float("nan"), y)
    with pytest.raises(ValueError, match="lr"):
        KernelGradientFlow(K, y, lr=-1.0)
    flow = KernelGradientFlow(K, y)
    with pytest.raises(ValueError, match="t must be >= 0"):
        flow.train_predictions(-1.0)
    with pytest.raises(ValueError, match="steps"):
        flow.train_predictions(steps=-2)
    with pytest.raises(ValueError, match="K_test must have 3 columns"):
        flow.test_predictions(torch.zeros(2, 4, dtype=F64))


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [None, 7])
def test_cg_equals_dense_solve(ridge, chunk):
    net, x, xt, y = problem(n=25, k=2, m=16)
    res = kernel_regression_cg(net, x, y, ridge=ridge, tol=1e-10, chunk_size=chunk)
    K = lazyfast.empirical_ntk(net, x, mode="full").permute(0, 2, 1, 3).reshape(50, 50)
    c = torch.linalg.solve(K + ridge * torch.eye(50, dtype=F64), y.reshape(-1)).reshape(25, 2)
    assert res.converged and res.residual <= 1e-10 and 0 < res.iterations <= 100
    assert rel_err(res.coef, c) <= 1e-6
    pred = kernel_predict(net, xt, x, res.coef, chunk_size=chunk)
    Kt = lazyfast.empirical_ntk(net, xt, x, mode="full").permute(0, 2, 1, 3).reshape(12, 50)
    assert rel_err(pred, (Kt @ c.reshape(-1)).reshape(6, 2)) <= 1e-6
    assert len(res.history) == res.iterations


def test_cg_stops_at_max_iter_and_reports():
    net, x, _, y = problem(n=25, k=1, m=16)
    res = kernel_regression_cg(net, x, y, tol=1e-12, max_iter=3)
    assert res.iterations == 3 and not res.converged and res.residual > 1e-12
    zero = kernel_regression_cg(net, x, torch.zeros_like(y))
    assert zero.converged and zero.iterations == 0 and zero.coef.abs().max() == 0


def test_chunked_ntk_vp_matches_ntk_vp():
    net, x, xt, y = problem(n=23, k=2)
    assert rel_err(chunked_ntk_vp(net, xt, y, x, chunk_size=5), lazyfast.ntk_vp(net, xt, y, x)) <= 1e-12


def test_cg_rejects_bad_input():
    net, x, _, y = problem()
    with pytest.raises(ValueError, match="ridge"):
        kernel_regression_cg(net, x, y, ridge=-1.0)
    with pytest.raises(ValueError, match="tol"):
        kernel_regression_cg(net, x, y, tol=0.0)
    with pytest.raises(ValueError, match="y must have 15 rows"):
        kernel_regression_cg(net, x, y[:3])
    with pytest.raises(ValueError, match="y contains NaN"):
        kernel_regression_cg(net, x, y * float("nan"))
    with pytest.raises(ValueError, match="x contains NaN"):
        kernel_regression_cg(net, x * float("inf"), y)
    with pytest.raises(ValueError, match="max_iter"):
        kernel_regression_cg(net, x, y, max_iter=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        kernel_regression_cg(net, x, y, chunk_size=0)
