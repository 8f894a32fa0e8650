"""GPU benchmark of the two-layer eNTK Gram, run by scripts/gpu_check.sh (needs a GPU):

    python benchmarks/bench_two_layer_gpu.py --out DIR      # writes DIR/two_layer_gpu.json

Trace Gram at n = 16384, d = 100, m = 16384, k = 1, ReLU, float32 and float64, X2 given and
X2 = None. In the same run and at equal precision:
  * the cuBLAS GEMM rate (torch.mm 8192^3), the ceiling every rate is compared with;
  * the dense cuBLAS formulation, the first baseline: Phi = relu(X A^T), D = relu'(X A^T) |B|
    as full (n, m) matrices, Theta = s^2 (Phi1 Phi2^T + (X1 X2^T) (.) (D1 D2^T));
  * lazyfast (chunked ATen/cuBLAS driver + fused epilogue kernels);
  * float32 only: the opt-in TF32 mode (lazyfast.precision) and its measured error;
  * a full-mode row (k = 3, n = 4096).
FLOPs performed: 4 n1 n2 m + 2 (n1 + n2) m d + 2 n1 n2 d (X2 given); X2 = None performs
about half of the n^2 terms. Errors: max abs error / max abs entry on 256 rows against the
float64 dense formula. TF32 is off everywhere except in the TF32 rows.
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
import lazyfast.precision as P
from lazyfast import reference as R
from lazyfast._ops import two_layer as TL
from lazyfast._engine.two_layer import model_weights
from lazyfast.models import TwoLayer
from lazyfast.bench.protocol import cuda_time as _time
from lazyfast.testing import rel_err

N, D, M = 16384, 100, 16384


def gemm_rate(dtype):
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    rate = 2 * 8192**3 / _time(lambda: a @ b, reps=5)
    del a, b
    return rate


def dense_gram(x1, x2, A, B, s):
    """The dense cuBLAS formulation (full n x m feature matrices)."""
    z1 = x1 @ A.T
    z2 = z1 if x2 is None else x2 @ A.T
    xx2 = x1 if x2 is None else x2
    w = B[0].abs()
    phi1, phi2 = z1.relu(), z2.relu()
    d1, d2 = (z1 > 0).to(z1.dtype) * w, (z2 > 0).to(z2.dtype) * w
    return (s * s) * (phi1 @ phi2.T + (x1 @ xx2.T) * (d1 @ d2.T))


def rows_error(out, x1, x2, w):
    rows = x1[:256].double()
    ref = R.two_layer_ntk_dense(rows, (x1 if x2 is None else x2).double(), w["A"].double(), None, w["B"].double(),
                                w["scale"], "relu")
    return rel_err(out[:256], ref)


def run(dtype):
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    g_rate = gemm_rate(dtype)
    model = TwoLayer(D, M, 1, activation="relu", dtype=dtype, device="cuda")
    w = model_weights(model)
    g = torch.Generator(device="cuda").manual_seed(1)
    x1 = torch.randn(N, D, generator=g, device="cuda", dtype=dtype)
    x2 = torch.randn(N, D, generator=g, device="cuda", dtype=dtype)
    prec = str(dtype).replace("torch.", "")
    for case, xx2 in (("X2 given", x2), ("X2 = None", None)):
        full_flops = 4 * N * N * M + 2 * 2 * N * M * D + 2 * N * N * D
        done = full_flops if xx2 is not None else 2 * N * N * M + 2 * N * M * D + N * N * D
        t_dense = _time(lambda: dense_gram(x1, xx2, w["A"], w["B"], w["scale"]))
        e_dense = rows_error(dense_gram(x1, xx2, w["A"], w["B"], w["scale"]), x1, xx2, w)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t_lf = _time(lambda: TL.two_layer_ntk(x1, xx2, **w))
        peak = torch.cuda.max_memory_allocated() / 2**20
        e_lf = rows_error(TL.two_layer_ntk(x1, xx2, **w), x1, xx2, w)
        rows.append(dict(method="dense cuBLAS formulation", precision=prec, case=case, time_s=t_dense,
                         tflops=full_flops / t_dense / 1e12, frac_gemm=full_flops / t_dense / g_rate, rel_err=e_dense))
        rows.append(dict(method="lazyfast", precision=prec, case=case, time_s=t_lf, tflops=done / t_lf / 1e12,
                         tflops_dense_equiv=full_flops / t_lf / 1e12, frac_gemm=done / t_lf / g_rate,
                         speedup_vs_dense=t_dense / t_lf, rel_err=e_lf, peak_mib=peak))
        if dtype == torch.float32:
            with P.matmul_precision("tf32"):
                t_tf = _time(lambda: TL.two_layer_ntk(x1, xx2, **w))
                e_tf = rows_error(TL.two_layer_ntk(x1, xx2, **w), x1, xx2, w)
            rows.append(dict(method="lazyfast, TF32 mode", precision="tf32", case=case, time_s=t_tf,
                             tflops=done / t_tf / 1e12, frac_gemm=done / t_tf / g_rate,
                             speedup_vs_dense=t_dense / t_tf, rel_err=e_tf))
    # Full mode, k = 3, n = 4096 (X2 given).
    n, k = 4096, 3
    mk = TwoLayer(D, M, k, activation="relu", dtype=dtype, device="cuda")
    wk = model_weights(mk)
    t_full = _time(lambda: TL.two_layer_ntk(x1[:n], x2[:n], mode="full", **wk))
    flops = 2 * n * n * M * (1 + k * (k + 1) // 2) + 2 * 2 * n * M * D + 2 * n * n * D
    small = TL.two_layer_ntk(x1[:64], x2[:n], mode="full", **wk)
    ref = R.two_layer_ntk_dense(x1[:64].double(), x2[:n].double(), wk["A"].double(), None, wk["B"].double(),
                                wk["scale"], "relu", "full")
    rows.append(dict(method="lazyfast", precision=prec, case=f"full mode k={k}, n={n}, X2 given", time_s=t_full,
                     tflops=flops / t_full / 1e12, frac_gemm=flops / t_full / g_rate, rel_err=rel_err(small, ref)))
    return dict(precision=prec, gemm_tflops=g_rate / 1e12, rows=rows)


def main():
    ap = argparse.ArgumentParser(description="two-layer Gram GPU benchmark")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    assert torch.cuda.is_available() and lazyfast._ext.HAS_CUDA_KERNELS, "needs a GPU and lazyfast's CUDA kernels"
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        commit = "unknown"
    res = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda, commit=commit,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               n=N, d=D, m=M, results=[run(torch.float32), run(torch.float64)])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "two_layer_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    for r in res["results"]:
        print(f"{r['precision']}: cuBLAS GEMM {r['gemm_tflops']:.1f} TFLOP/s")
        for row in r["rows"]:
            print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
