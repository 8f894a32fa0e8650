"""lazyfast vs neural-tangents' structured derivatives (JAX, CPU), by interleaved rounds (issue 14).

Run in a venv with neural-tangents 0.6.5 + jax/jaxlib 0.4.25 + torch 2.13.0 (recipe in
docs/benchmarks-models.md), importing lazyfast from this checkout:

    PYTHONPATH=. /work/nt-venv/bin/python benchmarks/bench_nt.py --threads 2 [--rounds 5] [--only a,b]
    PYTHONPATH=. /work/nt-venv/bin/python benchmarks/bench_nt.py --quick   # tiny sizes, 2 rounds, → out/

Problems (float32, x2=None, trace over outputs — neural-tangents' default ``trace_axes=(-1,)``,
which is the mean over outputs, like lazyfast's ``mode="trace"``):
  * MLP 100→2048→2048→2048→1 (ReLU), n=256 and n=1024: lazyfast on the ``nn.Sequential``
    (:func:`lazyfast.zoo.sequential_mlp`) and on the same network as ``lazyfast.MLP``;
  * the two-layer net ``lazyfast.TwoLayer(100, 4096)``, n=1024;
  * the 3-conv CNN (:class:`lazyfast.zoo.ConvNet3`, 64 channels, 32×32) with 1 and 10 outputs, n=128.
(``--quick``: the same problems at tiny widths and n, for a smoke run.)
The JAX function is written out here and its weights are loaded from the same torch model
(dense weights stored (in, out) and applied as ``h @ W`` — neural-tangents' structured path
falls back to Jacobian-contraction cost for ``h @ W.T``), and its kernel is checked against
lazyfast's. neural-tangents: ``jax.jit(nt.empirical_ntk_fn(f, vmap_axes=0,
implementation=STRUCTURED_DERIVATIVES))``, compiled and warm; its other implementations
(JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS) are compiled too and timed beside it when their compile +
first call is within ``ALT_FACTOR``× SD's (a peer's fastest method is the fair baseline: on the CNNs
Jacobian contraction beats structured derivatives).

Protocol: per row, every method runs in this one process; each is called once to warm up (for
neural-tangents that call compiles), then ``--rounds`` rounds (5 by default) each call every method
once in the same order (A B C A B C ...). A round's ratio is neural-tangents' time over lazyfast's in
that round, against SD (issue 14's target) and against neural-tangents' fastest timed implementation
(the one with the lowest median time over the rounds); a row reports the median ratio over rounds
and its min–max (``median× [min–max]``), and the JSON keeps every round's times. neural-tangents/__init__
imports its TensorFlow port (``neural_tangents.experimental``, needs tensorflow); it is not used here,
so an empty module stands in for it. Writes benchmarks/results/nt_compare_cpu.json and .md (or
``--out``), stamped (machine, load before/after, date, commit).

Each row also gets its **product floor**: the FLOPs of the structured formula's products
(:func:`product_flops`: forward, k-wide backward, per-layer per-example gradients or Grams) at the
float32 GEMM rate measured in this process before and after the row (:func:`gemm_rate`, the faster).
No method doing those products beats it, so neural-tangents' fastest time over the floor is the
largest ratio such a method could reach; issue 19's targets (>= 1.5× its fastest implementation on
every row) are reported with it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
AGREE_TOL = 1e-4  # float32 vs float32, relative to max |Θ|
SD = "neural-tangents SD (jit, warm)"
ALT_NAMES = {"JACOBIAN_CONTRACTION": "JC", "NTK_VECTOR_PRODUCTS": "NVP"}
ALT_FACTOR = 4.0  # an alternative implementation is timed when its compile + first call is within this × SD's


def _import_nt():
    sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
    import neural_tangents as nt

    return nt


def jax_mlp(seq):
    """(f, params) of an nn.Sequential of Linear/ReLU, weights (in, out)."""
    import jax.numpy as jnp
    from torch import nn

    lins = [m for m in seq if isinstance(m, nn.Linear)]
    params = [(jnp.asarray(m.weight.detach().T.numpy()), jnp.asarray(m.bias.detach().numpy())) for m in lins]

    def f(p, x):
        h = x
        for i, (w, b) in enumerate(p):
            h = h @ w + b
            if i < len(p) - 1:
                h = jnp.maximum(h, 0.0)
        return h

    return f, params


def jax_two_layer(model):
    import jax.numpy as jnp

    A = jnp.asarray(model.hidden.weight.detach().T.numpy())  # (d, m)
    B = jnp.asarray(model.output.weight.detach().T.numpy())  # (m, k)
    scale = float(model.scale)

    def f(p, x):
        return scale * (jnp.maximum(x @ p[0], 0.0) @ p[1])

    return f, (A, B)


def jax_conv3(model):
    import jax.numpy as jnp
    from jax import lax

    convs = [model.conv1, model.conv2, model.conv3]
    params = ([(jnp.asarray(c.weight.detach().numpy()), jnp.asarray(c.bias.detach().numpy())) for c in convs],
              (jnp.asarray(model.head.weight.detach().T.numpy()), jnp.asarray(model.head.bias.detach().numpy())))

    def f(p, x):
        h = x
        for w, b in p[0]:
            h = lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
            h = jnp.maximum(h + b[None, :, None, None], 0.0)
        h = h.mean((2, 3))
        return h @ p[1][0] + p[1][1]

    return f, params


def problems(quick: bool = False):
    """The rows: full sizes, or (``quick``) the same problems at tiny widths and n, for a smoke run."""
    import torch

    import lazyfast
    from lazyfast import zoo

    width, ns, tl_m, tl_n, ch, cnn_n = (64, (32,), 256, 64, 8, 8) if quick else (2048, (256, 1024), 4096, 1024, 64, 128)
    out = []
    for n in ns:
        seq = zoo.sequential_mlp(100, width, 3, 1)
        # JC and NVP are tried at the first n (both take seconds where SD takes ~0.1 s); at n=1024 they are not run
        first_n = n == ns[0]
        out.append(dict(id=f"mlp{width}_n{n}", note=f"MLP 100→{width}³→1, n={n}", n=n, jax=jax_mlp(seq),
                        floor=("mlp", [100, width, width, width, 1]),
                        torch={"lazyfast auto (nn.Sequential)": seq,
                               "lazyfast auto (lazyfast.MLP)": zoo.as_lazyfast_mlp(seq)},
                        x=zoo.inputs("mlp2048", n),
                        nt_alternatives=tuple(ALT_NAMES) if first_n else (),
                        nt_note="" if first_n else f"JC, NVP not run: far slower than SD at n={ns[0]} (row above)"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tl = lazyfast.TwoLayer(100, tl_m, 1)
    out.append(dict(id="two_layer", note=f"TwoLayer d=100, m={tl_m}, n={tl_n}", n=tl_n, jax=jax_two_layer(tl),
                    floor=("two_layer", [100, tl_m]),
                    torch={"lazyfast auto (TwoLayer)": tl}, x=zoo.inputs("mlp2048", tl_n),
                    nt_alternatives=tuple(ALT_NAMES)))
    for k in (1, 10):
        cnn = zoo.conv3(ch, k)
        out.append(dict(id=f"conv3_k{k}", note=f"3-conv CNN, {ch} channels, 32×32, {k} output(s), n={cnn_n}", n=cnn_n,
                        floor=("conv3", [3, ch, 32 * 32, k]),
                        jax=jax_conv3(cnn), torch={"lazyfast auto (ConvNet3)": cnn},
                        x=zoo.inputs(f"conv3_k{k}", cnn_n), nt_alternatives=tuple(ALT_NAMES)))
    return out


def _git_commit():
    from lazyfast.bench import git_commit

    return git_commit() or "unknown"


def product_flops(spec, n) -> float:
    """FLOPs of the products of the structured formula of a row's kernel (x2 = None, trace), each
    counted once: the forward, the k-wide backward to every layer's output, and per layer its
    per-example-gradient or Gram products (symmetric Grams: n(n+1)/2 sample pairs).

    * MLP (dims d0..dL, one output): forward n·Σ d_{l-1}d_l; backward n·Σ_{l≥2} d_l d_{l-1}; Grams of the
      layer inputs and cotangents n(n+1)/2·Σ (d_{l-1} + d_l) (the Σ_l (δδᵀ) ⊙ (hhᵀ + 1) formula);
    * TwoLayer (d, m): forward n·d·m; Grams n(n+1)/2·(d + 2m) (x xᵀ and σ'σ'ᵀ for the hidden
      weights, σσᵀ for the output weights);
    * 3-conv CNN (C_in, c channels, P positions, k outputs): forward n·(P·9C_in·c + 2P·9c²); backward
      through conv3 and conv2 k·n·2P·9c²; per-example weight gradients k·n·(P·9C_in·c + 2P·9c²); their
      Gram n(n+1)/2·k·(number of parameters).
    Multiply-adds count 2 FLOPs."""
    kind, a = spec
    pairs = n * (n + 1) / 2
    if kind == "mlp":
        fwd = n * sum(a[i] * a[i + 1] for i in range(len(a) - 1))
        bwd = n * sum(a[i] * a[i + 1] for i in range(1, len(a) - 1))
        gram = pairs * sum(a[i] + a[i + 1] for i in range(len(a) - 1))
        return 2.0 * (fwd + bwd + gram)
    if kind == "two_layer":
        d, m = a
        return 2.0 * (n * d * m + pairs * (d + 2 * m))
    if kind == "conv3":
        cin, c, P, k = a
        f1, f23 = P * 9 * cin * c, 2 * P * 9 * c * c
        params = 9 * cin * c + 2 * 9 * c * c + 3 * c + c * k + k
        return 2.0 * (n * (f1 + f23) + k * n * f23 + k * n * (f1 + f23) + pairs * k * params)
    raise ValueError(kind)


def gemm_rate(torch, reps: int = 5) -> float:
    """The float32 GEMM rate of this machine now, FLOP/s: the fastest of ``reps`` (1024×2048)·(2048×2048)
    products (the sizes of the MLP rows' largest products), warm."""
    a, b = torch.randn(1024, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * 1024 * 2048 * 2048 / best


def summary(ratios):
    """median, min, max of per-round ratios (and the ratios themselves)."""
    return dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios), rounds=list(ratios))


