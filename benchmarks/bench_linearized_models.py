"""A linearized training step on the models users bring, against a standard step (issue 20).

For each model (timm and Hugging Face classifiers, random init, eval mode, float32) and a new batch
every step (the normal case for SGD: each step's batch is a fresh tensor, so nothing is cached), one
SGD step (momentum 0.9) on 0.5·mean‖out − onehot‖² is timed four ways:

* ``standard``      — the network itself: forward, backward, update (the cost to stay near);
* ``lazyfast``      — ``lazyfast.Linearized(model)`` (``implementation="auto"``: one dual forward at w0
  gives f(w0, x) and J(w0, x)·(w − w0); the backward is one pass through its tangent graph);
* ``torch_func``    — the linearization as tangent-space fine-tuning code writes it:
  ``f0, t = torch.func.jvp(lambda p: functional_call(model0, p, (x,)), (w0,), (w − w0,))``,
  ``loss(f0 + t).backward()`` (attention by SDPA's math backend, which has forward-mode AD);
* ``lazyfast_ntk``  — ``Linearized(model, implementation="products")``: one JVP and one VJP at w0 per step
  (the path before the dual forward).

Protocol: all methods of a model in one process, warm (2 steps each first), then ``--rounds``
interleaved rounds (A B C D, A B C D, ...), each method ``--steps`` steps per round, the round's median
step time per method; the ratio method / standard per round; the results file keeps every round, the
median ratio and its min-max. Peak memory: each method in a fresh process (``--memory``), the peak
resident set during 3 steps after a warm step, minus the resident set before the model was built
(``benchmarks/_memory.py``), and the step's own increment (peak during the steps minus before them).

    python benchmarks/bench_linearized_models.py [--models ...] [--n 32] [--rounds 5] [--threads 2]
    python benchmarks/bench_linearized_models.py --markdown benchmarks/results/linearized_models_cpu.json

Needs ``timm`` and ``transformers`` (optional bench dependencies; see lazyfast/zoo.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _memory import _vm  # noqa: E402

from lazyfast import Linearized, zoo  # noqa: E402
from lazyfast._engine.generic import math_attention  # noqa: E402
from lazyfast.bench.protocol import sgd_step  # noqa: E402

DEFAULT_MODELS = ["timm_resnet10t", "timm_efficientnet_b0", "timm_vit_tiny", "hf_bert", "hf_vit"]
METHODS = ["standard", "lazyfast", "torch_func", "lazyfast_ntk"]
POOL = 4  # distinct input batches, cycled (each step gets a fresh clone: a new tensor)
LR = 1e-3


def _loss(out, y):
    return 0.5 * (out - y).pow(2).sum(1).mean()


def make_method(method: str, model: torch.nn.Module):
    """A step function step(x, y) for ``method`` on its own copy of ``model`` (same w0)."""
    if method in ("standard", "lazyfast", "lazyfast_ntk"):
        net = (copy.deepcopy(model) if method == "standard"
               else Linearized(model, implementation="auto" if method == "lazyfast" else "products"))
        return sgd_step(net, None, None, LR, _loss, momentum=0.9)  # called as step(x, y): a new batch
    if method == "torch_func":
        model0 = copy.deepcopy(model)
        w0 = {k: v.detach() for k, v in model0.named_parameters() if v.requires_grad}
        w = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
        opt = torch.optim.SGD(list(w.values()), lr=LR, momentum=0.9)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            with math_attention():
                f0, t = jvp(lambda p: functional_call(model0, p, (x,), strict=False), (w0,),
                            ({k: w[k] - w0[k] for k in w},))
            loss = _loss(f0.detach() + t, y)
            loss.backward()
            opt.step()
            return loss.detach()
        return step
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def problem(name: str, n: int):
    model = zoo.build(name, seed=0)
    xs = [zoo.inputs(name, n, seed=1 + i) for i in range(POOL)]
    g = torch.Generator().manual_seed(7)
    ys = [F.one_hot(torch.randint(0, 10, (n,), generator=g), 10).float() for _ in range(POOL)]
    return model, xs, ys


def time_model(name: str, n: int, rounds: int, steps: int, methods) -> dict:
    model, xs, ys = problem(name, n)
    fns = {m: make_method(m, model) for m in methods}
    counter = {m: 0 for m in methods}

    def run(m):
        i = counter[m] % POOL
        counter[m] += 1
        x = xs[i].clone()  # a new tensor every step: no cache can serve it
        t = time.perf_counter()
        fns[m](x, ys[i])
        return time.perf_counter() - t

    for m in methods:  # warm-up
        run(m)
        run(m)
    per_round = []
    for _ in range(rounds):
        row = {}
        for m in methods:
            row[m] = statistics.median(run(m) for _ in range(steps))
        per_round.append(row)
    out = {"model": name, "n": n, "parameters": sum(p.numel() for p in model.parameters()), "rounds": per_round,
           "seconds": {m: statistics.median(r[m] for r in per_round) for m in methods}}
    ratios = {}
    for m in methods:
        if m == "standard":
            continue
        rs = [r[m] / r["standard"] for r in per_round]
        ratios[f"{m}/standard"] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
    if "torch_func" in methods and "lazyfast" in methods:
        rs = [r["torch_func"] / r["lazyfast"] for r in per_round]
        ratios["torch_func/lazyfast"] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
    out["ratios"] = ratios
    return out


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """convolution_backward: each of grad-input and grad-weight is one product as large as the forward
    convolution (torch's own formula ignores ``groups`` here and counts a depthwise convolution's
    backward ``groups`` times too high)."""
    from torch.utils.flop_counter import conv_flop_count

    one = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return one * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU flash attention kernel (not in torch's table): Q·Kᵀ and P·V, 2·m·n·k each."""
    import math

    lead = math.prod(q_shape[:-2])
    return 2 * lead * q_shape[-2] * k_shape[-2] * (q_shape[-1] + v_shape[-1])


