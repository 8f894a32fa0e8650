"""Measures the issue-3 CPU workloads of the fused two-layer ops in one process
(ratios are only meaningful within one run on a shared machine) and writes
benchmarks/results/two_layer_cpu.{md,json}.

    python benchmarks/two_layer_report.py [--quick] [--out benchmarks/results]

Timing protocol, the same for every method (lazyfast and baselines): one warm-up call, then
the best of REPEAT timed calls; the Gram variants are interleaved so a burst of load from
other processes hits all of them alike.

Workloads (float32, k = 1, ReLU, NTK scaling):
  * Gram n=1024, d=100, m=4096: fused (X2=None, X2 given), dense GEMM reference,
    torch.func Jacobian contraction as the torch.func NTK tutorial writes it
    (reference.ntk_jacobian with chunk_size=None: the whole batch at once, and for X2=None
    the Jacobian formed once and contracted with itself; X2 given: J1 and J2 once each), and
    the sgemm rate (2048^3) of this machine.
  * Peak extra memory of the fused Gram at n=8192, d=100, m=65536 (a fresh
    subprocess; VmHWM minus VmRSS before the call).
  * JVP (T=16 tangents) and VJP at n=4096, d=100, m=16384: fused vs dense vs torch.func.
FLOP counts: Gram 4·n1·n2·m + pre-activations 2·(n1+n2)·m·d + input Gram 2·n1·n2·d;
the symmetric case multiplies half the tiles and is reported against the same count
("effective") and against the work done ("performed": half the Gram terms).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lazyfast  # noqa: E402
from lazyfast.bench import stamp  # noqa: E402
from lazyfast import reference as R  # noqa: E402
from lazyfast._ops import two_layer as TL  # noqa: E402
from lazyfast._engine.two_layer import model_weights
from lazyfast.models import TwoLayer  # noqa: E402
from lazyfast.testing import rel_err  # noqa: E402


REPEAT = 3  # timed calls per method, after one warm-up call


def best_time(fn, repeat=REPEAT, warmup=1):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def mem_available_gb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def model(d, m, k=1, seed=0):
    torch.manual_seed(seed)
    return TwoLayer(d, m, k, activation="relu")


# ----------------------------------------------------------------------------- Gram
def bench_gram(res, quick):
    n, d, m = 1024, 100, 4096
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t_mm = best_time(lambda: a @ b, repeat=7)
    sgemm = 2 * 2048**3 / t_mm
    mdl = model(d, m)
    w = model_weights(mdl)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    dense_sym = lambda: R.two_layer_ntk_dense(x1, None, w["A"], w["c"], w["B"], w["scale"], "relu")  # noqa: E731
    dense_asym = lambda: R.two_layer_ntk_dense(x1, x2, w["A"], w["c"], w["B"], w["scale"], "relu")  # noqa: E731
    fused_sym = lambda: TL.two_layer_ntk(x1, **w)  # noqa: E731
    fused_asym = lambda: TL.two_layer_ntk(x1, x2, **w)  # noqa: E731
    variants = [("fused_sym", fused_sym), ("fused_asym", fused_asym), ("dense_sym", dense_sym),
                ("dense_asym", dense_asym), ("sgemm", lambda: a @ b)]
    if not quick:
        # The tutorial's method, unchunked: its Jacobians (n·P floats = 1.7 GB each) fit here.
        variants += [("torch_func_sym", lambda: R.ntk_jacobian(mdl, x1)),
                     ("torch_func_asym", lambda: R.ntk_jacobian(mdl, x1, x2))]
    # Interleave so a burst of load from other processes hits all variants alike.
    times = {k: float("inf") for k, _ in variants}
    for _, f in variants:
        f()
    for _ in range(REPEAT):
        for key, f in variants:
            t0 = time.perf_counter()
            f()
            times[key] = min(times[key], time.perf_counter() - t0)
    sgemm = max(sgemm, 2 * 2048**3 / times["sgemm"])
    err_sym = rel_err(fused_sym(), dense_sym().double())
    err_asym = rel_err(fused_asym(), dense_asym().double())
    flops = 4 * n * n * m + 2 * 2 * n * m * d + 2 * n * n * d
    flops_sym_done = 2 * n * n * m + 2 * n * m * d + n * n * d
    out = {
        "shape": dict(n=n, d=d, m=m, k=1, dtype="float32"),
        "sgemm_gflops": sgemm / 1e9,
        "time_s": times,
        "flops_counted": flops,
        "fused_asym_gflops": flops / times["fused_asym"] / 1e9,
        "fused_asym_frac_sgemm": flops / times["fused_asym"] / sgemm,
        "fused_sym_effective_gflops": flops / times["fused_sym"] / 1e9,
        "fused_sym_performed_gflops": flops_sym_done / times["fused_sym"] / 1e9,
        "fused_sym_performed_frac_sgemm": flops_sym_done / times["fused_sym"] / sgemm,
        "dense_asym_frac_sgemm": flops / times["dense_asym"] / sgemm,
        "speedup_vs_dense_sym": times["dense_sym"] / times["fused_sym"],
        "speedup_vs_dense_asym": times["dense_asym"] / times["fused_asym"],
        "rel_err_vs_dense": max(err_sym, err_asym),
    }
    if not quick:
        out["rel_err_torch_func"] = max(rel_err(fused_sym(), R.ntk_jacobian(mdl, x1).double()),
                                        rel_err(fused_asym(), R.ntk_jacobian(mdl, x1, x2).double()))
        out["torch_func_chunk_size"] = None
        out["speedup_vs_torch_func_sym"] = times["torch_func_sym"] / times["fused_sym"]
        out["speedup_vs_torch_func_asym"] = times["torch_func_asym"] / times["fused_asym"]
    res["gram"] = out


# ----------------------------------------------------------------------------- memory
_MEM_CHILD = r"""
import sys, torch
sys.path.insert(0, {root!r})
from lazyfast._ops import two_layer as TL
def status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
n, d, m, same = {n}, {d}, {m}, {same}
torch.manual_seed(0)
A, B = torch.randn(m, d), torch.randn(1, m)
x1 = torch.randn(n, d)
x2 = None if same else torch.randn(n, d)
TL.two_layer_ntk(x1[:64], None if same else x2[:64], A=A, B=B, scale=m ** -0.5)  # warm up MKL / OpenMP
base = status('VmRSS:')
import time; t0 = time.perf_counter()
out = TL.two_layer_ntk(x1, x2, A=A, B=B, scale=m ** -0.5)
t = time.perf_counter() - t0
peak = status('VmHWM:')
print(peak - base, out.numel() * out.element_size(), t)
"""


def bench_memory(res, quick):
    rows = []
    cases = [(8192, 100, 65536, True), (8192, 100, 4096, False)]
    if quick:
        cases = [(8192, 100, 4096, True), (8192, 100, 2048, False)]
    for n, d, m, same in cases:
        code = _MEM_CHILD.format(root=ROOT, n=n, d=d, m=m, same=same)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        extra, out_bytes, t = p.stdout.split()
        extra, out_bytes = int(extra), int(out_bytes)
        limit = 1.2 * out_bytes + 256 * 2**20
        dense = 3 * n * (1 if same else 2) * m * 4 + out_bytes  # Φ, Σ', Z per input set + output
        rows.append(dict(n=n, d=d, m=m, x2_none=same, extra_mb=extra / 2**20, output_mb=out_bytes / 2**20,
                         limit_mb=limit / 2**20, within_target=extra <= limit, time_s=float(t),
                         dense_estimate_mb=dense / 2**20))
    res["memory"] = rows


# ----------------------------------------------------------------------------- JVP / VJP
def bench_products(res, quick):
    n, d, m, T = 4096, 100, 16384, 16
    mdl = model(d, m, seed=2)
    w = model_weights(mdl)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g)
    dA = torch.randn(T, m, d, generator=g)
    dB = torch.randn(T, 1, m, generator=g)
    r = torch.randn(n, 1, generator=g)
    out = {"shape": dict(n=n, d=d, m=m, k=1, T=T, dtype="float32")}
    t_jvp = best_time(lambda: TL.two_layer_jvp(x, dA=dA, dB=dB, **w))
    t_vjp = best_time(lambda: TL.two_layer_vjp(x, r, **w))
    t_vjp_dense = best_time(lambda: R.two_layer_vjp_dense(x, w["A"], None, w["B"], w["scale"], "relu", r))
    t_vjp_func = best_time(lambda: R.vjp(mdl, x, r))
    fv = TL.two_layer_vjp(x, r, **w)
    rv = R.vjp(mdl, x, r)
    out["vjp"] = dict(fused_s=t_vjp, dense_s=t_vjp_dense, torch_func_s=t_vjp_func,
                      speedup_vs_torch_func=t_vjp_func / t_vjp, speedup_vs_dense=t_vjp_dense / t_vjp,
                      rel_err=max(rel_err(fv[0], rv["hidden.weight"]), rel_err(fv[2], rv["output.weight"])))
    # vmap(jvp) and the dense JVP hold (T, n, m) float32 tensors (4.3 GB each); on a shared
    # machine with less free memory they run on fewer tangents and are scaled (linear in T).
    t_base = T if mem_available_gb() > 20 and not quick else 4
    scale = T / t_base
    tang = {"hidden.weight": dA[:t_base], "output.weight": dB[:t_base]}
    t_func = best_time(lambda: R.jvp(mdl, x, tang)) * scale
    t_dense = best_time(lambda: R.two_layer_jvp_dense(x, w["A"], None, w["B"], w["scale"], "relu", dA[:t_base], None,
                                                      dB[:t_base])) * scale
    fj = TL.two_layer_jvp(x, dA=dA[:t_base], dB=dB[:t_base], **w)
    out["jvp"] = dict(fused_s=t_jvp, dense_s=t_dense, torch_func_s=t_func, baseline_tangents=t_base,
                      baseline_scaled_by=scale, speedup_vs_torch_func=t_func / t_jvp, speedup_vs_dense=t_dense / t_jvp,
                      rel_err=rel_err(fj, R.jvp(mdl, x, tang)),
                      fused_gflops=(2 * T * n * m * d + 2 * n * m * d) / t_jvp / 1e9)
    res["products"] = out


def write(res, outdir):
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "two_layer_cpu.json"), "w") as f:
        json.dump(res, f, indent=2)
    g = res["gram"]
    lines = [
        "# Two-layer fused ops on the CPU (issue 3)",
        "",
        f"Machine: {res['machine']}, torch {res['torch']}, {res['threads']} threads. Measured {res['date']} "
        f"at commit {res['commit']} with `{res['command']}`; load average before/after: {res['load_avg']} / "
        f"{res['load_after']} (absolute times on a shared machine are noisy; ratios are measured in one run). "
        f"Every method: one warm-up call, then the best of {res['repeat']} (Gram variants interleaved).",
        "",
        "## eNTK Gram, n=1024, d=100, m=4096, k=1, float32, ReLU",
        "",
        f"sgemm 2048³ in the same run: **{g['sgemm_gflops']:.1f} GFLOP/s**.",
        "",
        "| variant | time (s) | GFLOP/s | vs sgemm |",
        "|---|---|---|---|",
        f"| lazyfast fused, X2 given | {g['time_s']['fused_asym']:.3f} | {g['fused_asym_gflops']:.1f} | "
        f"{g['fused_asym_frac_sgemm']:.0%} |",
        f"| lazyfast fused, X2=None (half the tiles) | {g['time_s']['fused_sym']:.3f} | "
        f"{g['fused_sym_effective_gflops']:.1f} effective / {g['fused_sym_performed_gflops']:.1f} performed | "
        f"{g['fused_sym_performed_frac_sgemm']:.0%} (performed) |",
        f"| dense GEMM reference, X2 given | {g['time_s']['dense_asym']:.3f} | | {g['dense_asym_frac_sgemm']:.0%} |",
        f"| dense GEMM reference, X2=None | {g['time_s']['dense_sym']:.3f} | | |",
    ]
    if "torch_func_sym" in g["time_s"]:
        lines.append(f"| torch.func Jacobian contraction (whole batch), X2=None | {g['time_s']['torch_func_sym']:.2f} | | |")
        lines.append(f"| torch.func Jacobian contraction (whole batch), X2 given | {g['time_s']['torch_func_asym']:.2f} | | |")
    lines += [
        "",
        f"- fused vs dense: **{g['speedup_vs_dense_sym']:.2f}×** (X2=None), **{g['speedup_vs_dense_asym']:.2f}×** "
        f"(X2 given); max relative difference {g['rel_err_vs_dense']:.1e}.",
    ]
    if "speedup_vs_torch_func_sym" in g:
        lines.append(f"- fused vs torch.func Jacobian contraction (unchunked, J once for X2=None): "
                     f"**{g['speedup_vs_torch_func_sym']:.0f}×** (X2=None), **{g['speedup_vs_torch_func_asym']:.0f}×** "
                     f"(X2 given); relative difference {g['rel_err_torch_func']:.1e}.")
    lines += ["", "## Peak extra memory of the fused Gram (fresh subprocess, VmHWM − VmRSS)", "",
              "| n | m | X2 | extra (MB) | output (MB) | target 1.2·out + 256 MB | dense estimate (MB) | time (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["memory"]:
        lines.append(f"| {r['n']} | {r['m']} | {'None' if r['x2_none'] else 'given'} | {r['extra_mb']:.0f} | "
                     f"{r['output_mb']:.0f} | {r['limit_mb']:.0f} ({'met' if r['within_target'] else 'MISSED'}) | "
                     f"{r['dense_estimate_mb']:.0f} | {r['time_s']:.1f} |")
    p = res["products"]
    j, v = p["jvp"], p["vjp"]
    lines += [
        "", "## JVP (T=16 tangents) and VJP, n=4096, d=100, m=16384, k=1, float32", "",
        "| op | lazyfast fused (s) | dense reference (s) | torch.func (s) | speedup vs torch.func |",
        "|---|---|---|---|---|",
        f"| JVP | {j['fused_s']:.3f} | {j['dense_s']:.3f} | {j['torch_func_s']:.3f} | **{j['speedup_vs_torch_func']:.1f}×** |",
        f"| VJP | {v['fused_s']:.3f} | {v['dense_s']:.3f} | {v['torch_func_s']:.3f} | **{v['speedup_vs_torch_func']:.1f}×** |",
        "",
        f"- JVP fused rate {j['fused_gflops']:.1f} GFLOP/s (2·T·n·m·d + 2·n·m·d). The torch.func and dense JVP "
        f"baselines ran on {j['baseline_tangents']} tangents and were scaled ×{j['baseline_scaled_by']:.0f} "
        "(they are linear in T; their (T, n, m) intermediates are 4.3 GB each at T=16; all 16 when more than "
        "20 GB is free).",
        f"- relative differences: JVP {j['rel_err']:.1e}, VJP {v['rel_err']:.1e}.",
    ]
    with open(os.path.join(outdir, "two_layer_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the slow torch.func Gram, smaller memory case")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    if lazyfast._ext._C is None:
        raise SystemExit("lazyfast._C is not built")
    res = dict(stamp("python benchmarks/two_layer_report.py" + (" --quick" if args.quick else "")),
               repeat=REPEAT, quick=args.quick)
    bench_gram(res, args.quick)
    bench_products(res, args.quick)
    bench_memory(res, args.quick)
    res["load_after"] = loadavg()
    write(res, args.out)


if __name__ == "__main__":
    main()
