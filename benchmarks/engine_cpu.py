"""Records the engine's CPU numbers (time and peak memory) in benchmarks/results/engine_cpu.md.

Each measurement runs in a fresh Python process, so its peak resident memory (ru_maxrss)
belongs to that variant alone. "RSS after setup" is measured after building the model,
the data and the step function, before any step; the peak includes the steps (and, for
``lazyfast``, the cached linearization of the batch).

    python benchmarks/engine_cpu.py                # the issue's sizes (minutes; run alone)
    python benchmarks/engine_cpu.py --small        # quick check of the script
    python benchmarks/engine_cpu.py --only step    # just the training-step comparison

Writes benchmarks/results/engine_cpu.md and, beside it, engine_cpu.json (the numbers the
README's tables are generated from; stamped with machine, load, date and commit). Every
variant: ``--warmup`` steps, then the best of ``--repeat`` (the same for all).

Variants of one linearized training step (see bench_linearized.py): standard, lazyfast
(Linearized, implementation="auto": cached linearization on the reused batch),
lazyfast_ntk (Linearized, implementation="products": public jvp/vjp every step) and
torch_func (torch.func.jvp + autograd baseline). Then matrix-free CG kernel regression.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_step(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, HERE)
    from bench_linearized import STEPS, make_problem

    net, x, y = make_problem(args.n, args.d, args.m)
    step, _ = STEPS[args.variant](net, x, y)
    rss0 = _rss_mb()
    times = []
    for _ in range(args.warmup):
        step()
    for _ in range(args.repeat):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    return {"variant": args.variant, "times": times, "min": min(times), "median": statistics.median(times),
            "loss": float(loss), "rss_setup_mb": rss0, "peak_mb": _peak_mb()}


def child_cg(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, HERE)
    from bench_linearized import CG_RIDGE_PER_SAMPLE, CG_TOL, make_problem

    from lazyfast.solvers import kernel_predict, kernel_regression_cg

    net, x, y = make_problem(args.n, args.d, args.m)
    rss0 = _rss_mb()
    res = kernel_regression_cg(net, x, y, ridge=CG_RIDGE_PER_SAMPLE * args.n, tol=CG_TOL, max_iter=args.max_iter,
                               chunk_size=args.chunk)
    xt = x[:1000]
    t = time.perf_counter()
    pred = kernel_predict(net, xt, x, res.coef, chunk_size=args.chunk)
    t_pred = time.perf_counter() - t
    return {"n": args.n, "m": args.m, "d": args.d, "chunk": args.chunk, "iterations": res.iterations,
            "residual": res.residual, "converged": res.converged, "seconds": res.seconds,
            "seconds_per_iteration": res.seconds / max(res.iterations, 1), "history": res.history,
            "predict_1000_seconds": t_pred, "pred_finite": bool(torch.isfinite(pred).all()),
            "rss_setup_mb": rss0, "peak_mb": _peak_mb(), "dense_theta_gb": args.n**2 * 4 / 1e9}


def run_child(argv) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child"] + argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="step", choices=["step", "cg"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="standard")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=100)
    ap.add_argument("--m", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=25_000)
    ap.add_argument("--max-iter", type=int, default=40)
    ap.add_argument("--small", action="store_true", help="small sizes (checks the script in seconds)")
    ap.add_argument("--only", choices=["step", "cg"], default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "engine_cpu.md"))
    args = ap.parse_args()
    if args.child:
        res = child_step(args) if args.kind == "step" else child_cg(args)
        print(json.dumps(res))
        return

    sys.path.insert(0, ROOT)
    from lazyfast.bench import loadavg, stamp

    st = stamp("python benchmarks/engine_cpu.py " + " ".join(sys.argv[1:]))
    record = {**st, "threads": args.threads, "warmup": args.warmup, "repeat": args.repeat, "small": args.small}
    step_n, step_m = (512, 4096) if args.small else (args.n, args.m)
    cg_n, cg_m, cg_chunk = (4000, 256, 1000) if args.small else (200_000, 1024, args.chunk)
    lines = [f"# Engine CPU benchmarks ({st['date']})", "",
             f"Machine: {st['machine']}, torch {st['torch']}, threads={args.threads}; load average before: "
             f"{st['load_avg']}; commit {st['commit']}. Times on a shared machine are noisy: ratios are from one run.", "",
             f"Command: `{st['command']}`", ""]
    if args.only in (None, "step"):
        rows = {}
        for variant in ("standard", "lazyfast", "lazyfast_ntk", "torch_func"):
            rows[variant] = run_child(["--kind", "step", "--variant", variant, "--n", str(step_n), "--d", str(args.d),
                                       "--m", str(step_m), "--threads", str(args.threads), "--warmup",
                                       str(args.warmup), "--repeat", str(args.repeat)])
            print(variant, json.dumps(rows[variant]), flush=True)
        record["step"] = dict(n=step_n, d=args.d, m=step_m, variants=rows)
        std = rows["standard"]["min"]
        tf = rows["torch_func"]["min"]
        lines += [f"## One linearized training step: TwoLayer n={step_n}, d={args.d}, m={step_m}, k=1, float32, ReLU",
                  "", "forward + backward + SGD update on the square loss; min of "
                  f"{args.repeat} steps after {args.warmup} warm-up step(s) (the warm-up fills the cached primal "
                  "and, for `lazyfast` (auto), builds the cached linearization on the second sighting of the batch).", "",
                  "| variant | min step (s) | median (s) | vs standard | torch_func / this | peak RSS (MB) | "
                  "RSS after setup (MB) |", "|---|---|---|---|---|---|---|"]
        for v, r in rows.items():
            lines.append(f"| {v} | {r['min']:.3f} | {r['median']:.3f} | {r['min'] / std:.2f}× | {tf / r['min']:.2f}× "
                         f"| {r['peak_mb']:.0f} | {r['rss_setup_mb']:.0f} |")
        lines += ["", "Targets (issue 5): linearized step ≤ 1.3× standard; ≥ 2× faster than torch_func.", ""]
    if args.only in (None, "cg"):
        r = run_child(["--kind", "cg", "--n", str(cg_n), "--d", str(args.d), "--m", str(cg_m), "--chunk",
                       str(cg_chunk), "--threads", str(args.threads), "--max-iter", str(args.max_iter)])
        print("cg", json.dumps(r), flush=True)
        record["cg"] = r
        lines += [f"## Matrix-free kernel regression: n={cg_n}, d={args.d}, m={cg_m}, float32, ReLU TwoLayer", "",
                  f"CG on (Θ + λI)c = y with λ = 1e-3·n (Θ has rank ≤ min(n, P), P = {cg_m * (args.d + 1)}), tolerance "
                  f"1e-3 relative residual, at most {args.max_iter} iterations; Θ·v by chunked VJP + JVP "
                  f"(chunk {cg_chunk}). A dense float32 Θ would need {r['dense_theta_gb']:.0f} GB.", "",
                  "| iterations | final rel. residual | converged | total (s) | s / iteration | predict 1000 (s) "
                  "| peak RSS (MB) | RSS after setup (MB) |", "|---|---|---|---|---|---|---|---|",
                  f"| {r['iterations']} | {r['residual']:.2e} | {r['converged']} | {r['seconds']:.1f} | "
                  f"{r['seconds_per_iteration']:.2f} | {r['predict_1000_seconds']:.1f} | {r['peak_mb']:.0f} | "
                  f"{r['rss_setup_mb']:.0f} |", "",
                  "Residual history: " + ", ".join(f"{h:.2e}" for h in r["history"][::5]) + " (every 5th)", ""]
    record["load_after"] = loadavg()
    lines += [f"Load average after: {record['load_after']}.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(record, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
