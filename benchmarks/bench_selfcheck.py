#!/usr/bin/env python
"""What "exact on every call" costs and what the self-check catches (docs/engine.md).

1. Cost, on the users'-models workloads (lazyfast.zoo, float32): interleaved rounds of
   A = ``empirical_ntk(check=False)`` (the per-call plan verification on, the self-check off),
   B = ``check=True`` (the self-check always), V = ``check=False`` with the verification off (the
   engine as it was: the plan trusted). Per row: the self-check's cost as a fraction of the call,
   B/A − 1, and the verification's, A/V − 1 (median and min–max over rounds), and whether
   ``check="auto"`` runs the check there.
2. Detection, on the issue's silent cases (tests/test_every_call.py, float64): the engine's answer
   now (relative error against autograd on the real batch, or the clear error), the answer of the
   unverified engine, and whether the self-check flags that answer.

Usage: python benchmarks/bench_selfcheck.py [--rounds 5] [--threads 2] [--rows a,b] [--out PREFIX]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

import lazyfast  # noqa: E402
from lazyfast import bench, selfcheck, zoo  # noqa: E402
from lazyfast._engine import state as _state
from lazyfast._engine import uses as _uses
from lazyfast._engine import structured
from lazyfast._engine.structured import capture as _capture, plan as _plan

ROWS = [  # (id, zoo model, n, mode)
    ("mlp", "mlp1024", 256, "trace"),
    ("mlp_k10_full", "mlp1024_k10", 32, "full"),
    ("shared", "shared_linear", 256, "trace"),
    ("vgg11_16_trace", "vgg11", 16, "trace"),
    ("vgg11_16_full", "vgg11", 16, "full"),
    ("vgg11_64_trace", "vgg11", 64, "trace"),
    ("tv_resnet18", "tv_resnet18", 8, "trace"),
    ("transformer", "transformer", 64, "trace"),
    ("token_transformer", "token_transformer", 64, "trace"),
]


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cost_row(rid, name, n, mode, rounds):
    model = zoo.build(name)
    x = zoo.inputs(name, n)

    def call(check, verify=True):
        old = _capture._VERIFY
        _capture._VERIFY = verify
        try:
            return lazyfast.empirical_ntk(model, x, mode=mode, check=check)
        finally:
            _capture._VERIFY = old

    plan = structured.make_plan(model, x)
    k = plan.k
    for _ in range(2):  # warm
        call(False), call(True), call(False, verify=False)
    ts = {"A": [], "B": [], "V": []}
    for _ in range(rounds):  # interleaved A B V A B V ...
        ts["A"].append(_timed(lambda: call(False)))
        ts["B"].append(_timed(lambda: call(True)))
        ts["V"].append(_timed(lambda: call(False, verify=False)))
    K = call(False)
    r = selfcheck.self_check(model, x, None, K, mode=mode, k=k)
    check_frac = [b / a - 1 for a, b in zip(ts["A"], ts["B"])]
    verify_frac = [a / v - 1 for a, v in zip(ts["A"], ts["V"])]
    est = selfcheck.check_cost_fraction(n, None, k, mode, forward_flops=plan.forward_flops,
                                        n_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    return {"id": rid, "model": name, "n": n, "k": k, "mode": mode,
            "call_s_median": statistics.median(ts["A"]), "unverified_s_median": statistics.median(ts["V"]),
            "with_check_s_median": statistics.median(ts["B"]),
            "check_fraction_median": statistics.median(check_frac), "check_fraction_range": [min(check_frac),
                                                                                             max(check_frac)],
            "verify_fraction_median": statistics.median(verify_frac),
            "verify_fraction_range": [min(verify_frac), max(verify_frac)],
            "estimated_check_fraction": est, "auto_runs_check": est <= selfcheck.AUTO_MAX_FRACTION,
            "check_passed": r["passed"], "check_relative_error": r["relative_error"], "rounds": rounds}


class _Blind(_uses.ParamUses):
    def _arg(self, t):
        return None


def _unverified(fn):
    """fn() with the engine as it was: no per-call verification, the probe blind to parameter
    uses outside a layer, no alias guard, no attribute restore."""
    # each name is patched in the module that reads it: the capture's _VERIFY, the probe's
    # ParamUses, StateGuard's _plain_attrs (lazyfast._engine.state)
    saved = (_capture._VERIFY, _plan.ParamUses, _uses.AliasGuard._arg, _state._plain_attrs)
    _capture._VERIFY, _plan.ParamUses = False, _Blind
    _uses.AliasGuard._arg = lambda self, t: None
    _state._plain_attrs = lambda m: {}
    try:
        return fn()
    finally:
        _capture._VERIFY, _plan.ParamUses, _uses.AliasGuard._arg, _state._plain_attrs = saved


def detection_rows():
    import test_every_call as T

    cases = [("1 pre-hook reads the weight", T.PreHookUsesWeight, T.X, None),
             ("2 in-place for some inputs", T.InPlaceForSome, T._mixed_batch, None),
             ("3 direct use behind a value branch", T.DirectUseBehindBranch, T._mixed_batch, None),
             ("4 stale cached plan", T.StaleBranch, T.X, "stale"),
             ("5a alias in a list", T.ListAlias, T.X, None),
             ("5b view made in __init__", T.ViewAlias, T.X, None),
             ("6 output (k, n)", lambda: T.BatchLast(6), T.X, None),
             ("7 stateful forward", T.Stateful, T.X, None)]
    out = []
    for label, cls, xs, special in cases:
        rec = {"case": label}
        if label[0] in "67":  # refused before any kernel forms, now as before the change: nothing to emulate
            rec["unverified"] = "not emulated (the old engine's answer depends on its probe count)" \
                if label[0] == "7" else "the same refusal"
        for which in (("now",) if label[0] in "67" else ("now", "unverified")):
            torch.manual_seed(0)
            m = cls().double()
            x = xs()
            try:
                if special == "stale":
                    T.STATE.flag, T.GLOBAL_FLAG["on"] = False, False
                    lazyfast.empirical_ntk(m, x, implementation="structured", check=False)
                    T.GLOBAL_FLAG["on"] = True
                fn = (lambda: lazyfast.empirical_ntk(m, x, implementation="structured", check=False))
                K = fn() if which == "now" else _unverified(fn)
                ref = T.batch_oracle(m, x)
                rec[which] = f"relative error {T.rel(K, ref):.1e}"
                if which == "unverified":
                    try:
                        k = 6 if isinstance(m, T.BatchLast) else 2
                        r = selfcheck.self_check(m, x, None, K, mode="trace", k=k, raise_on_failure=False)
                        rec["self_check_flags_it"] = not r["passed"]
                    except Exception as e:  # noqa: BLE001 - a clear refusal by the check's own forward
                        rec["self_check_flags_it"] = f"refuses: {type(e).__name__}"
            except Exception as e:  # noqa: BLE001 - the answer is the error
                rec[which] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
            finally:
                T.STATE.flag, T.GLOBAL_FLAG["on"] = False, False
        out.append(rec)
    return out


def format_md(res):
    lines = [f"# Exact on every call: cost and detection ({res['stamp']['date']}, {res['stamp']['machine']}, "
             f"load {res['stamp']['load_avg']}, commit {res['stamp']['commit']})", "",
             f"`{res['stamp']['command']}`; float32, {res['stamp']['threads']} threads, "
             f"{res['rows'][0]['rounds'] if res['rows'] else 0} interleaved rounds (A = check off, B = check on, "
             "V = verification off).", "",
             "| row | n | k | mode | call (s) | self-check cost (median, range) | auto runs it | "
             "verification cost (median, range) | check passes |", "|---|---:|---:|---|---:|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['id']} | {r['n']} | {r['k']} | {r['mode']} | {r['call_s_median']:.3f} | "
                     f"{100 * r['check_fraction_median']:.1f} % [{100 * r['check_fraction_range'][0]:.1f}, "
                     f"{100 * r['check_fraction_range'][1]:.1f}] | {'yes' if r['auto_runs_check'] else 'no'} "
                     f"(est. {100 * r['estimated_check_fraction']:.1f} %) | {100 * r['verify_fraction_median']:.1f} % "
                     f"[{100 * r['verify_fraction_range'][0]:.1f}, {100 * r['verify_fraction_range'][1]:.1f}] | "
                     f"{'yes' if r['check_passed'] else 'NO'} |")
    lines += ["", "| silent case (float64) | now | unverified engine (as before) | self-check flags the old answer |",
              "|---|---|---|---|"]
    for r in res["detection"]:
        lines.append(f"| {r['case']} | {r.get('now')} | {r.get('unverified')} | {r.get('self_check_flags_it', '—')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="")
    p.add_argument("--out", default=os.path.join(HERE, "results", "selfcheck_cpu"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings

    warnings.simplefilter("ignore")
    want = set(filter(None, args.rows.split(",")))
    rows = []
    for rid, name, n, mode in ROWS:
        if want and rid not in want:
            continue
        rows.append(cost_row(rid, name, n, mode, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    res = {"stamp": bench.stamp(), "rows": rows, "detection": detection_rows()}
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(format_md(res))
    print(format_md(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
