"""GPU benchmarks of the fused two-layer eNTK (issue 3), run by scripts/gpu_check.sh:

    python -m pytest benchmarks/bench_two_layer_gpu.py --benchmark-json=out.json

Gram at n=16384, d=100, m=16384, k=1, ReLU, in float32 (CUDA cores, no TF32) and
float64, for X2=None (half the tiles) and X2 given; in the same run the cuBLAS GEMM
rate (torch.mm, 8192^3, TF32 off) and the torch.func Jacobian-contraction baseline.
The baseline runs at n=1024 (its Jacobian alone is n·P·4 bytes, 6.8 GB at n=1024) and
is scaled by (16384/1024)^2 — its contraction is O(n^2·P), so the scaled time is a
lower bound on what it would take at n=16384.
FLOPs: 4·n1·n2·m (+ 2·(n1+n2)·m·d pre-activations + 2·n1·n2·d input Gram); X2=None
performs half of the first and last terms. Results (TFLOP/s, fraction of the GEMM rate,
speedup over torch.func) are in each benchmark's extra_info and printed.
"""
from __future__ import annotations

import pytest
import torch

import lazyfast
from lazyfast import reference as R
from lazyfast import two_layer as TL
from lazyfast.models import TwoLayer
from lazyfast.testing import rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and lazyfast._ext.HAS_CUDA_KERNELS),
                       reason="needs a CUDA device and lazyfast's CUDA kernels"),
]

N, D, M = 16384, 100, 16384
N_FUNC = 1024
RESULTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _ieee_matmul():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
    if RESULTS:
        print("\n== two-layer Gram on", torch.cuda.get_device_name(0))
        for key, val in sorted(RESULTS.items()):
            print(f"  {key}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in val.items()))


def _sync(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _time(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def case(request):
    dtype = request.param
    torch.manual_seed(0)
    model = TwoLayer(D, M, 1, activation="relu", dtype=dtype, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    x1 = torch.randn(N, D, generator=g, device="cuda", dtype=dtype)
    x2 = torch.randn(N, D, generator=g, device="cuda", dtype=dtype)
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    gemm_rate = 2 * 8192**3 / _time(lambda: a @ a)
    del a
    # torch.func Jacobian contraction at n = N_FUNC, scaled by (N / N_FUNC)^2.
    xs = x1[:N_FUNC]
    t_func = _time(lambda: R.ntk_jacobian(model, xs, chunk_size=256), reps=1)
    ref_small = R.ntk_jacobian(model, xs, chunk_size=256)
    err_func = rel_err(TL.model_ntk(model, xs), ref_small)
    return dict(dtype=dtype, model=model, w=TL.model_weights(model), x1=x1, x2=x2, gemm_rate=gemm_rate,
                t_func_scaled=t_func * (N / N_FUNC) ** 2, err_func=err_func)


def _record(benchmark, case, name, seconds, flops_counted, flops_done, err):
    rate = flops_done / seconds
    info = dict(time_s=seconds, tflops_performed=rate / 1e12, tflops_effective=flops_counted / seconds / 1e12,
                frac_gemm=rate / case["gemm_rate"], gemm_tflops=case["gemm_rate"] / 1e12,
                speedup_vs_torch_func=case["t_func_scaled"] / seconds, torch_func_scaled_s=case["t_func_scaled"],
                rel_err_vs_torch_func_small=case["err_func"], rel_err_256_rows_vs_float64=err)
    benchmark.extra_info.update(info)
    RESULTS[f"{name}/{str(case['dtype']).split('.')[-1]}"] = info


def _rows_error(out, case, x2):
    # 256 rows against the float64 dense reference (same numbers, upcast).
    w = case["w"]
    rows = case["x1"][:256].double()
    ref = R.two_layer_ntk_dense(rows, (case["x1"] if x2 is None else x2).double(), w["A"].double(), None,
                                w["B"].double(), w["scale"], "relu")
    return rel_err(out[:256], ref)


def _assert_accurate(err, case):
    tol = 1e-5 if case["dtype"] == torch.float32 else 1e-10
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@pytest.mark.benchmark(group="two_layer_gram_gpu")
def test_gram_gpu_symmetric(benchmark, case):
    w, x1 = case["w"], case["x1"]
    fn = _sync(lambda: TL.two_layer_ntk(x1, **w))
    out = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    err = _rows_error(out, case, None)
    counted = 4 * N * N * M + 2 * N * M * D + 2 * N * N * D
    done = 2 * N * N * M + 2 * N * M * D + N * N * D
    _record(benchmark, case, "gram_x2_none", _time(lambda: TL.two_layer_ntk(x1, **w)), counted, done, err)
    _assert_accurate(err, case)


@pytest.mark.benchmark(group="two_layer_gram_gpu")
def test_gram_gpu_two_inputs(benchmark, case):
    w, x1, x2 = case["w"], case["x1"], case["x2"]
    fn = _sync(lambda: TL.two_layer_ntk(x1, x2, **w))
    out = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    err = _rows_error(out, case, x2)
    flops = 4 * N * N * M + 2 * 2 * N * M * D + 2 * N * N * D
    _record(benchmark, case, "gram_x2_given", _time(lambda: TL.two_layer_ntk(x1, x2, **w)), flops, flops, err)
    _assert_accurate(err, case)


@pytest.mark.benchmark(group="two_layer_gram_gpu")
def test_gemm_rate(benchmark, case):
    a = torch.randn(8192, 8192, device="cuda", dtype=case["dtype"])
    benchmark.pedantic(_sync(lambda: a @ a), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["gemm_tflops"] = case["gemm_rate"] / 1e12


@pytest.mark.benchmark(group="two_layer_products_gpu")
@pytest.mark.parametrize("which", ["jvp", "vjp"])
def test_products_gpu(benchmark, which):
    torch.manual_seed(0)
    n, m, T = 4096, 16384, 16
    model = TwoLayer(D, m, 1, activation="relu", device="cuda")
    w = TL.model_weights(model)
    x = torch.randn(n, D, device="cuda")
    if which == "jvp":
        dA, dB = torch.randn(T, m, D, device="cuda"), torch.randn(T, 1, m, device="cuda")
        fused = lambda: TL.two_layer_jvp(x, dA=dA, dB=dB, **w)  # noqa: E731
        base = lambda: R.jvp(model, x, {"hidden.weight": dA, "output.weight": dB})  # noqa: E731
        assert rel_err(fused(), base()) < 1e-5
    else:
        r = torch.randn(n, 1, device="cuda")
        fused = lambda: TL.two_layer_vjp(x, r, **w)[0]  # noqa: E731
        base = lambda: R.vjp(model, x, r)["hidden.weight"]  # noqa: E731
        assert rel_err(fused(), base()) < 1e-5
    benchmark.pedantic(_sync(fused), rounds=5, iterations=1, warmup_rounds=1)
    t_f, t_b = _time(fused), _time(base)
    benchmark.extra_info.update(fused_s=t_f, torch_func_s=t_b, speedup_vs_torch_func=t_b / t_f)
    RESULTS[f"{which}_n4096_m16384"] = dict(fused_s=t_f, torch_func_s=t_b, speedup=t_b / t_f)