def fmt_ratio(s) -> str:
    """``median× [min–max]``."""
    return f"{s['median']:.2f}× [{s['min']:.2f}–{s['max']:.2f}]"


def run_row(pb, rounds, nt, jax, np, torch, lazyfast, log):
    """One row: compile/warm every method, then ``rounds`` interleaved rounds (A B C A B C ...)."""
    f, params = pb["jax"]
    x = pb["x"]
    xj = jax.numpy.asarray(x.numpy())
    kfn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0,
                                      implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES))
    t0 = time.perf_counter()
    K_nt = np.asarray(kfn(xj, None, params).block_until_ready())  # compile + first call: SD's warm-up
    compile_s = time.perf_counter() - t0
    calls = {SD: lambda: kfn(xj, None, params).block_until_ready()}
    first = {SD: compile_s}
    skipped = {}
    # neural-tangents' other implementations, timed beside SD when their compile + first call
    # is within ALT_FACTOR× SD's (a fair baseline is the peer's fastest); others are recorded
    for impl in pb.get("nt_alternatives", ()):
        name = f"neural-tangents {ALT_NAMES[impl]} (jit, warm)"
        alt = jax.jit(nt.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0,
                                          implementation=getattr(nt.NtkImplementation, impl)))
        t0 = time.perf_counter()
        try:
            K_alt = np.asarray(alt(xj, None, params).block_until_ready())
        except Exception as e:  # noqa: BLE001 - out of memory / XLA errors are recorded
            skipped[name] = f"failed: {type(e).__name__}"
            log(f"[{pb['id']}] {name:36s} failed: {type(e).__name__}")
            continue
        first[name] = time.perf_counter() - t0
        if float(np.abs(K_alt - K_nt).max() / np.abs(K_nt).max()) > AGREE_TOL:
            skipped[name] = "disagrees with SD"
            continue
        if first[name] > ALT_FACTOR * compile_s:
            skipped[name] = f"not timed: compile + first call {first[name]:.1f} s (> {ALT_FACTOR:g}× SD's)"
            log(f"[{pb['id']}] {name:36s} {skipped[name]}")
            continue
        calls[name] = (lambda g: lambda: g(xj, None, params).block_until_ready())(alt)
    outs = {}
    rate_before = gemm_rate(torch)
    for name, model in pb["torch"].items():
        outs[name] = lazyfast.empirical_ntk(model, x)  # warm-up (and the agreement check)
        calls[name] = (lambda m: lambda: lazyfast.empirical_ntk(m, x))(model)
    times = {k: [] for k in calls}
    for r in range(rounds):  # all methods in one process, warm, interleaved: A B C A B C ...
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        log(f"[{pb['id']}] round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.4f} s" for k, v in times.items()))
    rate = max(rate_before, gemm_rate(torch))  # the faster of before / after: the lower floor
    med = {k: statistics.median(v) for k, v in times.items()}
    nt_names = [k for k in calls if k not in outs]
    best_nt = min(nt_names, key=med.get)  # neural-tangents' fastest timed implementation, by median
    K_nt_t = torch.from_numpy(K_nt).double()
    scale = float(K_nt_t.abs().max())
    res = []
    for name in calls:
        r = dict(method=name, seconds=med[name], min_seconds=min(times[name]), max_seconds=max(times[name]),
                 times=times[name])
        if name in outs:
            err = float((outs[name].double() - K_nt_t).abs().max() / scale)
            r.update(rel_diff_vs_nt=err, agrees=err <= AGREE_TOL,
                     nt_sd_over_lazyfast=summary([a / b for a, b in zip(times[SD], times[name])]),
                     nt_fastest_over_lazyfast=summary([a / b for a, b in zip(times[best_nt], times[name])]))
            log(f"[{pb['id']}] {name:36s} median {r['seconds']:.4f} s  NT SD / lazyfast "
                f"{fmt_ratio(r['nt_sd_over_lazyfast'])}, NT fastest / lazyfast {fmt_ratio(r['nt_fastest_over_lazyfast'])}, "
                f"rel.diff {err:.1e}")
        else:
            r["compile_and_first_call_seconds"] = first[name]
            log(f"[{pb['id']}] {name:36s} median {r['seconds']:.4f} s  (compile+first {first[name]:.1f} s)")
        res.append(r)
    floor = None
    if pb.get("floor"):
        flops = product_flops(pb["floor"], pb["n"])
        floor = dict(flops=flops, gemm_flops_per_s=rate, seconds=flops / rate,
                     nt_fastest_over_floor=med[best_nt] / (flops / rate))
        log(f"[{pb['id']}] product floor {flops / 1e9:.1f} GFLOP at {rate / 1e9:.0f} GFLOP/s = "
            f"{floor['seconds']:.4f} s; neural-tangents' fastest / floor {floor['nt_fastest_over_floor']:.2f}×")
    return dict(id=pb["id"], note=pb["note"], n=pb["n"], order=list(calls), results=res, nt_fastest=best_nt,
                nt_not_timed=skipped, nt_alternatives_note=pb.get("nt_note", ""), floor=floor)


