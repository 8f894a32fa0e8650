"""CPU benchmarks of the fused two-layer ops against their pure-PyTorch baselines
(issue 3). Each group puts lazyfast and its baselines side by side and checks that
the outputs agree in the same run.

    python -m pytest benchmarks/bench_two_layer.py --benchmark-columns=min,median,rounds

Groups (float32, k = 1, ReLU, NTK scaling):
  two_layer_gram      n=1024, d=100, m=4096: fused (X2=None and X2 given) vs the dense
                      GEMM formulation (reference.two_layer_ntk_dense) vs torch.func
                      Jacobian contraction (reference.ntk_jacobian, whole batch: the
                      tutorial's method; X2=None and X2 given) vs sgemm 2048^3.
  Every benchmark: one warm-up call, then LAZYFAST_BENCH_ROUNDS (3) timed calls.
  two_layer_jvp       n=4096, d=100, m=16384, T=16: fused vs dense vs torch.func vmap(jvp).
  two_layer_vjp       same sizes: fused vs dense vs torch.func vjp.
benchmarks/two_layer_report.py measures the same workloads (plus peak memory at
n=8192, m=65536) in one process and writes benchmarks/results/two_layer_cpu.md.
"""
from __future__ import annotations

import os

import pytest
import torch

import lazyfast
from lazyfast import reference as R
from lazyfast._ops import two_layer as TL
from lazyfast._engine.two_layer import model_weights
from lazyfast.models import TwoLayer
from lazyfast.testing import rel_err

pytestmark = pytest.mark.skipif(lazyfast._ext._C is None, reason="lazyfast._C not built")

# The torch.func baselines take 10+ s (Gram) and ~10 GB (JVP, T=16); LAZYFAST_BENCH_QUICK=1 skips them.
QUICK = os.environ.get("LAZYFAST_BENCH_QUICK", "0") == "1"
AGREE = 1e-4  # float32 results from different summation orders
ROUNDS = int(os.environ.get("LAZYFAST_BENCH_ROUNDS", "3"))


def _bench(benchmark, fn):
    """The protocol of every benchmark here, lazyfast and baselines alike: one warm-up call, then
    ROUNDS timed calls (compare the min)."""
    return benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def _model(d, m, k=1, seed=0):
    torch.manual_seed(seed)
    return TwoLayer(d, m, k, activation="relu")


@pytest.fixture(scope="module")
def gram_case():
    model = _model(100, 4096)
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(1024, 100, generator=g)
    x2 = torch.randn(1024, 100, generator=g)
    w = model_weights(model)
    ref = R.two_layer_ntk_dense(x1, None, w["A"], w["c"], w["B"], w["scale"], "relu")
    return model, x1, x2, w, ref


@pytest.mark.benchmark(group="two_layer_gram")
def test_gram_fused_symmetric(benchmark, gram_case):
    model, x1, _, w, ref = gram_case
    out = _bench(benchmark, lambda: TL.two_layer_ntk(x1, **w))
    assert rel_err(out, ref) < AGREE


@pytest.mark.benchmark(group="two_layer_gram")
def test_gram_fused_two_inputs(benchmark, gram_case):
    model, x1, x2, w, _ = gram_case
    ref = R.two_layer_ntk_dense(x1, x2, w["A"], w["c"], w["B"], w["scale"], "relu")
    out = _bench(benchmark, lambda: TL.two_layer_ntk(x1, x2, **w))
    assert rel_err(out, ref) < AGREE


@pytest.mark.benchmark(group="two_layer_gram")
def test_gram_dense_reference(benchmark, gram_case):
    model, x1, _, w, ref = gram_case
    out = _bench(benchmark, lambda: R.two_layer_ntk_dense(x1, None, w["A"], w["c"], w["B"], w["scale"], "relu"))
    assert rel_err(out, ref) < AGREE


