"""Linearized training step and matrix-free kernel regression (issue 5).

Group ``linearized_step``: one training step (forward + backward + SGD update) of a
``TwoLayer`` model, three ways, outputs checked against each other in the same run:

* ``standard``     — the plain network (the cost a linearized step should stay near: ≤ 1.3×);
* ``lazyfast``     — :class:`lazyfast.Linearized` with ``implementation="auto"``: on a
  reused (full) batch, the linearization at w0 is cached as autograd graphs, so a step is
  one backward pass through each (JVP by the double-VJP trick, VJP);
* ``lazyfast_ntk`` — ``implementation="products"``: every step one JVP and one VJP at w0
  through the public ``lazyfast.jvp`` / ``lazyfast.vjp`` (the fused kernels once merged);
* ``torch_func``   — the baseline: ``f(w0, x) + torch.func.jvp(f(·, x), w0, w − w0)`` with
  autograd through the JVP (neural-tangents' ``linearize`` recipe; primal recomputed).

Group ``kernel_regression_cg``: matrix-free CG on Θ + λI via ``ntk_vp``.

Sizes: small by default (CI); the issue's sizes (TwoLayer n=4096, d=100, m=65536; CG with
n=200,000, d=100, m=1024) with ``LAZYFAST_BENCH_FULL=1`` — run those alone
(``benchmarks/engine_cpu.py`` records time and peak memory per variant in fresh processes).
``LAZYFAST_BENCH_THREADS=1`` pins torch to one thread (less noise on a loaded machine).
"""
from __future__ import annotations

import os

import pytest
import torch

from lazyfast.bench.protocol import sgd_step
from lazyfast.lazy import Linearized, square_loss
from lazyfast.models import TwoLayer
from lazyfast.reference import linearized_step_torch_func
from lazyfast.solvers import kernel_regression_cg

FULL = os.environ.get("LAZYFAST_BENCH_FULL", "0") == "1"
STEP_SIZES = dict(n=4096, d=100, m=65536) if FULL else dict(n=512, d=100, m=4096)
CG_SIZES = (dict(n=200_000, d=100, m=1024, chunk=20_000, max_iter=int(os.environ.get("LAZYFAST_CG_ITERS", "30")))
            if FULL else dict(n=4000, d=100, m=256, chunk=1000, max_iter=100))
CG_RIDGE_PER_SAMPLE = 1e-3  # ridge = n·λ: Θ has rank ≤ P < n here, a ridge makes the system well posed
CG_TOL = 1e-3
LR = 0.1
THREADS = os.environ.get("LAZYFAST_BENCH_THREADS")  # e.g. 1 on a loaded shared machine


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(int(THREADS))
    yield
    torch.set_num_threads(old)


def make_problem(n, d, m, k=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = TwoLayer(d, m, k, activation="relu", dtype=dtype)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randn(n, k, generator=g, dtype=dtype)
    return net, x, y


# ----------------------------------------------------------------------------- the three steps
def standard_step(net, x, y):
    return sgd_step(net, x, y, LR, square_loss), net


def lazyfast_step(net, x, y, implementation="auto"):
    lin = Linearized(net, implementation=implementation)
    return sgd_step(lin, x, y, LR, square_loss), lin.model


def torch_func_step(net, x, y):
    """Baseline linearized step written with torch.func.jvp (lazyfast.reference)."""
    return linearized_step_torch_func(net, x, y, LR, square_loss)


def lazyfast_ntk_step(net, x, y):
    return lazyfast_step(net, x, y, implementation="products")


STEPS = {"standard": standard_step, "lazyfast": lazyfast_step, "lazyfast_ntk": lazyfast_ntk_step,
         "torch_func": torch_func_step}


def _params(obj):
    return [v.detach() for v in (obj.values() if isinstance(obj, dict) else obj.parameters())]


def check_agreement(sizes, dtype=torch.float32):
    """Two steps of each variant from the same w0: the two linearized variants agree with the
    torch.func baseline on the losses and on the parameter CHANGE w2 − w0 (relative to its own
    size: the steps move w by ~1e-2 of |w|, so comparing w itself would let a gradient 1 % wrong
    pass); the standard and linearized losses agree at w0."""
    res = {}
    for name, build in STEPS.items():
        net, x, y = make_problem(**sizes, dtype=dtype)
        w0 = _params(net)
        w0 = [t.clone() for t in w0]
        step, params = build(net, x, y)
        losses = [step(), step()]
        res[name] = (losses, [p - q for p, q in zip(_params(params), w0)])
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    (lb, db), (ls, _) = res["torch_func"], res["standard"]
    for name in ("lazyfast", "lazyfast_ntk"):
        la, da = res[name]
        assert torch.allclose(la[0], ls[0], rtol=tol), (name, la[0], ls[0])  # same model at w0
        for u, v in zip(la, lb):
            assert torch.allclose(u, v, rtol=tol), (name, u, v)
        for u, v in zip(da, db):
            err = float((u - v).abs().max()) / max(float(v.abs().max()), 1e-300)
            assert err <= 10 * tol, (name, err)
    return res


@pytest.fixture(scope="module")
def agreement():
    return check_agreement(STEP_SIZES)


@pytest.mark.parametrize("variant", list(STEPS))
def test_linearized_step(benchmark, agreement, variant):
    benchmark.group = f"linearized_step n={STEP_SIZES['n']} d={STEP_SIZES['d']} m={STEP_SIZES['m']}"
    net, x, y = make_problem(**STEP_SIZES)
    step, _ = STEPS[variant](net, x, y)
    step()  # warm-up: the cached primal, and the first sighting of the batch for "auto"
    step()  # the second call builds the cached linearization ("auto")
    loss = benchmark.pedantic(step, rounds=3 if FULL else 5, iterations=1)
    assert torch.isfinite(loss)
    n, d, m = STEP_SIZES["n"], STEP_SIZES["d"], STEP_SIZES["m"]
    benchmark.extra_info["sizes"] = dict(STEP_SIZES)
    benchmark.extra_info["n_params"] = m * d + m


def test_kernel_regression_cg(benchmark):
    s = CG_SIZES
    benchmark.group = f"kernel_regression_cg n={s['n']} d={s['d']} m={s['m']}"
    net, x, y = make_problem(s["n"], s["d"], s["m"], dtype=torch.float32)
    ridge = CG_RIDGE_PER_SAMPLE * s["n"]

    def solve():
        return kernel_regression_cg(net, x, y, ridge=ridge, tol=CG_TOL, max_iter=s["max_iter"], chunk_size=s["chunk"])

    res = benchmark.pedantic(solve, rounds=1, iterations=1)
    # the reported residual is recomputed exactly; it must match the solver's verdict
    assert res.converged == (res.residual <= CG_TOL)
    assert res.converged or res.iterations == s["max_iter"]
    if not FULL:
        assert res.converged
    benchmark.extra_info.update(iterations=res.iterations, residual=res.residual, ridge=ridge,
                                seconds_per_iteration=res.seconds / max(res.iterations, 1))
