"""``lazyfast bench``: every benchmark workload, lazyfast against its pure-PyTorch baselines,
measured in one process so the ratios come from one run on one (possibly noisy) machine.

For each workload and implementation it reports the best wall time of N calls after one
warm-up call (the same protocol and N for every implementation, baselines included), the speed-up of
lazyfast over each baseline, the achieved GFLOP/s (from an explicit FLOP formula) and its
fraction of the machine's GEMM rate measured in the same run (square torch.mm), the
peak extra memory of one call (measured in a fresh subprocess on the CPU; from the CUDA
allocator on a GPU) and the relative disagreement with the first baseline (every
implementation must agree, or the row is flagged and the command exits non-zero). Tolerances
are tight enough that a result 1 % off fails (tests/test_bench.py perturbs results by 1 % and
checks that they are flagged): 1e-4 (float32) / 1e-9 (float64) of the output's max; the
linearized step compares the parameter CHANGE of one step; CG is compared with the direct solve
at 2e-3 (float32) / 1e-8 (float64), its own stopping tolerance being 50× tighter.

Baselines are the methods as their authors write them: ``torch.func`` Jacobian contraction is
``reference.ntk_jacobian(..., chunk_size=None)`` (the torch.func NTK tutorial: whole batch,
x1's Jacobian formed once and reused when x2 = x1), included only when its Jacobians fit in
``func_max_bytes``.

Every result is stamped (:func:`stamp`): machine, load average, date, git commit.

Presets: ``quick`` (CI, about a minute on 2 cores) and ``full`` (the sizes of the issues'
targets; minutes, several GB). On a GPU machine ``--device cuda`` adds the CUDA rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from typing import List, Optional

import torch

import lazyfast
from lazyfast import reference as R
from lazyfast.bench import models as _bench_models
from lazyfast.bench.protocol import (Case, Row, _sync, gemm_gflops, git_commit, loadavg, sgd_step,  # noqa: F401
                                     stamp, time_call)
from lazyfast.lazy import Linearized, square_loss
from lazyfast.models import TwoLayer
from lazyfast.solvers import kernel_regression_cg

# Main-job sizes. "quick" keeps every workload to well under a second per call on 2 cores.
PRESETS = {
    "quick": dict(gram=dict(n=512, d=100, m=2048), prod=dict(n=1024, d=100, m=4096, T=16),
                  mlp=dict(n=512, d=100, w=512), step=dict(n=1024, d=100, m=4096),
                  cg=dict(n=1500, d=50, m=256), repeats=3, func_max_bytes=1 << 30, gemm=1024),
    "full": dict(gram=dict(n=1024, d=100, m=4096), prod=dict(n=4096, d=100, m=16384, T=16),
                 mlp=dict(n=1024, d=100, w=2048), step=dict(n=4096, d=100, m=65536),
                 cg=dict(n=20000, d=100, m=1024), repeats=3, func_max_bytes=12 << 30, gemm=2048),
}
AGREE_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


# ----------------------------------------------------------------------------- workloads
def _flat(out) -> torch.Tensor:
    if isinstance(out, dict):
        return torch.cat([v.detach().reshape(-1).double().cpu() for _, v in sorted(out.items())])
    if isinstance(out, (tuple, list)):
        return torch.cat([t.detach().reshape(-1).double().cpu() for t in out])
    return out.detach().reshape(-1).double().cpu()


def _two_layer(d, m, k, dtype, device, seed=0):
    torch.manual_seed(seed)
    return TwoLayer(d, m, k, activation="relu", dtype=dtype, device=device)


def _inputs(n, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype).to(device)


def case_two_layer_gram(p, dtype, device, func_max_bytes):
    n, d, m = p["n"], p["d"], p["m"]
    model = _two_layer(d, m, 1, dtype, device)
    x1, x2 = _inputs(n, d, dtype, device, 1), _inputs(n, d, dtype, device, 2)
    A, B = model.hidden.weight.detach(), model.output.weight.detach()
    impls = {
        "dense PyTorch (GEMMs)": lambda: R.two_layer_ntk_dense(x1, x2, A, None, B, model.scale, "relu"),
        "lazyfast": lambda: lazyfast.empirical_ntk(model, x1, x2),
    }
    if 2 * n * (d + 1) * m * x1.element_size() <= func_max_bytes:
        impls["torch.func jacobian"] = lambda: R.ntk_jacobian(model, x1, x2)
    return Case(impls, flops=4.0 * n * n * m + 2.0 * 2 * n * m * d + 2.0 * n * n * d,
                note=f"n1=n2={n}, d={d}, m={m}, k=1, trace, X2 given")


def _product_setup(p, dtype, device):
    n, d, m = p["n"], p["d"], p["m"]
    model = _two_layer(d, m, 1, dtype, device)
    x = _inputs(n, d, dtype, device, 3)
    return model, x, n, d, m


def case_two_layer_jvp(p, dtype, device, func_max_bytes):
    model, x, n, d, m = _product_setup(p, dtype, device)
    T = p["T"]
    g = torch.Generator().manual_seed(4)
    tangents = {"hidden.weight": torch.randn(T, m, d, generator=g, dtype=dtype).to(device),
                "output.weight": torch.randn(T, 1, m, generator=g, dtype=dtype).to(device)}
    A, B = model.hidden.weight.detach(), model.output.weight.detach()
    impls = {"dense PyTorch (GEMMs)": lambda: R.two_layer_jvp_dense(x, A, None, B, model.scale, "relu",
                                                                   tangents["hidden.weight"], None,
                                                                   tangents["output.weight"]),
             "lazyfast": lambda: lazyfast.jvp(model, x, tangents)}
    if T * n * m * x.element_size() * 3 <= func_max_bytes:
        impls["torch.func vmap(jvp)"] = lambda: R.jvp(model, x, tangents)
    return Case(impls, flops=2.0 * n * m * d * (T + 1) + 4.0 * T * n * m,
                note=f"n={n}, d={d}, m={m}, T={T} tangents")


def case_two_layer_vjp(p, dtype, device, func_max_bytes):
    model, x, n, d, m = _product_setup(p, dtype, device)
    r = _inputs(n, 1, dtype, device, 5)
    A, B = model.hidden.weight.detach(), model.output.weight.detach()
    return Case({"dense PyTorch (GEMMs)": lambda: R.two_layer_vjp_dense(x, A, None, B, model.scale, "relu", r)[::2],
                 "lazyfast": lambda: (lambda g: (g["hidden.weight"], g["output.weight"]))(lazyfast.vjp(model, x, r)),
                 "torch.func vjp": lambda: (lambda g: (g["hidden.weight"], g["output.weight"]))(R.vjp(model, x, r))},
                flops=4.0 * n * m * d + 4.0 * n * m, note=f"n={n}, d={d}, m={m}")


def case_two_layer_ntk_vp(p, dtype, device, func_max_bytes):
    model, x, n, d, m = _product_setup(p, dtype, device)
    v = _inputs(n, 1, dtype, device, 6)
    A, B = model.hidden.weight.detach(), model.output.weight.detach()
    return Case({"dense PyTorch (GEMMs)": lambda: R.two_layer_ntk_vp_dense(x, None, A, None, B, model.scale, "relu", v),
                 "lazyfast": lambda: lazyfast.ntk_vp(model, x, v),
                 "torch.func vjp+jvp": lambda: R.ntk_vp(model, x, v)},
                flops=10.0 * n * m * d, note=f"Θ(X, X)·v, n={n}, d={d}, m={m}")


def case_mlp_ntk(p, dtype, device, func_max_bytes):
    n, d, w = p["n"], p["d"], p["w"]
    torch.manual_seed(0)
    model = lazyfast.MLP(d, [w, w, w], 1, dtype=dtype, device=device)
    x = _inputs(n, d, dtype, device, 7)
    P = sum(q.numel() for q in model.parameters())
    impls = {"layerwise PyTorch": lambda: R.mlp_ntk_layerwise(model, x),
             "lazyfast": lambda: lazyfast.empirical_ntk(model, x)}
    if n * P * x.element_size() <= func_max_bytes:
        impls["torch.func jacobian"] = lambda: R.ntk_jacobian(model, x)
    dims = [d, w, w, w, 1]
    gram = 2.0 * n * n * sum(dims[i] + dims[i + 1] for i in range(len(dims) - 1))
    return Case(impls, flops=gram + 4.0 * n * sum(a * b for a, b in zip(dims[:-1], dims[1:])),
                note=f"MLP {d}→{w}→{w}→{w}→1, n={n}, trace, X2=None")


def case_linearized_step(p, dtype, device, func_max_bytes):
    n, d, m = p["n"], p["d"], p["m"]
    x, y = _inputs(n, d, dtype, device, 8), _inputs(n, 1, dtype, device, 9)
    lr = 0.1

    def make(kind):
        net = _two_layer(d, m, 1, dtype, device)
        if kind == "torch.func jvp":
            step, w = R.linearized_step_torch_func(net, x, y, lr, square_loss)
            return step, lambda: [w[k] for k in sorted(w)]
        mod = Linearized(net) if kind == "lazyfast" else net
        step = sgd_step(mod, x, y, lr, square_loss)
        named = dict((k, v) for k, v in (mod.model if kind == "lazyfast" else mod).named_parameters())
        return step, lambda: [named[k] for k in sorted(named)]

    impls = {}
    for kind in ("torch.func jvp", "standard (nonlinear) step", "lazyfast"):
        step, params = make(kind)
        impls[kind] = _stepper(step, params, kind != "standard (nonlinear) step")
    return Case(impls, note=f"TwoLayer n={n}, d={d}, m={m}: forward + backward + SGD update "
                            "(the standard step trains the network itself, so it is not compared)")


def _stepper(step, params, compare):
    """Runs one step per call. What is compared is the CHANGE of the parameters made by the
    first step (w1 − w0), not the parameters: a step moves them by ~1e-2 of their size, so
    comparing w1 would let a gradient 1 % wrong pass."""
    state = {"w0": [t.detach().clone() for t in params()]} if compare else {}

    def run():
        step()
        if compare and "first" not in state:
            state["first"] = [t.detach() - t0 for t, t0 in zip(params(), state["w0"])]
        return state.get("first", None)

    run.compare = compare
    return run


def case_kernel_regression(p, dtype, device, func_max_bytes):
    n, d, m = p["n"], p["d"], p["m"]
    model = _two_layer(d, m, 1, dtype, device)
    x, y = _inputs(n, d, dtype, device, 10), _inputs(n, 1, dtype, device, 11)
    ridge = 1e-2 * n

    def dense():
        K = lazyfast.empirical_ntk(model, x)
        return torch.linalg.solve(K + ridge * torch.eye(n, dtype=dtype, device=device), y)

    # CG stops at a relative residual 50x below the agreement tolerance, so a coefficient vector
    # 1 % off fails the comparison with the direct solve (tests/test_bench.py checks it).
    tol, agree = (2e-10, 1e-8) if dtype == torch.float64 else (4e-5, 2e-3)
    return Case({"dense Θ + solve": dense,
                 "lazyfast matrix-free CG": lambda: kernel_regression_cg(model, x, y, ridge=ridge, tol=tol,
                                                                         max_iter=10 * n).coef},
                tol=agree, note=f"(Θ + {ridge:g}·I) c = y, n={n}, d={d}, m={m}, CG tol {tol:g}, agreement {agree:g}")


def case_models(p, dtype, device, func_max_bytes):
    return _bench_models.case(p, dtype, device, func_max_bytes)  # the models users bring, tiny sizes


WORKLOADS = {
    "two_layer_gram": (case_two_layer_gram, "gram"),
    "two_layer_jvp": (case_two_layer_jvp, "prod"),
    "two_layer_vjp": (case_two_layer_vjp, "prod"),
    "two_layer_ntk_vp": (case_two_layer_ntk_vp, "prod"),
    "mlp_ntk": (case_mlp_ntk, "mlp"),
    "linearized_step": (case_linearized_step, "step"),
    "kernel_regression": (case_kernel_regression, "cg"),
    "models": (case_models, "mlp"),
}


def build_case(name: str, preset: str, dtype, device) -> Case:
    fn, key = WORKLOADS[name]
    cfg = PRESETS[preset]
    return fn(cfg[key], dtype, device, cfg["func_max_bytes"])


# ----------------------------------------------------------------------------- measurement
def _rss_kb(field_name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def child_peak_mb(workload, impl, preset, dtype_name) -> float:
    """In this (fresh) process: build the case, reset the RSS high-water mark, run ``impl`` once."""
    dtype = getattr(torch, dtype_name)
    case = build_case(workload, preset, dtype, "cpu")
    fn = case.impls[impl]
    base = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux ≥ 4.0)
            f.write("5")
    except OSError:
        pass
    fn()
    return max(0.0, (_rss_kb("VmHWM") - base) / 1024.0)


def peak_mb(workload, impl, preset, dtype, device) -> Optional[float]:
    if torch.device(device).type == "cuda":
        case = build_case(workload, preset, dtype, device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.impls[impl]()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, "-m", "lazyfast.bench", "--child", workload, impl, preset, str(dtype).split(".")[1]]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        return None
    return float(r.stdout.strip().splitlines()[-1])


def run(preset: str = "quick", *, workloads: Optional[List[str]] = None, dtype=torch.float32, device="cpu",
        memory: bool = True, log=print) -> dict:
    """Runs the workloads and returns ``{"machine": …, "rows": [Row as dict, …]}``."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    names = workloads or list(WORKLOADS)
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")

    started = stamp()  # the load average before this run's own work
    rows: List[Row] = []
    notes = {}
    g = PRESETS[preset]["gemm"]
    # The machine's GEMM rate in this run and dtype: the ceiling every GFLOP/s figure is compared to.
    rate = gemm_gflops((g, g, g), dtype, device)
    log(f"  GEMM {g}x{g}x{g} {dtype}: {rate:.1f} GFLOP/s")
    for name in names:
        case = build_case(name, preset, dtype, device)
        notes[name] = case.note
        ref_name = next(iter(case.impls))
        ref_out = None
        tol = case.tol or AGREE_TOL[dtype]
        wl_rows = []
        for impl, fn in case.impls.items():
            out_holder = {}

            def call(fn=fn, out_holder=out_holder):
                out_holder.setdefault("out", fn())

            secs = time_call(call, device, PRESETS[preset]["repeats"])
            row = Row(name, impl, secs)
            if case.flops:
                row.gflops = case.flops / secs / 1e9
                row.gemm_fraction = row.gflops / rate if rate else None
            out = out_holder.get("out")
            if getattr(fn, "compare", True) and out is not None:
                flat = _flat(out)
                if ref_out is None:
                    ref_out = flat
                    row.rel_err = 0.0
                else:
                    scale = ref_out.abs().max().clamp_min(1e-300)
                    row.rel_err = float((flat - ref_out).abs().max() / scale)
                    row.agrees = row.rel_err <= tol
            if memory:
                row.peak_mb = peak_mb(name, impl, preset, dtype, device)
            wl_rows.append(row)
            log(f"  {name:18s} {impl:28s} {secs * 1e3:10.2f} ms" + (f"  {row.gflops:8.2f} GFLOP/s" if row.gflops else ""))
        lf = next((r for r in wl_rows if r.implementation.startswith("lazyfast")), None)
        if lf is not None:
            lf.speedup = {r.implementation: r.seconds / lf.seconds for r in wl_rows if r is not lf}
        rows.extend(wl_rows)
    machine = {**started, "load_avg_after": loadavg(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
               "gpu": torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else None,
               "dtype": str(dtype), "preset": preset, "backend": lazyfast.backend_info(),
               "gemm_gflops": rate, "gemm_size": g,
               "repeats": PRESETS[preset]["repeats"], "timing": "best of repeats after one warm-up call"}
    return {"machine": machine, "notes": notes, "rows": [asdict(r) for r in rows]}


def format_table(result: dict) -> str:
    """Markdown table of a :func:`run` result."""
    m = result["machine"]
    lines = [f"Machine: {m['processor']}, {m['cpu_count']} cores, {m['threads']} threads, device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else "") + f"; {m['dtype']}; preset {m['preset']}; {m['date']}; "
             f"load average {m.get('load_avg')}; commit {m.get('commit')}. Times: best of {m.get('repeats')} calls after "
             f"one warm-up, every implementation alike. "
             f"GEMM rate measured in this run ({m['gemm_size']}³ torch.mm): {m['gemm_gflops']:.1f} GFLOP/s.", "",
             "| workload | implementation | time (ms) | lazyfast speed-up | GFLOP/s | % of GEMM | peak extra MB | rel. err |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        sp = ", ".join(f"{v:.1f}× vs {k}" for k, v in r["speedup"].items())
        lines.append(
            f"| {r['workload']} | {r['implementation']} | {r['seconds'] * 1e3:.1f} | {sp} | "
            + (f"{r['gflops']:.1f}" if r["gflops"] else "") + " | "
            + (f"{100 * r['gemm_fraction']:.0f}%" if r["gemm_fraction"] else "") + " | "
            + (f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "") + " | "
            + (f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "—")
            + ("" if r["agrees"] else " **DISAGREES**") + " |")
    lines.append("")
    for k, v in result["notes"].items():
        lines.append(f"- `{k}`: {v}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lazyfast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (the CI preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="quick or full (default full unless --quick)")
    p.add_argument("--workloads", help="comma-separated subset of " + ", ".join(WORKLOADS))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--markdown", help="write the table as Markdown to this path")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(child_peak_mb(*args.child))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    preset = args.preset or ("quick" if args.quick else "full")
    wl = [w for w in args.workloads.split(",") if w] if args.workloads else None
    result = run(preset, workloads=wl, dtype=getattr(torch, args.dtype), device=args.device,
                 memory=not args.no_memory)
    table = format_table(result)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    bad = [r for r in result["rows"] if not r["agrees"]]
    if bad:
        print(f"\nERROR: {len(bad)} implementation(s) disagree with the baseline", file=sys.stderr)
        return 1
    return 0