ISSUE19_GOAL = 1.5  # issue 19: >= 1.5x neural-tangents' fastest implementation on every row


def targets19(rows):
    """Issue 19's targets: lazyfast >= 1.5× neural-tangents' fastest implementation on the MLP rows, the
    two-layer net and both CNN rows, on the median ratio; ``reachable``: whether 1.5× that
    implementation's time is above the row's product floor at the measured GEMM rate."""
    out = []
    for row in rows:
        for r in row["results"]:
            if "nt_fastest_over_lazyfast" not in r:
                continue
            s, fl = r["nt_fastest_over_lazyfast"], row.get("floor")
            out.append(dict(target=f"{row['id']}: {r['method']} vs neural-tangents' fastest "
                                   f"({row['nt_fastest'].split(' (')[0]})", goal=f">= {ISSUE19_GOAL}×",
                            measured=s["median"], measured_min=s["min"], measured_max=s["max"],
                            met=bool(s["median"] >= ISSUE19_GOAL and r["agrees"]),
                            floor_ratio=None if fl is None else fl["nt_fastest_over_floor"],
                            reachable=None if fl is None else bool(fl["nt_fastest_over_floor"] >= ISSUE19_GOAL)))
    return out


def targets(rows):
    """Issue 14's targets, on the median ratio over rounds (and the kernels agreeing)."""
    out = []
    for rid, goal in (("mlp2048_n256", 1.2), ("mlp2048_n1024", 1.2), ("conv3_k10", 1.5)):
        row = next((r for r in rows if r["id"] == rid), None)
        if row is None:
            continue
        for r in row["results"]:
            if "nt_sd_over_lazyfast" not in r:
                continue
            vs = [(SD, "neural-tangents SD", r["nt_sd_over_lazyfast"])]
            if row["nt_fastest"] != SD:
                vs.append((row["nt_fastest"], f"neural-tangents' fastest ({row['nt_fastest'].split(' (')[0]})",
                           r["nt_fastest_over_lazyfast"]))
            for _, what, s in vs:
                out.append(dict(target=f"{rid}: {r['method']} vs {what}", goal=f">= {goal}×", measured=s["median"],
                                measured_min=s["min"], measured_max=s["max"],
                                met=bool(s["median"] >= goal and r["agrees"])))
    return out


