"""GPU benchmark of the structured MLP eNTK, run by scripts/gpu_check.sh (needs a GPU):

    python benchmarks/bench_mlp_gpu.py --out DIR      # writes DIR/mlp_gpu.json

MLP d = 100 -> 4096 -> 4096 -> 4096 -> 1, Theta(X, X) at n = 16384 (LAZYFAST_BENCH_GPU_N),
float32 and float64. In the same run and at equal precision: the cuBLAS GEMM rate (8192^3), the
dense cuBLAS formulation as the first baseline (reference.mlp_ntk_layerwise: one n x n Gram
per factor and layer, then the Hadamard sums), lazyfast.empirical_ntk, and the fused
hadamard_gram_sum alone on the same factors. FLOPs (dense-equivalent): forward 2 n P, delta
backward, and the Grams 2 n^2 sum_l (fan_in_l + k w_l); the symmetric op performs about half
of the Gram term. TF32 off.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's lazyfast

import lazyfast
from lazyfast import reference
from lazyfast._ops.hadamard_gram import hadamard_gram_sum
from lazyfast.bench.protocol import cuda_time as _time
from lazyfast.testing import rel_err

N = int(os.environ.get("LAZYFAST_BENCH_GPU_N", "16384"))
W = int(os.environ.get("LAZYFAST_BENCH_GPU_WIDTH", "4096"))
D = 100


def flops(n, d, widths, k=1):
    dims = [d] + list(widths) + [k]
    fwd = 2 * n * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    bwd = 2 * n * k * sum(a * b for a, b in zip(dims[1:-2], dims[2:-1]))
    gram = 2 * n * n * sum(dims[l] + k * dims[l + 1] for l in range(len(dims) - 1))
    return fwd + bwd, gram


def run(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    g_rate = 2 * 8192**3 / _time(lambda: a @ a, reps=5)
    del a
    model = lazyfast.MLP(D, [W, W, W], 1, dtype=dtype, device="cuda")
    x = torch.randn(N, D, dtype=dtype, device="cuda")
    fb, fg = flops(N, D, [W, W, W])
    t_dense = _time(lambda: reference.mlp_ntk_layerwise(model, x))
    dense = reference.mlp_ntk_layerwise(model, x)
    torch.cuda.reset_peak_memory_stats()
    t_lf = _time(lambda: lazyfast.empirical_ntk(model, x))
    peak = torch.cuda.max_memory_allocated() / 2**20
    out = lazyfast.empirical_ntk(model, x)
    err = rel_err(out, dense)
    del out, dense
    f = reference.mlp_factors(model, x)
    t_op = _time(lambda: hadamard_gram_sum(f[0], f[1], h_scale=f[2], beta=f[3]))
    prec = str(dtype).replace("torch.", "")
    return dict(precision=prec, gemm_tflops=g_rate / 1e12, rows=[
        dict(method="dense cuBLAS formulation (layerwise Grams)", time_s=t_dense, tflops=(fb + fg) / t_dense / 1e12,
             frac_gemm=(fb + fg) / t_dense / g_rate),
        dict(method="lazyfast.empirical_ntk", time_s=t_lf, tflops_dense_equiv=(fb + fg) / t_lf / 1e12,
             tflops=(fb + fg / 2) / t_lf / 1e12, frac_gemm=(fb + fg / 2) / t_lf / g_rate,
             speedup_vs_dense=t_dense / t_lf, rel_err_vs_dense=err, peak_mib=peak),
        dict(method="hadamard_gram_sum alone (symmetric)", time_s=t_op, tflops=fg / 2 / t_op / 1e12,
             frac_gemm=fg / 2 / t_op / g_rate),
    ])


def main():
    ap = argparse.ArgumentParser(description="MLP eNTK GPU benchmark")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    assert torch.cuda.is_available() and lazyfast._ext.HAS_CUDA_KERNELS, "needs a GPU and lazyfast's CUDA kernels"
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        commit = "unknown"
    res = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda, commit=commit,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               n=N, d=D, widths=[W, W, W], results=[run(torch.float32), run(torch.float64)])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mlp_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    for r in res["results"]:
        print(f"{r['precision']}: cuBLAS GEMM {r['gemm_tflops']:.1f} TFLOP/s")
        for row in r["rows"]:
            print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
