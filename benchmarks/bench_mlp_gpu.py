"""GPU benchmark of the structured MLP eNTK (issue 4), for the lead's GPU run:
``python -m pytest benchmarks/bench_mlp_gpu.py --benchmark-only`` (skipped without a GPU).

MLP d=100 → 4096 → 4096 → 4096 → 1, n=8192, Θ(X, X), float32 and float64:
lazyfast (structured factors + CUDA ``hadamard_gram_sum``) vs the pure-PyTorch layerwise
formula (cuBLAS Grams), outputs checked equal. TF32 is off (it changes results).
extra_info: achieved TFLOP/s of the whole call and of the fused op alone, from the FLOP
formula below, and peak GPU memory.
"""
import os
import time

import pytest
import torch

import lazyfast
from lazyfast import _ext, reference
from lazyfast.mlp import hadamard_gram_sum
from lazyfast.testing import rel_err

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_KERNELS),
                                 reason="needs a GPU and lazyfast's CUDA kernels")]

N = int(os.environ.get("LAZYFAST_BENCH_GPU_N", "8192"))
W = int(os.environ.get("LAZYFAST_BENCH_GPU_WIDTH", "4096"))
D = 100
_RESULTS = {}


def flops(n, d, widths, k=1):
    """Dense-equivalent FLOPs: forward 2nP, δ backward 2n·Σ_{l≥2} w_{l-1}w_l·k, and the Grams
    2n²·Σ_l (fan_in_l + k·w_l) (trace mode; a symmetric kernel does about half the Gram work)."""
    dims = [d] + list(widths) + [k]
    fwd = 2 * n * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    bwd = 2 * n * k * sum(a * b for a, b in zip(dims[1:-2], dims[2:-1]))
    gram = 2 * n * n * sum(dims[l] + k * dims[l + 1] for l in range(len(dims) - 1))
    return fwd + bwd, gram


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def problem(request):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = lazyfast.MLP(D, [W, W, W], 1, dtype=request.param, device="cuda")
    x = torch.randn(N, D, dtype=request.param, device="cuda")
    return request.param, model, x


def _timed(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.benchmark(group="mlp_ntk_gpu")
def test_gpu_lazyfast(benchmark, problem):
    dtype, model, x = problem
    fn = _timed(lambda: lazyfast.empirical_ntk(model, x))
    fn()
    torch.cuda.reset_peak_memory_stats()
    out = benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    fb, fg = flops(N, D, [W, W, W])
    benchmark.extra_info.update(dtype=str(dtype), n=N, width=W, peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20,
                                tflops_total=(fb + fg) / benchmark.stats.stats.min / 1e12)
    # the fused op alone on the same factors
    f = reference.mlp_factors(model, x)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        hadamard_gram_sum(f[0], f[1], h_scale=f[2], beta=f[3])
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    benchmark.extra_info["op_s"] = best
    benchmark.extra_info["op_tflops_dense_equiv"] = fg / best / 1e12
    _RESULTS[(dtype, "lazyfast")] = out


@pytest.mark.benchmark(group="mlp_ntk_gpu")
def test_gpu_layerwise_pytorch(benchmark, problem):
    dtype, model, x = problem
    fn = _timed(lambda: reference.mlp_ntk_layerwise(model, x))
    fn()
    torch.cuda.reset_peak_memory_stats()
    out = benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    fb, fg = flops(N, D, [W, W, W])
    benchmark.extra_info.update(dtype=str(dtype), n=N, width=W, peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20,
                                tflops_total=(fb + fg) / benchmark.stats.stats.min / 1e12)
    if (dtype, "lazyfast") in _RESULTS:
        assert rel_err(_RESULTS[(dtype, "lazyfast")], out) < (1e-10 if dtype == torch.float64 else 1e-4)