def markdown(result) -> str:
    m = result["machine"]
    L = ["# lazyfast vs neural-tangents structured derivatives (CPU)", "",
         "Generated by `benchmarks/bench_nt.py` (do not edit by hand).", "",
         f"Machine: {m['processor']}, {m['cpu_count']} CPUs; torch {m['torch']} ({m['torch_threads']} threads), "
         f"jax {m['jax']}, neural-tangents {m['neural_tangents']}; {m['date']}; commit {m['commit']}; load average "
         f"before {'/'.join(f'{v:.2f}' for v in m['load_before'])}, after "
         f"{'/'.join(f'{v:.2f}' for v in m['load_after'])}; `{m['command']}`.", "",
         f"float32, x2=None, trace; every method in one process, warm (neural-tangents jit-compiled), "
         f"{result['rounds']} interleaved rounds (A B C A B C ...). Times: median over rounds [min–max]; ratios: "
         "neural-tangents' time over lazyfast's in the same round, median× [min–max] over rounds.", "",
         "| problem | method | time (s) | neural-tangents SD / lazyfast | its fastest implementation / lazyfast | "
         "rel. diff vs neural-tangents |",
         "|---|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        for r in row["results"]:
            t = f"{r['seconds']:.4f} [{r['min_seconds']:.4f}–{r['max_seconds']:.4f}]"
            if "nt_sd_over_lazyfast" in r:
                cells = (f"{fmt_ratio(r['nt_sd_over_lazyfast'])} | {fmt_ratio(r['nt_fastest_over_lazyfast'])} | "
                         f"{r['rel_diff_vs_nt']:.1e}" + ("" if r["agrees"] else " **DISAGREES**"))
            else:
                cells = (f"(compile + first call {r['compile_and_first_call_seconds']:.1f} s"
                         + ("; fastest" if r["method"] == row["nt_fastest"] else "") + ") | |")
            L.append(f"| {row['note']} | {r['method']} | {t} | {cells} |")
        for name, why in row.get("nt_not_timed", {}).items():
            L.append(f"| {row['note']} | {name} | | {why} | | |")
        if row.get("nt_alternatives_note"):
            L.append(f"| {row['note']} | other neural-tangents implementations | | {row['nt_alternatives_note']} | | |")
    if result.get("quick"):
        return "\n".join(L + ["", "Targets (issue 14): not judged on the --quick sizes."]) + "\n"
    L += ["", "| target (issue 14), on the median ratio | goal | measured: median [min–max] | met? |", "|---|---|---:|---|"]
    for t in result["targets"]:
        L.append(f"| {t['target']} | {t['goal']} | {t['measured']:.2f}× [{t['measured_min']:.2f}–{t['measured_max']:.2f}] "
                 f"| {'yes' if t['met'] else '**no**'} |")
    if result.get("targets19"):
        L += issue19_lines(result)
    return "\n".join(L) + "\n"


def issue19_lines(result) -> list:
    """Markdown lines: each row's product floor, then issue 19's targets with whether the floor allows them
    (this file's table and the project's docs table both)."""
    L = ["", "Product floor: the FLOPs of the structured formula's products (forward, k-wide backward, per-layer "
         "per-example gradients or Grams; `product_flops`) at the float32 GEMM rate measured in the same process "
         "before and after the row (the faster). A method doing these products cannot beat it; neural-tangents' "
         "fastest / floor is the largest ratio such a method could reach.", "",
         "| problem | product FLOPs | GEMM rate | floor (s) | neural-tangents' fastest / floor |",
         "|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        fl = row.get("floor")
        if fl:
            L.append(f"| {row['note']} | {fl['flops'] / 1e9:.1f} G | {fl['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s | "
                     f"{fl['seconds']:.4f} | {fl['nt_fastest_over_floor']:.2f}× |")
    L += ["", "| target (issue 19), on the median ratio | goal | measured: median [min–max] | met? | "
          "reachable above the floor? |", "|---|---|---:|---|---|"]
    for t in result["targets19"]:
        reach = "—" if t["reachable"] is None else (
            f"{'yes' if t['reachable'] else '**no**'} (floor allows {t['floor_ratio']:.2f}×)")
        L.append(f"| {t['target']} | {t['goal']} | {t['measured']:.2f}× [{t['measured_min']:.2f}–"
                 f"{t['measured_max']:.2f}] | {'yes' if t['met'] else '**no**'} | {reach} |")
    return L


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=None,
                    help="interleaved timed rounds per row (default 5; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run), written to out/nt_compare_quick "
                                                         "unless --out is given")
    ap.add_argument("--only", help="comma-separated problem ids")
    ap.add_argument("--threads", type=int, help="torch threads; 1 also makes XLA single-threaded (default: both "
                                                "use every core)")
    ap.add_argument("--out", help="output path without extension (default benchmarks/results/nt_compare_cpu)")
    a = ap.parse_args(argv)
    rounds = a.rounds if a.rounds is not None else (2 if a.quick else 5)
    if rounds < 1:
        ap.error("--rounds must be >= 1")
    out_path = a.out or (os.path.join(ROOT, "out", "nt_compare_quick") if a.quick
                         else os.path.join(HERE, "results", "nt_compare_cpu"))
    if a.threads == 1:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    import numpy as np
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    nt = _import_nt()
    import jax

    import lazyfast

    load_before = os.getloadavg()
    rows = []
    for pb in problems(a.quick):
        if a.only and pb["id"] not in a.only.split(","):
            continue
        rows.append(run_row(pb, rounds, nt, jax, np, torch, lazyfast, lambda s: print(s, flush=True)))
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cpu_count=os.cpu_count(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   jax=jax.__version__, neural_tangents=nt.__version__, jax_devices=str(jax.devices()),
                   xla_flags=os.environ.get("XLA_FLAGS", ""), lazyfast_backend=lazyfast.backend_info(),
                   load_before=list(load_before), load_after=list(os.getloadavg()),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=_git_commit(),
                   command="PYTHONPATH=. python benchmarks/bench_nt.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]))
    result = dict(machine=machine, protocol="interleaved rounds", rounds=rounds, quick=a.quick, rows=rows,
                  targets=[] if a.quick else targets(rows),  # the targets are for the full sizes
                  targets19=[] if a.quick else targets19(rows))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    text = markdown(result)
    with open(out_path + ".md", "w") as fh:
        fh.write(text)
    print(text)
    bad = [r for row in rows for r in row["results"] if r.get("agrees") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
