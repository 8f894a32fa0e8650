"""Structured engine + generic remainder against the whole-model Jacobian path, on models with a small
remainder (timm / Hugging Face, random init, eval), and what implementation="auto" picks.

For each model: the kernel at n samples (trace mode, x2 = None, float32) by implementation="structured"
(rule layers structured, the few remaining parameters by the generic contraction) and by
"jacobian" (every parameter by per-sample Jacobians), interleaved over ``--rounds`` rounds (median
seconds; the ratio per round, its median and min-max), their relative difference, the share of parameters on rules, and auto's choice with its FLOP
model (lazyfast.explain). Writes benchmarks/results/remainder_choice_cpu.json.

    python scripts/check_remainder_choice.py [--n 8] [--rounds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lazyfast  # noqa: E402
from lazyfast import zoo  # noqa: E402

MODELS = ["timm_convnext_atto", "timm_mobilenetv3", "timm_vit_tiny", "hf_bert", "hf_distilbert", "hf_vit", "hf_gpt2"]


def one(name: str, n: int, rounds: int) -> dict:
    m, x = zoo.build(name), zoo.inputs(name, n)
    e = lazyfast.explain(m, x)
    row = {"model": name, "n": n, "rule_fraction": e.rule_fraction, "auto": e.implementation,
           "flop_model": getattr(e, "costs", None)}
    times = {"structured": [], "jacobian": []}
    kernels = {}
    try:
        for impl in times:
            lazyfast.empirical_ntk(m, x[:2], implementation=impl, check=False)  # warm
        for _ in range(rounds):
            for impl in times:
                t = time.perf_counter()
                kernels[impl] = lazyfast.empirical_ntk(m, x, implementation=impl, check=False)
                times[impl].append(time.perf_counter() - t)
    except ValueError as err:  # a model the per-sample (vmap) path cannot run
        row["error"] = str(err).splitlines()[0][:300]
        return row
    row["seconds"] = {k: statistics.median(v) for k, v in times.items()}
    ratios = [j / s for j, s in zip(times["jacobian"], times["structured"])]  # per interleaved round
    row["jacobian_over_structured"] = {"median": statistics.median(ratios), "min": min(ratios),
                                       "max": max(ratios), "rounds": ratios}
    row["relative_difference"] = float((kernels["structured"] - kernels["jacobian"]).norm()
                                       / kernels["jacobian"].norm())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "remainder_choice_cpu.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    res = {"machine": {"host": platform.node(), "threads": a.threads, "torch": torch.__version__, "commit": commit,
                       "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                       "loadavg_start": os.getloadavg()}, "rows": []}
    for name in a.models:
        res["rows"].append(one(name, a.n, a.rounds))
        print(json.dumps(res["rows"][-1]), flush=True)
    res["machine"]["loadavg_end"] = os.getloadavg()
    tmp = a.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
