"""Sizes the `cpu` preset of the CNN sweep (lazyfast/experiments/cnn_sweep/config.py) by measurement.

1. Times, with ONE torch thread, one training step (batch 128) of each candidate network in float32
   and float64, one step of its true linearized model, and the per-image cost of the evaluations,
   on real Fashion-MNIST images (a few steps each: the whole script takes a few minutes).
2. Measures where float32 rounds the lazy updates away: the same network, init and batches trained
   for a few steps in float32 and in float64 at each α; reported is the relative difference of the
   scaled outputs α·h on held-out images, and the fraction of parameter entries whose float32 update
   was rounded to exactly zero in the last step.
3. Extrapolates the single-thread seconds of every run of the `cpu` preset
   (cnn_sweep.estimate_seconds), divides by the number of worker processes, and finds the largest
   training subset that fits the budget with the preset's widths and epochs.

Writes docs/figures/cnn-cpu-sizing.json (stamped with machine, load, date and commit) and prints the
markdown table that docs/REPRODUCTION.md shows (`--table` prints it from an existing JSON).

    OMP_NUM_THREADS=1 python scripts/size_cnn_cpu.py [--out docs/figures/cnn-cpu-sizing.json]
    python scripts/size_cnn_cpu.py --table docs/figures/cnn-cpu-sizing.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import torch

from lazyfast import LazyModel, Linearized
from lazyfast.experiments import cnn_sweep as cs

CANDIDATES = [("vgg11", 4), ("vgg11", 8), ("resnet18", 8), ("resnet18", 16)]
ROUNDING_ALPHAS = [1.0, 100.0, 1e3, 1e4, 1e5, 1e6]


def _stamp():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = None
    return {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "commit": commit,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "loadavg_start": os.getloadavg()}


def _time(fn, reps):
    """Minimum over ``reps`` timed calls after one warm-up: other jobs on the machine only ever add time,
    so the minimum is the least inflated estimate (the median is recorded beside it)."""
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    _time.medians.append(ts[len(ts) // 2] / max(ts[0], 1e-12))
    return ts[0]


_time.medians = []


def measure(arch, divisor, gain, data, reps=4, bs=128, ebs=250):
    x, y = data["x_train"][:bs], data["y_train"][:bs]
    xe = data["x_test"][:ebs]
    out = {"arch": arch, "divisor": divisor}
    for dt in (torch.float32, torch.float64):
        name = str(dt)[6:]
        torch.manual_seed(0)
        net = cs.make_model(arch, 1, divisor=divisor, gain=gain).to(dt)
        out["parameters"] = sum(p.numel() for p in net.parameters())
        lazy = LazyModel(net, 10.0)
        opt = torch.optim.SGD(lazy.parameters(), lr=1e-3, momentum=0.9)
        xb, xeb = x.to(dt), xe.to(dt)

        def step():
            loss = cs._mse(lazy(xb), y) / 100.0
            opt.zero_grad()
            loss.backward()
            opt.step()

        out[f"step_{name}"] = _time(step, reps)
        with torch.no_grad():
            out[f"eval_{name}"] = _time(lambda: lazy(xeb), 2) / ebs
        out[f"final_{name}"] = _time(lambda: cs._final_network_eval(lazy, xeb, data["y_test"][:ebs], ebs, dt,
                                                                   torch.device("cpu")), 2) / ebs
    torch.manual_seed(0)
    net = cs.make_model(arch, 1, divisor=divisor, gain=gain)
    lin = LazyModel(Linearized(net, implementation="ntk", cache_size=0), 1.0)
    opt = torch.optim.SGD([p for p in lin.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def lstep():
        loss = cs._mse(lin(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out["step_linearized"] = _time(lstep, reps)
    with torch.no_grad():
        out["eval_linearized"] = _time(lambda: lin(xe), 2) / ebs
    return out


def rounding(arch, divisor, gain, data, steps=10, bs=128, lr=0.01):
    """float32 vs float64 from the same init and batches, per α."""
    rows = []
    xt = data["x_test"][:256]
    for alpha in ROUNDING_ALPHAS:
        outs, zero_frac = {}, None
        for dt in (torch.float64, torch.float32):
            torch.manual_seed(0)
            net = cs.make_model(arch, 1, divisor=divisor, gain=gain).double().to(dt)  # same w0 (rounded)
            lazy = LazyModel(net, alpha)
            opt = torch.optim.SGD(lazy.parameters(), lr=lr, momentum=0.9)
            for s in range(steps):
                xb = data["x_train"][s * bs:(s + 1) * bs].to(dt)
                yb = data["y_train"][s * bs:(s + 1) * bs]
                loss = cs._mse(lazy(xb), yb) / alpha ** 2
                opt.zero_grad()
                loss.backward()
                before = [p.detach().clone() for p in lazy.model.parameters()]
                opt.step()
            if dt == torch.float32:
                changed = sum(int((p.detach() != b).sum()) for p, b in zip(lazy.model.parameters(), before))
                total = sum(b.numel() for b in before)
                zero_frac = 1.0 - changed / total
            with torch.no_grad():
                outs[dt] = lazy(xt.to(dt)).double()
        d = (outs[torch.float32] - outs[torch.float64]).norm() / outs[torch.float64].norm()
        agree = float((outs[torch.float32].argmax(1) == outs[torch.float64].argmax(1)).double().mean())
        rows.append({"alpha": alpha, "relative_output_error_float32": float(d),
                     "argmax_agreement_float32": agree, "float32_updates_rounded_to_zero": zero_frac})
    return {"arch": arch, "divisor": divisor, "steps": steps, "lr": lr, "rows": rows}


def fit(cfg, timings, budget_s, workers, field, step, limit):
    """Largest value (a multiple of ``step``) of ``field`` (n_train, or the only arch's epochs / subsets)
    whose estimated wall time with ``workers`` processes fits ``budget_s``."""
    best, v = None, step
    while v <= limit:
        c = dataclasses.replace(cfg, **{field: v if field == "n_train" else [v]})
        if cs.estimate_seconds(c, timings)["total_seconds"] / workers > budget_s:
            break
        best, v = v, v + step
    return best


def table(res) -> str:
    lines = ["| network | parameters | step f32 (s) | step f64 (s) | linearized step (s) | final eval / image f32 (ms) |",
             "|---|---|---|---|---|---|"]
    for t in res["timings"]:
        lines.append(f"| {t['arch']} ÷{t['divisor']} | {t['parameters']:,} | {t['step_float32']:.3f} | "
                     f"{t['step_float64']:.3f} | {t['step_linearized']:.3f} | {1000 * t['final_float32']:.2f} |")
    lines += ["", "| α | " + " | ".join(f"{r['alpha']:g}" for r in res["rounding"]["rows"]) + " |",
              "|---" * (len(res["rounding"]["rows"]) + 1) + "|",
              "| float32 vs float64: ‖Δ(αh)‖/‖αh‖ | " + " | ".join(
                  f"{r['relative_output_error_float32']:.1e}" for r in res["rounding"]["rows"]) + " |",
              "| float32 updates rounded to 0 (%) | " + " | ".join(
                  f"{100 * r['float32_updates_rounded_to_zero']:.1f}" for r in res["rounding"]["rows"]) + " |",
              "| argmax agreement (%) | " + " | ".join(
                  f"{100 * r['argmax_agreement_float32']:.1f}" for r in res["rounding"]["rows"]) + " |"]
    p = res["plan"]
    sh = p["shared"]
    lines += ["", "| preset | network | train images | epochs | runs | steps / run | 1-thread seconds | wall with "
              f"{p['workers']} workers | fits {p['budget_hours_per_arch']:g} h |", "|---|---|---|---|---|---|---|---|---|"]
    for arch, v in p["archs"].items():
        st, e = v["settings"], v["estimate"]
        lines.append(f"| `{v['preset']}` | {arch} ÷{st['divisor']} | {st.get('subset') or sh['n_train']} | "
                     f"{st['epochs']} | {e['runs']} | "
                     f"{e['steps_per_run']} | {v['single_thread_seconds']:.0f} | {v['wall_hours']:.2f} h | "
                     f"{'yes' if v['fits'] else 'no'} |")
    sh = p["shared"]
    lines.append("")
    lines.append(f"Shared: Fashion-MNIST {sh['n_train']} train / {sh['n_val']} validation / {sh['n_test']} test, "
                 f"{len(sh['alphas'])} α × {len(sh['lrs'])} η0 × {len(sh['seeds'])} seeds (+ the linearized "
                 f"model per η0 and seed). Largest training subset for `cpu-vgg` in "
                 f"{p['budget_hours_per_arch']:g} h: {p['vgg_max_n_train']}; largest ResNet subset at its "
                 f"epochs: {p['resnet_max_subset']}. Whole `cpu` preset: {p['total_wall_hours']:.2f} h. "
                 f"Load average during the measurement: {res['machine']['loadavg_start'][0]:.2f} at start, "
                 f"{res['machine']['loadavg_end'][0]:.2f} at end ({res['machine']['cpus']} cores); each time is "
                 f"the minimum of {res['reps']} repetitions (median/minimum up to {res['median_over_min_max']:.2f}×).")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("docs", "figures", "cnn-cpu-sizing.json"))
    ap.add_argument("--budget-hours", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--table", default=None, help="print the table of an existing JSON and exit")
    ap.add_argument("--replan", default=None, help="keep the measurements of an existing JSON, redo only the plan "
                                                   "(after a preset change) and write --out")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return 0
    torch.set_num_threads(1)
    if args.replan:
        with open(args.replan) as f:
            res = json.load(f)
        res["replanned_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        write_plan(res, args)
        return 0
    res = {"machine": _stamp()}
    cfg = cs.Config.cpu()
    gains = dict(zip(cfg.archs, cfg.gains))
    data = cs.load_data(dataclasses.replace(cfg, n_train=2000, n_test=1000))
    t0 = time.perf_counter()
    res["timings"] = []
    for arch, div in CANDIDATES:
        res["timings"].append(measure(arch, div, gains[arch], data))
        print(json.dumps(res["timings"][-1]), flush=True)
    vgg_div = cfg.divisors[cfg.archs.index("vgg11")]
    res["rounding"] = rounding("vgg11", vgg_div, gains["vgg11"], data)
    print(json.dumps(res["rounding"]), flush=True)
    res["measure_seconds"] = time.perf_counter() - t0
    res["reps"] = 4
    res["median_over_min_max"] = max(_time.medians)
    res["machine"]["loadavg_end"] = os.getloadavg()
    write_plan(res, args)
    return 0


def write_plan(res, args):
    cfg = cs.Config.cpu()
    timings = {}
    for a in cfg.arch_settings():
        t = next(t for t in res["timings"] if t["arch"] == a["arch"] and t["divisor"] == a["divisor"])
        timings[a["arch"]] = t
    budget = args.budget_hours * 3600
    plan = {"shared": cs.CPU_PRESET, "workers": args.workers, "budget_hours_per_arch": args.budget_hours,
            "archs": {}}
    vgg = cs.Config.cpu_vgg()
    plan["vgg_max_n_train"] = fit(vgg, timings, budget, args.workers, "n_train", 500, 60000 - vgg.n_val)
    for preset in ("cpu_vgg", "cpu_resnet"):
        c = getattr(cs.Config, preset)()
        est = cs.estimate_seconds(c, timings)
        arch = c.archs[0]
        plan["archs"][arch] = {"preset": preset.replace("_", "-"), "settings": c.arch_settings()[0],
                               "estimate": est["archs"][arch], "single_thread_seconds": est["total_seconds"],
                               "wall_hours": est["total_seconds"] / args.workers / 3600,
                               "fits": est["total_seconds"] / args.workers <= budget}
        if arch == "resnet18":
            plan["resnet_max_subset"] = fit(c, timings, budget, args.workers, "subsets", 500, c.n_train)
    plan["total_wall_hours"] = sum(v["wall_hours"] for v in plan["archs"].values())
    res["plan"] = plan
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