def _sdpa_cpu_backward_flops(_grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Its backward: dV, dP, dQ, dK, four products of the forward's size (torch's rule for the other
    attention kernels)."""
    return 2 * _sdpa_cpu_flops(q_shape, k_shape, v_shape)


def _flop_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {aten.convolution_backward: _conv_backward_flops}
    for op, f in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
                  ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops)):
        if hasattr(aten, op):
            mapping[getattr(aten, op)] = f
    return mapping


def product_flops(name: str, n: int, methods) -> dict:
    """FLOPs of the products (matmuls, convolutions, attention) of one step of each method, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on a warm step, and their ratio to the standard
    step's. The exact linearization's products are W0·a, W0·t and δW·a forward and the two backward
    products: this ratio is the floor of the step's time wherever products dominate, for any exact
    implementation (elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, xs, ys = problem(name, n)
    flops = {}
    for m in methods:
        step = make_method(m, model)
        step(xs[0].clone(), ys[0])
        counter = FlopCounterMode(display=False, custom_mapping=_flop_mapping())
        with counter:
            step(xs[1].clone(), ys[1])
        flops[m] = counter.get_total_flops()
    base = flops.get("standard")
    return {"flops": flops, "ratio": {m: v / base for m, v in flops.items()} if base else {}}


def memory_one(name: str, n: int, method: str, threads: int) -> dict:
    """In this (fresh) process: peak RSS of 3 steps of ``method`` after a warm step."""
    torch.set_num_threads(threads)
    base = _vm("VmRSS")
    model, xs, ys = problem(name, n)
    step = make_method(method, model)
    step(xs[0].clone(), ys[0])
    before = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    for i in range(3):
        step(xs[(i + 1) % POOL].clone(), ys[(i + 1) % POOL])
    peak = _vm("VmHWM")
    return {"peak_minus_start": peak - base, "step_increment": peak - before}


def memory_model(name: str, n: int, methods, threads: int) -> dict:
    res = {}
    for m in methods:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory", name, m, "--n", str(n),
                            "--threads", str(threads)], capture_output=True, text=True, check=True)
        res[m] = json.loads(r.stdout.strip().splitlines()[-1])
    std = res["standard"]["peak_minus_start"]
    return {"bytes": res, "peak_ratio": {m: res[m]["peak_minus_start"] / std for m in methods}}


def _stamp(threads: int) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:
        commit = None
    return {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "commit": commit, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "loadavg_start": os.getloadavg()}


TARGETS = (("lazyfast / standard", "lazyfast/standard", "<=", 1.4),
           ("torch.func / lazyfast", "torch_func/lazyfast", ">=", 1.5),
           ("peak memory lazyfast / standard", None, "<=", 1.3))