@pytest.mark.benchmark(group="two_layer_gram")
def test_gram_sgemm_2048(benchmark):
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out = _bench(benchmark, lambda: a @ b)
    benchmark.extra_info["gflops"] = 2 * 2048**3 / benchmark.stats.stats.min / 1e9
    assert out.shape == (2048, 2048)


@pytest.mark.skipif(QUICK, reason="LAZYFAST_BENCH_QUICK=1")
@pytest.mark.benchmark(group="two_layer_gram")
def test_gram_torch_func_jacobian(benchmark, gram_case):
    model, x1, _, w, ref = gram_case
    # The torch.func tutorial's method: the whole batch, J formed once and contracted with itself.
    out = _bench(benchmark, lambda: R.ntk_jacobian(model, x1))
    assert rel_err(out, ref) < AGREE


@pytest.mark.skipif(QUICK, reason="LAZYFAST_BENCH_QUICK=1")
@pytest.mark.benchmark(group="two_layer_gram")
def test_gram_torch_func_jacobian_two_inputs(benchmark, gram_case):
    model, x1, x2, w, _ = gram_case
    out = _bench(benchmark, lambda: R.ntk_jacobian(model, x1, x2))
    assert rel_err(out, R.two_layer_ntk_dense(x1, x2, w["A"], w["c"], w["B"], w["scale"], "relu")) < AGREE


# ----------------------------------------------------------------------------- JVP / VJP
@pytest.fixture(scope="module")
def product_case():
    model = _model(100, 16384, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 100, generator=g)
    T = 16
    dA = torch.randn(T, 16384, 100, generator=g)
    dB = torch.randn(T, 1, 16384, generator=g)
    r = torch.randn(4096, 1, generator=g)
    return model, x, dA, dB, r, model_weights(model)


@pytest.mark.benchmark(group="two_layer_jvp")
def test_jvp_fused(benchmark, product_case):
    model, x, dA, dB, _, w = product_case
    out = _bench(benchmark, lambda: TL.two_layer_jvp(x, dA=dA, dB=dB, **w))
    ref = R.two_layer_jvp_dense(x, w["A"], None, w["B"], w["scale"], "relu", dA[:2], None, dB[:2])
    assert rel_err(out[:2], ref) < AGREE


@pytest.mark.skipif(QUICK, reason="LAZYFAST_BENCH_QUICK=1")
@pytest.mark.benchmark(group="two_layer_jvp")
def test_jvp_torch_func(benchmark, product_case):
    model, x, dA, dB, _, w = product_case
    out = _bench(benchmark, lambda: R.jvp(model, x, {"hidden.weight": dA, "output.weight": dB}))
    assert rel_err(out, TL.two_layer_jvp(x, dA=dA, dB=dB, **w)) < AGREE


@pytest.mark.benchmark(group="two_layer_vjp")
def test_vjp_fused(benchmark, product_case):
    model, x, _, _, r, w = product_case
    out = _bench(benchmark, lambda: TL.two_layer_vjp(x, r, **w))
    ref = R.two_layer_vjp_dense(x, w["A"], None, w["B"], w["scale"], "relu", r)
    assert rel_err(out[0], ref[0]) < AGREE and rel_err(out[2], ref[2]) < AGREE


@pytest.mark.benchmark(group="two_layer_vjp")
def test_vjp_dense_reference(benchmark, product_case):
    model, x, _, _, r, w = product_case
    out = _bench(benchmark, lambda: R.two_layer_vjp_dense(x, w["A"], None, w["B"], w["scale"], "relu", r))
    assert out[0].shape == w["A"].shape


@pytest.mark.benchmark(group="two_layer_vjp")
def test_vjp_torch_func(benchmark, product_case):
    model, x, _, _, r, w = product_case
    out = _bench(benchmark, lambda: R.vjp(model, x, r))
    assert rel_err(out["hidden.weight"], TL.two_layer_vjp(x, r, **w)[0]) < AGREE
