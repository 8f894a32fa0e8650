"""CPU benchmarks of issue 4 (run: ``python -m pytest benchmarks/bench_mlp.py --benchmark-only``).

Group ``mlp_ntk``: float32 MLP d=100 → 2048 → 2048 → 2048 → 1, n=1024 (JC: first JC_N), Θ(X, X):
  * lazyfast ``empirical_ntk`` (structured factors + fused ``hadamard_gram_sum``),
  * (c) pure-PyTorch layerwise formula, dense per-layer Grams (``reference.mlp_ntk_layerwise``),
  * (a) ``torch.func`` Jacobian contraction (``reference.ntk_jacobian``, chunked: unchunked
    Jacobians alone would be 35 GB). Targets: ≥100× over (a), ≥1.5× over (c).
Group ``vgg11_kernel``: the (10N)×(10N) kernel of the centered VGG-11 at init, N=100 CIFAR-size
inputs: ``lazyfast.kernels.extract_kernel`` vs (d) the authors' per-output backward loop (on the
first AUTHORS_N inputs, lazyfast re-timed on the same inputs in that test).

Every benchmark stores ``peak_rss_mb`` (peak resident memory of the call) in extra_info and
checks its output against lazyfast's. Sizes can be reduced with LAZYFAST_BENCH_N /
LAZYFAST_BENCH_VGG_N for a smoke run.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _memory  # noqa: E402

import lazyfast  # noqa: E402
from lazyfast import kernels, reference  # noqa: E402
from lazyfast.testing import rel_err  # noqa: E402

N = int(os.environ.get("LAZYFAST_BENCH_N", "1024"))
VGG_N = int(os.environ.get("LAZYFAST_BENCH_VGG_N", "100"))
AUTHORS_BS = int(os.environ.get("LAZYFAST_BENCH_AUTHORS_BS", "9"))  # the authors' script.sh uses --bs 9
# The slow baselines run on the first JC_N / AUTHORS_N samples (on 2 shared cores, torch.func JC at
# n=1024 takes ~20 min and the authors' loop at N=100 over an hour); lazyfast is timed on the same
# subset in the same test for the ratio, and on the full size in its own test.
JC_N = int(os.environ.get("LAZYFAST_BENCH_JC_N", "256"))
AUTHORS_N = int(os.environ.get("LAZYFAST_BENCH_AUTHORS_N", "10"))
JC_CHUNK = int(os.environ.get("LAZYFAST_BENCH_JC_CHUNK", "64"))
_RESULTS = {}


@pytest.fixture(scope="module")
def mlp_problem():
    torch.manual_seed(0)
    model = lazyfast.MLP(100, [2048, 2048, 2048], 1)
    x = torch.randn(N, 100)
    return model, x


def _run(benchmark, key, fn, rounds):
    """rounds > 1: one measured warm-up call (peak memory), then ``rounds`` timed calls.
    rounds == 1 (slow baselines): the single timed call is also the measured one."""
    holder = {}

    def measured():
        out, dt, peak, before = _memory.measure(fn)
        holder.update(peak=peak, before=before)
        return out

    if rounds > 1:
        measured()
        res = benchmark.pedantic(fn, rounds=rounds, iterations=1)
    else:
        res = benchmark.pedantic(measured, rounds=1, iterations=1)
    benchmark.extra_info["peak_rss_mb"] = round(holder["peak"] / 2**20, 1)
    benchmark.extra_info["rss_before_mb"] = round(holder["before"] / 2**20, 1)
    _RESULTS[key] = res
    return res


@pytest.mark.benchmark(group="mlp_ntk")
def test_mlp_lazyfast(benchmark, mlp_problem):
    model, x = mlp_problem
    benchmark.extra_info["threads"] = torch.get_num_threads()
    _run(benchmark, "lazyfast", lambda: lazyfast.empirical_ntk(model, x), rounds=5)


@pytest.mark.benchmark(group="mlp_ntk")
def test_mlp_layerwise_pytorch(benchmark, mlp_problem):
    model, x = mlp_problem
    res = _run(benchmark, "layerwise", lambda: reference.mlp_ntk_layerwise(model, x), rounds=5)
    if "lazyfast" in _RESULTS:
        assert rel_err(_RESULTS["lazyfast"], res) < 1e-4


@pytest.mark.benchmark(group="mlp_ntk")
def test_mlp_torchfunc_jacobian(benchmark, mlp_problem):
    model, x = mlp_problem
    xs = x[:JC_N]
    mine, t_mine, peak_mine, _ = _memory.measure(lambda: lazyfast.empirical_ntk(model, xs))
    res = _run(benchmark, "jacobian", lambda: reference.ntk_jacobian(model, xs, chunk_size=JC_CHUNK), rounds=1)
    benchmark.extra_info.update(n=JC_N, lazyfast_same_n_s=round(t_mine, 4),
                                lazyfast_same_n_peak_rss_mb=round(peak_mine / 2**20, 1))
    assert rel_err(mine, res) < 1e-4


@pytest.fixture(scope="module")
def vgg_problem():
    torch.manual_seed(0)
    net = kernels.centered(lazyfast.vgg11())
    x = torch.rand(VGG_N, 3, 32, 32) * 2 - 1  # CIFAR-size inputs
    return net, x


@pytest.mark.benchmark(group="vgg11_kernel")
def test_vgg11_lazyfast_extract(benchmark, vgg_problem):
    net, x = vgg_problem
    info = {}
    _run(benchmark, "vgg_lazyfast", lambda: kernels.extract_kernel(net, x, info=info), rounds=1)
    benchmark.extra_info["layer_methods"] = info.get("methods")


@pytest.mark.benchmark(group="vgg11_kernel")
def test_vgg11_authors_loop(benchmark, vgg_problem):
    net, x = vgg_problem
    xs = x[:AUTHORS_N]
    mine, t_mine, peak_mine, _ = _memory.measure(lambda: kernels.extract_kernel(net, xs))
    res = _run(benchmark, "vgg_authors",
               lambda: reference.per_output_loop_kernel(net, xs, batch_size=AUTHORS_BS), rounds=1)
    benchmark.extra_info.update(n=AUTHORS_N, batch_size=AUTHORS_BS, lazyfast_same_n_s=round(t_mine, 3),
                                lazyfast_same_n_peak_rss_mb=round(peak_mine / 2**20, 1))
    # both use float32 gradients and a float64 kernel; the loop's 9.2M-long float32 dot products
    # carry ~1e-4 relative error (measured against float64 in tests/test_generic_ntk.py)
    assert rel_err(mine, res) < 2e-3