def markdown(res: dict) -> str:
    """The README / docs table, generated from a results file."""
    s = res["machine"]
    lines = [f"*Generated from `benchmarks/results/linearized_models_cpu.json` (`python "
             f"benchmarks/bench_linearized_models.py`; {s['date_utc']} UTC, commit {s['commit']}, load average "
             f"{s['loadavg_start'][0]:.2f} at start / {res.get('loadavg_end', [float('nan')])[0]:.2f} at end, "
             f"{s['threads']} threads, n = {res['n']}, float32, new batch every step, {res['rounds_requested']} "
             f"interleaved rounds of {res['steps_per_round']} steps).* Ratios: median over rounds [min–max]; "
             "peak memory: each method in a fresh process, peak resident set minus the resident set before the "
             "model was built. Products: FLOPs of the step's matmuls, convolutions and attention "
             "(`FlopCounterMode`, one warm step), over the standard step's — the floor of any exact "
             "linearized step's time where products dominate.", "",
             "| model | parameters | standard step | lazyfast linearized step | lazyfast / standard | "
             "products lazyfast / standard (floor) | torch.func jvp + vjp | torch.func / lazyfast | "
             "products torch.func / lazyfast | previous path (`ntk`) / standard | peak memory "
             "lazyfast / standard | peak memory torch.func / standard |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def rr(r):
        return f"{r['median']:.2f}× [{r['min']:.2f}–{r['max']:.2f}]"

    for row in res["models"]:
        sec, rat = row["seconds"], row["ratios"]
        mem = row.get("memory", {}).get("peak_ratio", {})
        ntk = rr(rat["lazyfast_ntk/standard"]) if "lazyfast_ntk/standard" in rat else "–"
        fl = row.get("products", {}).get("flops", {})
        floor = f"{fl['lazyfast'] / fl['standard']:.2f}×" if fl.get("standard") and "lazyfast" in fl else "–"
        tf_fl = f"{fl['torch_func'] / fl['lazyfast']:.2f}×" if fl.get("lazyfast") and "torch_func" in fl else "–"
        lines.append(f"| {row['model']} | {row['parameters'] / 1e6:.2f} M | {sec['standard'] * 1e3:.1f} ms | "
                     f"{sec['lazyfast'] * 1e3:.1f} ms | {rr(rat['lazyfast/standard'])} | {floor} | "
                     f"{sec['torch_func'] * 1e3:.1f} ms | {rr(rat['torch_func/lazyfast'])} | {tf_fl} | {ntk} | "
                     + (f"{mem['lazyfast']:.2f}× |" if mem else "– |")
                     + (f" {mem['torch_func']:.2f}× |" if "torch_func" in mem else " – |"))
    lines += ["", "| target (issue 20) | goal | models meeting it (median) | models whose product floor allows it |",
              "|---|---|---|---|"]
    for label, key, op, goal in TARGETS:
        floors = []
        for row in res["models"]:
            fl = row.get("products", {}).get("flops", {})
            if key == "lazyfast/standard" and fl.get("standard") and "lazyfast" in fl:
                floors.append((row["model"], fl["lazyfast"] / fl["standard"]))
            elif key == "torch_func/lazyfast" and fl.get("lazyfast") and "torch_func" in fl:
                floors.append((row["model"], fl["torch_func"] / fl["lazyfast"]))
        allowed = [m for m, v in floors if (v <= goal if op == "<=" else v >= goal)]
        if floors:
            lo, hi = min(v for _, v in floors), max(v for _, v in floors)
            span = f"{lo:.2f}×" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}×–{hi:.2f}×"
            what = "products lazyfast / standard" if key == "lazyfast/standard" else "products torch.func / lazyfast"
            floor_cell = f"{len(allowed)} of {len(floors)} ({what}: {span})"
        else:
            floor_cell = "– (memory: not a product count)" if key is None else "– (not counted in this run)"
        vals = []
        for row in res["models"]:
            v = (row["ratios"][key]["median"] if key else row.get("memory", {}).get("peak_ratio", {}).get("lazyfast"))
            if v is not None:
                vals.append((row["model"], v))
        ok = [m for m, v in vals if (v <= goal if op == "<=" else v >= goal)]
        lines.append(f"| {label} | {op.replace('<=', '≤').replace('>=', '≥')} {goal:g}× | {len(ok)} of {len(vals)}"
                     + (f" ({', '.join(ok)})" if ok else "") + f" | {floor_cell} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "linearized_models_cpu.json"))
    p.add_argument("--markdown", metavar="RESULTS_JSON")
    p.add_argument("--memory", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.markdown:
        with open(a.markdown) as fh:
            print(markdown(json.load(fh)))
        return 0
    if a.memory:
        print(json.dumps(memory_one(a.memory[0], a.n, a.memory[1], a.threads)))
        return 0
    torch.set_num_threads(a.threads)
    res = {"benchmark": "linearized_models", "n": a.n, "rounds_requested": a.rounds, "steps_per_round": a.steps,
           "machine": _stamp(a.threads), "models": []}
    for name in a.models:
        row = time_model(name, a.n, a.rounds, a.steps, a.methods)
        if not a.no_memory:
            row["memory"] = memory_model(name, a.n, a.methods, a.threads)
        if "standard" in a.methods:
            row["products"] = product_flops(name, a.n, a.methods)
        res["models"].append(row)
        print(json.dumps({k: row[k] for k in ("model", "seconds", "ratios")}), flush=True)
    res["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(tmp, a.out)
    md = markdown(res)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as fh:
        fh.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
