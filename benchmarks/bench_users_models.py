"""The models users bring (timm and Hugging Face, random init, eval mode), the default
``nn.TransformerEncoderLayer`` (feed-forward 2048) and the 3-conv CNN with 10 outputs: lazyfast's
``empirical_ntk`` (``implementation="auto"``, as a user calls it) against the torch.func tutorial (J
built once, x2 = x1) and the floor (one forward, the k-wide batched backward and the J·Jᵀ GEMM of a
random J the size of the Jacobian), all in one process by interleaved rounds.

    python benchmarks/bench_users_models.py [--rounds 5] [--processes 2] [--n 16] [--rows a,b,...]

Protocol: each row runs in ``--processes`` fresh processes of its own (a process's history — what
earlier rows allocated and freed — changes how fast the allocator serves a method's large tensors,
by up to a third for the tutorial; fresh processes give every row the same start). In each, every
method is called once to warm up, then ``--rounds`` rounds each call every method once in the same
order (A B C A B C ...); a round's ratio is the tutorial's (or the floor's) time over lazyfast's in
that round, and the results give the median ratio and its min–max over the rounds of all the row's
processes (and each method's median time over them). The
float32 kernels are compared with the float64 kernel of a float64 copy of the model (the tutorial's
method). The share of parameters on layer rules comes from ``lazyfast.explain``. Writes
benchmarks/results/users_models_cpu.json and .md (or ``--out``), stamped (machine, load, date, commit).
Needs timm and transformers (the ``bench`` extra); no download.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import lazyfast  # noqa: E402
from bench_models import tutorial_ntk  # noqa: E402  (the tutorial's method, as the users'-models table runs it)
from lazyfast import zoo  # noqa: E402
from lazyfast._engine.outputs import model_output  # noqa: E402
from lazyfast._store import atomic_write  # noqa: E402
from lazyfast.bench.protocol import (interleaved_rounds, loadavg, per_round_ratios, ratio_summary, stamp,  # noqa: E402
                                     timed)

METHODS = ("lazyfast auto", "torch.func tutorial (J once)", "floor")
EXTRA = {  # rows beyond the zoo's optional models: (builder, input name in zoo for the inputs, mode)
    "transformer_ff2048": (lambda dtype=None: zoo.transformer(layers=1, dim_feedforward=2048, dtype=dtype),
                           "transformer", "trace"),
    "conv3_k10": (lambda dtype=None: zoo.build("conv3_k10", dtype=dtype), "conv3_k10", "full"),
}
TARGETS = {"transformer_ff2048": ("tutorial / lazyfast", 1.5), "conv3_k10": ("lazyfast / floor", 1 / 1.3)}


def build(row, dtype=None):
    if row in EXTRA:
        return EXTRA[row][0](dtype=dtype), EXTRA[row][1], EXTRA[row][2]
    return zoo.build(row, dtype=dtype), row, "trace"


def floor_fn(model, x, mode):
    """One forward, the k-wide batched backward (k cotangent passes: what any exact method needs for k
    outputs) and the Gram GEMM of a random J the size of the Jacobian (n·k × P, or n × P in trace mode
    summed over k: the tutorial's trace contraction costs the same GEMM with k folded into its depth)."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = x.shape[0]
    with torch.no_grad():
        k = lazyfast.ntk._out_features(model, x)
    P = sum(p.numel() for p in params)
    J = torch.randn(n * k, P, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(k).unsqueeze(1).expand(k, n, k)

    def floor():
        out = model_output(model(x), n).reshape(n, k)
        if k == 1:
            torch.autograd.grad(out.sum(), params)
        else:
            torch.autograd.grad(out, params, grad_outputs=eye, is_grads_batched=True)
        return J @ J.T if mode == "full" else J.reshape(n, k * P) @ J.reshape(n, k * P).T

    return floor


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def run_row(row, n, rounds, log):
    torch.manual_seed(0)
    model, inp, mode = build(row)
    x = zoo.inputs(inp, n)
    e = lazyfast.explain(model, x, mode=mode)
    m64 = zoo.double(model)
    x64 = x if not x.is_floating_point() else x.double()
    fns = {"lazyfast auto": lambda: lazyfast.empirical_ntk(model, x, mode=mode),
           "torch.func tutorial (J once)": lambda: tutorial_ntk(model, x, mode, 1 << 40),
           "floor": floor_fn(model, x, mode)}
    failed = {}
    try:
        ref = tutorial_ntk(m64, x64, mode, 1 << 40)
    except RuntimeError as exc:  # vmap cannot run the model (data-dependent control flow): no tutorial
        failed["torch.func tutorial (J once)"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        del fns["torch.func tutorial (J once)"]
        ref = lazyfast.reference.ntk_oracle(m64, x64, mode=mode)  # per-example gradients, one sample at a time
    errs = {}
    for name, fn in fns.items():  # warm-up (and the agreement check)
        out = fn()
        if name != "floor":
            errs[name] = rel(out, ref)
    times, _ = interleaved_rounds({name: (lambda fn=fn: timed(fn)) for name, fn in fns.items()}, rounds,
                                  on_round=lambda r, ts: log(f"  {row} round {r + 1}: "
                                                             + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in ts.items())))
    tut = per_round_ratios(times.get("torch.func tutorial (J once)", []), times["lazyfast auto"])
    flo = per_round_ratios(times["lazyfast auto"], times["floor"])
    summ = ratio_summary
    return dict(row=row, n=n, mode=mode, k=e.k, parameters=sum(p["numel"] for p in e.parameters),
                route=e.implementation, rule_share=e.rule_fraction,
                seconds={k: statistics.median(v) for k, v in times.items()}, times=times,
                tutorial_over_lazyfast=summ(tut), lazyfast_over_floor=summ(flo),
                f32_rel_err=errs, f32_target_met=errs["lazyfast auto"] <= 1e-5, failed=failed)


def pooled(parts):
    """One row measured in several processes as one row: every method's rounds pooled (each process's
    rounds stay aligned across methods), the ratios and medians recomputed over all of them."""
    r = dict(parts[0])
    times = {m: [t for p in parts for t in p["times"].get(m, [])] for m in parts[0]["times"]}
    r.update(times=times, seconds={m: statistics.median(v) for m, v in times.items()}, processes=len(parts),
             tutorial_over_lazyfast=ratio_summary(per_round_ratios(times.get("torch.func tutorial (J once)", []),
                                                                   times["lazyfast auto"])),
             lazyfast_over_floor=ratio_summary(per_round_ratios(times["lazyfast auto"], times["floor"])))
    return r


def run_row_isolated(row, a):
    """The row in ``a.processes`` fresh processes of this script (``--child-out``), pooled."""
    import subprocess
    import tempfile

    parts = []
    for i in range(a.processes):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--rows", row, "--n", str(a.n), "--rounds", str(a.rounds),
                   "--threads", str(a.threads), "--child-out", out]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            print(proc.stdout, end="", flush=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{row}: process {i + 1} failed (exit {proc.returncode}): {proc.stdout[-2000:]}")
            parts.append(json.load(open(out)))
    return pooled(parts)


def markdown(res) -> str:
    st = res["stamp"]
    procs = res.get("processes", 1)
    lines = [f"*Generated from `benchmarks/results/users_models_cpu.json` (`{st['command']}`; {st['date']}, commit "
             f"{st['commit']}, load average {st['load_avg']} at start / {res['load_avg_after']} at end, "
             f"{st['machine']}, {st['threads']} threads, float32, n = {res['n']}, {res['rounds']} interleaved "
             f"rounds in each of {procs} fresh process{'es' if procs > 1 else ''} per row).* Ratios: median over "
             "all rounds [min–max].", "",
             "| model | parameters | on rules | route | lazyfast | tutorial (J once) | tutorial / lazyfast | floor "
             "| lazyfast / floor | float32 error |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        s, t, f = r["seconds"], r["tutorial_over_lazyfast"], r["lazyfast_over_floor"]
        tut = (f"{1e3 * s['torch.func tutorial (J once)']:.0f} ms | {t['median']:.2f}× [{t['min']:.2f}–{t['max']:.2f}]"
               if t else "cannot run (vmap: data-dependent control flow) | —")
        lines.append(f"| {r['row']} ({r['mode']}, k={r['k']}) | {r['parameters'] / 1e6:.2f} M | "
                     f"{100 * r['rule_share']:.2f} % | {r['route']} | {1e3 * s['lazyfast auto']:.0f} ms | {tut} | "
                     f"{1e3 * s['floor']:.0f} ms | {f['median']:.2f}× [{f['min']:.2f}–{f['max']:.2f}] | "
                     f"{r['f32_rel_err']['lazyfast auto']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=",".join(list(zoo.OPTIONAL) + list(EXTRA)))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "users_models_cpu"))
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out.json (same n, rounds)")
    p.add_argument("--processes", type=int, default=2, help="fresh processes per row, their rounds pooled (default 2)")
    p.add_argument("--child-out", help=argparse.SUPPRESS)  # one row, in this process, to this JSON file
    a = p.parse_args(argv)
    if a.processes < 1:
        p.error("--processes must be >= 1")
    torch.set_num_threads(a.threads)
    zoo.import_timm(), zoo.import_transformers()
    if a.child_out:
        atomic_write(a.child_out, json.dumps(run_row(a.rows, a.n, a.rounds, lambda s: print(s, flush=True))).encode())
        return 0
    res = dict(stamp=stamp(), n=a.n, rounds=a.rounds, processes=a.processes, methods=list(METHODS), rows=[],
               resumed=[])
    if a.resume and os.path.exists(a.out + ".json"):
        old = json.load(open(a.out + ".json"))
        if (old["n"], old["rounds"], old.get("processes", 1)) == (a.n, a.rounds, a.processes):
            res = dict(old, resumed=old.get("resumed", []) + [stamp()])
    done = {r["row"] for r in res["rows"]}
    for row in [r for r in a.rows.split(",") if r and r not in done]:
        print(f"{row} ...", flush=True)
        res["rows"].append(run_row_isolated(row, a))
        res["load_avg_after"] = loadavg()
        atomic_write(a.out + ".json", json.dumps(res, indent=1).encode())  # a finished row is never lost
    order = [r for r in a.rows.split(",") if r]
    res["rows"].sort(key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
    atomic_write(a.out + ".json", json.dumps(res, indent=1).encode())
    md = markdown(res)
    atomic_write(a.out + ".md", (md + "\n").encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
