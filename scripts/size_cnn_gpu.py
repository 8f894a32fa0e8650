"""Sizes the `gpu` preset of the CNN sweep (lazyfast/experiments/cnn_sweep/config.py): runs, steps, FLOPs and time.

The FLOPs of one training step (batch 128) and of one evaluation image of each full-width network are
COUNTED (torch.utils.flop_counter on meta tensors: no compute, any machine); the linearized step is
counted as 5/3 of a network step (its forward holds three products per layer, W0·a, W0·t and ΔW·a,
against one; the backward is the same: lazyfast/lazy.py, `Linearized`). The time is then
FLOPs / a sustained rate: by default ASSUMED rates for one H100 (``--f32-tflops``, ``--f64-tflops``: cuDNN
convolutions in float32 with TF32 off, and in float64), or, on a machine with a GPU, MEASURED ones
(``--measure``: a few timed steps of each network in each dtype). The JSON says which.

    python scripts/size_cnn_gpu.py [--out docs/figures/cnn-gpu-sizing.json]          # counted FLOPs, assumed rates
    python scripts/size_cnn_gpu.py --measure --out benchmarks/results/cnn-gpu-sizing-measured.json   # on a GPU
    python scripts/size_cnn_gpu.py --table docs/figures/cnn-gpu-sizing.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lazyfast.experiments import cnn_sweep as cs  # noqa: E402

# Assumed sustained rates on one H100 (not measured): about a third of the float32 (non-tensor-core) and
# float64 peaks (67 and 34 TFLOP/s for the SXM part), what cuDNN reaches on 32×32 CIFAR convolutions at
# batch 128 without TF32. Replace them by --measure on the GPU.
ASSUMED_TFLOPS = {"float32": 20.0, "float64": 10.0}
LINEARIZED_FACTOR = 5.0 / 3.0


def count_flops(arch: str, batch: int) -> dict:
    """FLOPs of one training step (forward + backward) and of one forward, full width, on meta tensors."""
    with torch.device("meta"):
        net = cs.make_model(arch, 3, 10, divisor=1, gain=1.0)
        x = torch.empty(batch, 3, 32, 32)
    with FlopCounterMode(display=False) as fc:
        out = net(x)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out = net(x)
        out.sum().backward()
    return {"step_flops": fc.get_total_flops(), "forward_flops_per_image": fwd / batch,
            "parameters": sum(p.numel() for p in net.parameters())}


def measure_rates(arch: str, batch: int, flops: dict, reps: int = 5) -> dict:
    """Measured TFLOP/s of a training step on the GPU, float32 (TF32 off) and float64."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    for dt in (torch.float32, torch.float64):
        net = cs.make_model(arch, 3, 10, divisor=1, gain=1.0).to("cuda", dt)
        x = torch.randn(batch, 3, 32, 32, device="cuda", dtype=dt)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()

        step()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        out[str(dt)[6:]] = flops["step_flops"] / min(ts) / 1e12
    return out


def size(cfg, flops: dict, rates: dict) -> dict:
    """Per architecture: runs, steps per run, FLOPs and hours of the whole preset at ``rates`` (TFLOP/s
    per arch and dtype)."""
    n_train = 50000 - cfg.n_val  # CIFAR-10
    n_test = 10000
    per = {}
    total_h = 0.0
    for a in cfg.arch_settings():
        f = flops[a["arch"]]
        steps = a["epochs"] * math.ceil(n_train / cfg.batch_size)
        evals = cfg.n_val + cfg.n_train_eval
        secs, runs = 0.0, 0
        for alpha in a["alphas"]:
            dt = str(cs.run_dtype(cfg, "network", alpha))[6:]
            r = rates[a["arch"]][dt] * 1e12
            one = (steps * f["step_flops"] + (evals + 3 * n_test) * f["forward_flops_per_image"]) / r
            secs += one * len(a["lrs"]) * len(cfg.seeds)
            runs += len(a["lrs"]) * len(cfg.seeds)
        if cfg.linearized:
            r = rates[a["arch"]][str(cs.run_dtype(cfg, "linearized", 1.0))[6:]] * 1e12
            one = (steps * f["step_flops"] * LINEARIZED_FACTOR + (evals + n_test) * 2 * f["forward_flops_per_image"]) / r
            secs += one * len(a["lrs"]) * len(cfg.seeds)
            runs += len(a["lrs"]) * len(cfg.seeds)
        per[a["arch"]] = {"runs": runs, "steps_per_run": steps, "epochs": a["epochs"], "parameters": f["parameters"],
                          "gpu_hours": secs / 3600.0}
        total_h += secs / 3600.0
    return {"archs": per, "total_gpu_hours": total_h}


def table(res: dict) -> str:
    return cs.gpu_sizing_table(res)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "figures", "cnn-gpu-sizing.json"))
    p.add_argument("--measure", action="store_true", help="measure the rates on this machine's GPU")
    p.add_argument("--f32-tflops", type=float, default=ASSUMED_TFLOPS["float32"])
    p.add_argument("--f64-tflops", type=float, default=ASSUMED_TFLOPS["float64"])
    p.add_argument("--table", metavar="JSON")
    a = p.parse_args(argv)
    if a.table:
        with open(a.table) as fh:
            print(table(json.load(fh)))
        return 0
    cfg = cs.make_config("gpu")
    batch = cfg.batch_size
    flops = {arch: count_flops(arch, batch) for arch in cfg.archs}
    if a.measure:
        if not torch.cuda.is_available():
            print("--measure needs a GPU (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        rates = {arch: measure_rates(arch, batch, flops[arch]) for arch in cfg.archs}
        kind = f"measured ({torch.cuda.get_device_name()})"
    else:
        rates = {arch: {"float32": a.f32_tflops, "float64": a.f64_tflops} for arch in cfg.archs}
        kind = "assumed (not measured)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:
        commit = None
    res = {"preset": "gpu", "counter": "torch.utils.flop_counter (meta tensors)", "flops": flops, "rates": rates,
           "rates_kind": kind, "linearized_factor": LINEARIZED_FACTOR, "size": size(cfg, flops, rates),
           "machine": {"host": platform.node(), "torch": torch.__version__, "commit": commit,
                       "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(tmp, a.out)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
