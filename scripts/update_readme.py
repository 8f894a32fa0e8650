"""Generates every generated block of the documents from the committed results files.

Each block sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; ``DOCS`` (below) says which
document holds which blocks (each block is in exactly one). The performance tables, in
docs/benchmarks.md, are each rebuilt from one results file written by a benchmark command (the
table's first line names the file, the command, and the stamp: date, commit, load average):

    bench-quick        benchmarks/results/bench-quick-cpu.json   lazyfast bench --quick --json … --markdown …
    two-layer          benchmarks/results/two_layer_cpu.json     python benchmarks/two_layer_report.py
    mlp                benchmarks/results/mlp_cpu.json           pytest benchmarks/bench_mlp.py --benchmark-json …
    engine             benchmarks/results/engine_cpu.json        python benchmarks/engine_cpu.py
    models             benchmarks/results/models_cpu.json        python benchmarks/bench_models.py …
                       (+ models_cpu_update.json, models_cpu_full_mode.json, models_cpu_rounds*.json: other
                       runs of some rows, --out …; a row in several runs is taken from the latest)
    nt                 benchmarks/results/nt_compare_cpu.json    python benchmarks/bench_nt.py …
    linearized-models  benchmarks/results/linearized_models_cpu.json   python benchmarks/bench_linearized_models.py
    users-models       benchmarks/results/users_models_cpu.json        python benchmarks/bench_users_models.py

The reproduction blocks (docs/REPRODUCTION.md: ``reproduction``, ``cnn-alpha``, ``cnn-sweep``,
``cnn-gpu-sizing``) are rebuilt from docs/figures/*.json by lazyfast/experiments/claims.py. README.md
holds one block, ``summary``: a few headline rows from both, each linking to its table.

    python scripts/update_readme.py            # rewrite the blocks of README.md, docs/benchmarks.md, docs/REPRODUCTION.md
    python scripts/update_readme.py --check    # exit 1 if a block and its results files disagree

tests/test_readme_tables.py runs the check, so a block edited by hand, or a results file
regenerated without updating the documents, fails CI.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Callable, Dict, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
sys.path.insert(0, str(ROOT))


def _load(name: str, results: pathlib.Path) -> dict:
    return json.loads((results / name).read_text())


def _s(t: float) -> str:
    """Seconds, 3 significant digits."""
    return f"{t:.3g} s" if t >= 1e-3 else f"{t * 1e3:.3g} ms"


def _x(r: float) -> str:
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×" if r >= 100 else f"{r:.1f}×"


def _goal(ratio: float, goal: float) -> str:
    """A target cell with its verdict, computed from the measured ratio."""
    return f"≥ {goal:g}× ({'met' if ratio >= goal else 'NOT met'})"


def _stamp_line(file: str, st: dict, command: str | None = None) -> str:
    return (f"*Generated from `benchmarks/results/{file}` (`{command or st.get('command')}`; "
            f"{st.get('date')}, commit {st.get('commit')}, load average {st.get('load_avg')}, "
            f"{st.get('machine')}, {st.get('threads')} threads).*")


# ----------------------------------------------------------------------------- bench --quick
def table_bench_quick(results: pathlib.Path) -> str:
    from lazyfast.bench import format_table

    res = _load("bench-quick-cpu.json", results)
    m = res["machine"]
    head = _stamp_line("bench-quick-cpu.json", m, "lazyfast bench --quick --json benchmarks/results/bench-quick-cpu.json "
                                                  "--markdown benchmarks/results/bench-quick-cpu.md")
    return head + "\n\n" + format_table(res)


# ----------------------------------------------------------------------------- two-layer targets
def table_two_layer(results: pathlib.Path) -> str:
    r = _load("two_layer_cpu.json", results)
    g, t = r["gram"], r["gram"]["time_s"]
    sh = g["shape"]
    rows = ["| workload | lazyfast | baseline | ratio | target |", "|---|---|---|---|---|"]
    desc = f"n = {sh['n']}, d = {sh['d']}, m = {sh['m']}"
    rows.append(f"| two-layer eNTK Gram, {desc}, X2 given | {_s(t['fused_asym'])}, {g['fused_asym_gflops']:.0f} GFLOP/s "
                f"= **{100 * g['fused_asym_frac_sgemm']:.0f} % of sgemm** ({g['sgemm_gflops']:.0f} GFLOP/s in the same run) | "
                f"dense GEMM formulation {_s(t['dense_asym'])} | **{_x(g['speedup_vs_dense_asym'])}** | "
                f"{_goal(g['speedup_vs_dense_asym'], 1.0)}; ≥ 80 % of sgemm "
                f"({'met' if g['fused_asym_frac_sgemm'] >= 0.8 else 'NOT met'}) |")
    rows.append(f"| same, X2 = None (symmetric: half the tiles) | {_s(t['fused_sym'])} | dense GEMM formulation "
                f"{_s(t['dense_sym'])} | **{_x(g['speedup_vs_dense_sym'])}** | |")
    if "torch_func_sym" in t:
        rows.append(f"| same, X2 = None | {_s(t['fused_sym'])} | torch.func Jacobian contraction, whole batch, J once "
                    f"{_s(t['torch_func_sym'])} | **{_x(g['speedup_vs_torch_func_sym'])}** | {_goal(g['speedup_vs_torch_func_sym'], 50)} |")
        rows.append(f"| same, X2 given | {_s(t['fused_asym'])} | torch.func Jacobian contraction, whole batch "
                    f"{_s(t['torch_func_asym'])} | **{_x(g['speedup_vs_torch_func_asym'])}** | {_goal(g['speedup_vs_torch_func_asym'], 50)} |")
    for mem in r["memory"]:
        rows.append(f"| Gram peak extra memory, n = {mem['n']}, m = {mem['m']}, X2 {'None' if mem['x2_none'] else 'given'} "
                    f"| **{mem['extra_mb']:.0f} MB** (output {mem['output_mb']:.0f} MB) | dense formulation ≈ "
                    f"{mem['dense_estimate_mb'] / 1024:.1f} GB (estimate) | | ≤ {mem['limit_mb']:.0f} MB "
                    f"({'met' if mem['within_target'] else 'MISSED'}) |")
    p = r["products"]
    j, v, ps = p["jvp"], p["vjp"], p["shape"]
    scaled = (f" (run on {j['baseline_tangents']} tangents, ×{j['baseline_scaled_by']:.0f})"
              if j["baseline_scaled_by"] != 1 else "")
    pdesc = f"n = {ps['n']}, m = {ps['m']}"
    rows.append(f"| JVP, T = {ps['T']} tangents, {pdesc} | {_s(j['fused_s'])} ({j['fused_gflops']:.0f} GFLOP/s) | "
                f"torch.func vmap(jvp) {_s(j['torch_func_s'])}{scaled} | **{_x(j['speedup_vs_torch_func'])}** | "
                f"{_goal(j['speedup_vs_torch_func'], 3)} |")
    rows.append(f"| same | | dense GEMM formulation {_s(j['dense_s'])}{scaled} | **{_x(j['speedup_vs_dense'])}** | |")
    rows.append(f"| VJP, {pdesc} | {_s(v['fused_s'])} | torch.func vjp {_s(v['torch_func_s'])} | "
                f"**{_x(v['speedup_vs_torch_func'])}** | {_goal(v['speedup_vs_torch_func'], 3)} |")
    rows.append(f"| same | | dense GEMM formulation {_s(v['dense_s'])} | **{_x(v['speedup_vs_dense'])}** | |")
    proto = f"every method: one warm-up call, then the best of {r.get('repeat')} timed calls"
    return _stamp_line("two_layer_cpu.json", r) + f" Float32, k = 1, ReLU; {proto}.\n\n" + "\n".join(rows)


# ----------------------------------------------------------------------------- MLP / VGG-11
def table_mlp(results: pathlib.Path) -> str:
    r = _load("mlp_cpu.json", results)
    b = {x["name"]: x for x in r["benchmarks"]}

    def mn(name):
        return b[name]["stats"]["min"]

    def peak(name):
        return b[name]["extra_info"].get("peak_rss_mb")

    lf, lw, jc = "test_mlp_lazyfast", "test_mlp_layerwise_pytorch", "test_mlp_torchfunc_jacobian"
    vl, va = "test_vgg11_lazyfast_extract", "test_vgg11_authors_loop"
    load = b[lf]["extra_info"].get("load_avg_before", "not recorded")
    st = {"command": "python -m pytest benchmarks/bench_mlp.py --benchmark-only "
                     "--benchmark-json=benchmarks/results/mlp_cpu.json",
          "date": r["datetime"][:16].replace("T", " ") + " UTC", "commit": (r.get("commit_info") or {}).get("id", "")[:12]
          + ("+dirty" if (r.get("commit_info") or {}).get("dirty") else ""),
          "load_avg": load, "machine": (r.get("machine_info") or {}).get("cpu", {}).get("brand_raw", "?"),
          "threads": b[lf]["extra_info"].get("threads")}
    rows = ["| workload | lazyfast | baseline | ratio | target |", "|---|---|---|---|---|"]
    proto = b[lf]["extra_info"].get("protocol", f"best of {b[lf]['stats']['rounds']}")
    rows.append(f"| MLP eNTK, d = 100 → 2048 → 2048 → 2048 → 1, n = 1024, X2 = None | {_s(mn(lf))}, {peak(lf):.0f} MB peak RSS "
                f"| pure-PyTorch layerwise formula {_s(mn(lw))}, {peak(lw):.0f} MB | **{_x(mn(lw) / mn(lf))}** | "
                f"{_goal(mn(lw) / mn(lf), 1.5)} |")
    e = b[jc]["extra_info"]
    if "jc_chunk" in e:
        chunk_txt = "whole batch, J once" if e["jc_chunk"] is None else f"chunks of {e['jc_chunk']}: it does not fit whole"
    else:
        chunk_txt = "chunks of 64, one cold run: the old, unfair protocol"
    rows.append(f"| same, n = {e['n']} | {_s(e['lazyfast_same_n_s'])}, {e['lazyfast_same_n_peak_rss_mb']:.0f} MB | "
                f"torch.func Jacobian contraction ({chunk_txt}) {_s(mn(jc))}, {peak(jc):.0f} MB | "
                f"**{_x(mn(jc) / e['lazyfast_same_n_s'])}** | {_goal(mn(jc) / e['lazyfast_same_n_s'], 100)} |")
    ev = b[va]["extra_info"]
    rows.append(f"| VGG-11 (10N)×(10N) kernel at init, N = 100 CIFAR-size inputs | {_s(mn(vl))}, {peak(vl):.0f} MB | | | |")
    acc = ""
    if "lazyfast_f32_rel_err_vs_f64" in ev:
        acc = (f"; float32 error vs the float64 kernel: lazyfast {ev['lazyfast_f32_rel_err_vs_f64']:.1e}, "
               f"loop {ev['authors_f32_rel_err_vs_f64']:.1e}")
    rows.append(f"| same, N = {ev['n']} | {_s(ev['lazyfast_same_n_s'])}, {ev['lazyfast_same_n_peak_rss_mb']:.0f} MB | "
                f"the authors' per-output backward loop (batch {ev['batch_size']}) {_s(mn(va))}, {peak(va):.0f} MB{acc} | "
                f"**{_x(mn(va) / ev['lazyfast_same_n_s'])}** | |")
    vproto = b[vl]["extra_info"].get("protocol", f"best of {b[vl]['stats']['rounds']}")
    return _stamp_line("mlp_cpu.json", st) + f" Float32; times: {proto} (VGG-11: {vproto}); peak RSS includes " \
        "the process's baseline.\n\n" \
        + "\n".join(rows)


# ----------------------------------------------------------------------------- engine
def table_engine(results: pathlib.Path) -> str:
    r = _load("engine_cpu.json", results)
    lines = [_stamp_line("engine_cpu.json", r)]
    if "step" in r:
        s = r["step"]
        v = s["variants"]
        std, tf = v["standard"]["min"], v["torch_func"]["min"]
        names = {"standard": "standard step of the network (not linearized)",
                 "lazyfast": '`Linearized(model)` (implementation="auto")',
                 "lazyfast_ntk": '`Linearized(model, implementation="ntk")` (fused JVP + VJP)',
                 "torch_func": "torch.func.jvp linearized step (baseline)"}
        lines += ["", f"One training step (forward + backward + SGD) of `TwoLayer`, n = {s['n']}, d = {s['d']}, "
                      f"m = {s['m']}; {r['warmup']} warm-up steps, then the best of {r['repeat']}:", "",
                  "| variant | step | vs standard step (target ≤ 1.3×) | torch.func baseline / this (target ≥ 2×) | peak RSS |",
                  "|---|---|---|---|---|"]
        for k, row in v.items():
            lin = k in ("lazyfast", "lazyfast_ntk")
            v1 = f" ({'met' if row['min'] / std <= 1.3 else 'NOT met'})" if lin else ""
            v2 = f" ({'met' if tf / row['min'] >= 2 else 'NOT met'})" if lin else ""
            lines.append(f"| {names.get(k, k)} | {_s(row['min'])} | {row['min'] / std:.2f}×{v1} | {_x(tf / row['min'])}{v2} | "
                         f"{row['peak_mb']:.0f} MB |")
    if "cg" in r:
        c = r["cg"]
        lines += ["", "| matrix-free kernel regression (CG on Θ + λI) | iterations | rel. residual | time | peak RSS | dense Θ would need |",
                  "|---|---|---|---|---|---|",
                  f"| n = {c['n']:,}, d = {c['d']}, m = {c['m']} | {c['iterations']} | {c['residual']:.1e} "
                  f"({'converged' if c['converged'] else 'NOT converged'}) | {_s(c['seconds'])} | {c['peak_mb']:.0f} MB | "
                  f"{c['dense_theta_gb']:.0f} GB |"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- users' models (issue 14)
def _models_stamp(file: str, m: dict) -> str:
    load = "/".join(f"{v:.2f}" for v in m.get("load_before", [])) + " before, " + \
        "/".join(f"{v:.2f}" for v in m.get("load_after", [])) + " after"
    threads = m.get("threads", m.get("torch_threads"))
    return (f"*Generated from `benchmarks/results/{file}` (`{m.get('command')}`; {m.get('date')}, commit "
            f"{m.get('commit')}, load average {load}, {m.get('processor')}, {m.get('cpu_count')} cores, "
            f"{threads} threads).*")


# the runs of the models table (each file stamped): a row measured in several of them is taken from
# the latest (its stamp's date; on the same date the later file here), and the table says which run
# each row comes from and lists only the runs it takes rows from. A file is either of the earlier
# protocol (best of N, a fresh process per method) or of interleaved rounds (bench_models.is_rounds:
# times are medians over rounds, ratios the median of the per-round ratios [min–max]); both render.
MODELS_FILES = ("models_cpu.json", "models_cpu_update.json", "models_cpu_full_mode.json", "models_cpu_rounds.json",
                "models_cpu_rounds_resnet.json", "models_cpu_rounds_vgg.json")


def _bench(name: str):
    """benchmarks/<name>.py as a module (its own formatters and helpers; no benchmark runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench_models():
    return _bench("bench_models")


def merged_models(results: pathlib.Path):
    """[(file, run dict)] of the models runs that give the table a row, and the merged rows
    [(row, index of its run in that list)]."""
    runs = [(f, _load(f, results)) for f in MODELS_FILES if (results / f).exists()]
    bm = _bench_models()
    order = {r["id"]: i for i, r in enumerate(bm.ROWS_FULL)}
    rows: Dict[str, tuple] = {}
    for i, (_, r) in enumerate(runs):
        key = (r["machine"].get("date") or "", i)
        for row in r["rows"]:
            if row["id"] not in rows or key >= rows[row["id"]][2]:
                rows[row["id"]] = (row, i, key)
    used = sorted({i for _, i, _ in rows.values()})
    runs = [runs[i] for i in used]
    merged = sorted(((row, used.index(i)) for row, i, _ in rows.values()),
                    key=lambda t: order.get(t[0]["id"], len(order)))
    return runs, merged


def _models_ratio(rec: dict, auto: dict):
    """A method's time over auto's in the same row: (median, min, max); min and max are None for a run
    of the earlier protocol (its one ratio of best-of-N times)."""
    r = _bench_models().ratio_vs_auto(rec)
    if r is not None and r.get("min") is not None:
        return r["median"], r["min"], r["max"]
    return rec["seconds"] / auto["seconds"], None, None


def _x_range(med: float, lo, hi) -> str:
    """``108×`` (earlier protocol) or ``108× [101–115]`` (median of the per-round ratios [min–max])."""
    if lo is None:
        return _x(med)
    from lazyfast.bench.protocol import format_ratio

    return format_ratio(dict(median=med, min=lo, max=hi), fmt=lambda v: _x(v)[:-1])


_MODELS_OLD_PROTOCOL = ("fresh process per method, one warm-up, best of 3 (2 when a call takes > 20 s; \"1 call\": "
                        "the one call is the measurement)")
_MODELS_COMMON = ("every kernel checked against float64 (a method more than 1e-3 off is marked wrong and never counted). "
                  "The floor is one forward + backward plus the J·Jᵀ GEMM over all parameters: no method that forms "
                  "dense per-example gradients can beat it (lazyfast's Embedding rule forms sparse ones, hence auto "
                  "below the floor on token ids).")


def _models_rounds_protocol(rounds) -> str:
    return (f"one process per method, kept for its row, one warm-up (its peak RSS), then all methods of the row in "
            f"{rounds} interleaved rounds (A B C A B C ...): times are medians over the rounds, ratios the median of "
            f"the per-round ratios [min–max over rounds] (\"1 call\": the one call is the measurement)")


def _models_protocol(runs, tag) -> str:
    bm = _bench_models()
    kinds: Dict[str, list] = {}
    for i, (_, r) in enumerate(runs):
        text = _models_rounds_protocol(r["protocol"]["rounds"]) if bm.is_rounds(r) else _MODELS_OLD_PROTOCOL
        kinds.setdefault(text, []).append(i)
    if len(kinds) == 1:
        return f"Float32, x2 = None; {next(iter(kinds))}; {_MODELS_COMMON}"
    parts = [("run " if len(ix) == 1 else "runs ") + ", ".join(f"({tag[i]})" for i in ix) + f": {text}"
             for text, ix in kinds.items()]
    return "Float32, x2 = None; " + "; ".join(parts) + f"; {_MODELS_COMMON}"


def table_models(results: pathlib.Path) -> str:
    runs, merged = merged_models(results)
    bm = _bench_models()
    tut = "torch.func tutorial (J once)"
    tag = "abcdefgh"
    lines = []
    for i, (f, r) in enumerate(runs):
        lines.append(_models_stamp(f, r["machine"]) + (f" Run ({tag[i]})." if len(runs) > 1 else ""))
        lines.append("")
    lines += [_models_protocol(runs, tag), "",
              "| model | n | mode | lazyfast `auto` | tutorial (J once) | tutorial / auto | best correct peer | peer / auto | "
              "auto f32 error vs f64 | peers wrong or failing | run |",
              "|---|---:|---|---:|---:|---:|---|---:|---:|---|---|"]
    for row, i in merged:
        by = {x["method"]: x for x in row["results"]}
        a = by.get("lazyfast auto")
        if a is None or a.get("seconds") is None:
            continue
        t = by.get(tut)
        tcell = _s(t["seconds"]) if t and t.get("seconds") else "—"
        tr = _x_range(*_models_ratio(t, a)) if t and t.get("seconds") else ""
        floor = next((x for m, x in by.items() if m.startswith("floor") and x.get("seconds")), None)
        if floor is not None:
            tcell += f" (floor {_s(floor['seconds'])})"
        peers = [x for m, x in by.items() if m in bm.PEERS]
        ok = [x for x in peers if x.get("seconds") and x.get("correct")]
        best = min(ok, key=lambda x: _models_ratio(x, a)[0]) if ok else None
        pcell = f"{best['method'].split()[0]} {_s(best['seconds'])}" if best else "—"
        pr = _x_range(*_models_ratio(best, a)) if best else ""
        bad = [x["method"].split()[0] + (" wrong" if x.get("seconds") else " failed") for x in peers
               if not (x.get("seconds") and x.get("correct"))]
        err = a.get("rel_err")
        calls = " (1 call)" if str(a.get("timed_runs", "")).startswith("1 (cold)") else ""
        mem = f", peak {a['peak_rss_mb'] / 1024:.2f} GB" if row["n"] >= 1000 else ""
        lines.append(f"| {row['note'] or row['model']} | {row['n']} | {row['mode']} | {_s(a['seconds'])}{calls}{mem} | "
                     f"{tcell} | {tr} | {pcell} | {pr} | {err:.1e} | {', '.join(bad) or '—'} | {tag[i]} |")
    lines += ["", "| target | goal | measured | met? |", "|---|---|---:|---|"]
    for t in bm.targets([row for row, _ in merged]):
        v = t["measured"]
        rng = f" [{t['range'][0]:.3g}–{t['range'][1]:.3g}]" if t.get("range") else ""
        lines.append(f"| {t['target']} | {t['goal']} | {'' if v is None else f'{v:.3g}'}{rng} | "
                     f"{'not measured' if t['met'] is None else ('yes' if t['met'] else '**no**')} |")
    return "\n".join(lines)


def _nt_ratio(x: dict, key: str) -> dict | None:
    """A lazyfast row's ratio against neural-tangents (``key``: "sd" or "fastest") as median/min/max:
    nt_compare_cpu.json from interleaved rounds (``nt_sd_over_lazyfast``, ``nt_fastest_over_lazyfast``),
    or from the earlier min-of-repeats protocol (``speedup_vs_nt``, ``speedup_vs_nt_fastest``: one number)."""
    new = x.get("nt_sd_over_lazyfast" if key == "sd" else "nt_fastest_over_lazyfast")
    if new is not None:
        return new
    old = x.get("speedup_vs_nt") if key == "sd" else x.get("speedup_vs_nt_fastest", x.get("speedup_vs_nt"))
    return None if old is None else dict(median=old, min=old, max=old)


def _is_lazyfast_nt(x: dict) -> bool:
    return "nt_sd_over_lazyfast" in x or "speedup_vs_nt" in x


def table_nt(results: pathlib.Path) -> str:
    """The neural-tangents table: interleaved rounds (``rounds`` in the file: median× [min–max] over
    rounds) or, for a file from the earlier protocol (``repeats``), min of the repeats."""
    r = _load("nt_compare_cpu.json", results)
    rounds = "rounds" in r
    protocol = (f"every method in one process, warm, {r['rounds']} interleaved rounds (A B C A B C …); times are "
                "medians over rounds, a ratio is neural-tangents' time over lazyfast's in the same round, shown as "
                "median× [min–max] over rounds" if rounds else f"all alternate with lazyfast, min of {r['repeats']} each")
    lines = [_models_stamp("nt_compare_cpu.json", r["machine"]), "",
             f"Float32, x2 = None; neural-tangents {r['machine'].get('neural_tangents')} (jax {r['machine'].get('jax')}), "
             f"jit-compiled and warm: structured derivatives (SD, issue 14's baseline) and, where they run in "
             f"comparable time, its Jacobian-contraction (JC) and NTK-vector-product (NVP) implementations; "
             f"{protocol}; the kernels are checked against each other.", "",
             "| problem | neural-tangents SD | its fastest | lazyfast `auto` | vs SD | vs its fastest |",
             "|---|---:|---|---|---:|---:|"]
    cell = (lambda s: f"{s['median']:.2f}× [{s['min']:.2f}–{s['max']:.2f}]") if rounds else (lambda s: _x(s["median"]))
    for row in r["rows"]:
        nts = {x["method"]: x for x in row["results"] if not _is_lazyfast_nt(x)}
        sd = nts.get("neural-tangents SD (jit, warm)") or row["results"][0]
        fast_name = row.get("nt_fastest", sd["method"])
        fast = nts.get(fast_name, sd)
        fcell = f"{fast_name.split(' (')[0].replace('neural-tangents ', '')} {_s(fast['seconds'])}"
        for x in row["results"]:
            if not _is_lazyfast_nt(x):
                continue
            lines.append(f"| {row['note']} | {_s(sd['seconds'])} | {fcell} | {x['method'].replace('lazyfast auto ', '')} "
                         f"{_s(x['seconds'])} | {cell(_nt_ratio(x, 'sd'))} | {cell(_nt_ratio(x, 'fastest'))} |")
    lines += ["", "| target | goal | measured | met? |", "|---|---|---:|---|"]
    for t in r["targets"]:
        v = t["measured"]
        m = v if isinstance(v, str) else f"{v:.3g}"
        if "measured_min" in t:  # interleaved rounds: the median and its min–max
            m = cell(dict(median=v, min=t["measured_min"], max=t["measured_max"]))
        lines.append(f"| {t['target']} | {t['goal']} | {m} | {'yes' if t['met'] else '**no**'} |")
    if r.get("targets19"):  # the product floors and issue 19's targets, by the benchmark's own formatter
        lines += _bench("bench_nt").issue19_lines(r)
    return "\n".join(lines)


def table_linearized_models(results: pathlib.Path) -> str:
    """Issue 20's table, by the benchmark's own formatter (benchmarks/bench_linearized_models.py)."""
    return _bench("bench_linearized_models").markdown(_load("linearized_models_cpu.json", results))


def table_users_models(results: pathlib.Path) -> str:
    """Issue 19's table of timm / Hugging Face models, by the benchmark's own formatter
    (benchmarks/bench_users_models.py: interleaved rounds, the floor, the share on rules)."""
    return _bench("bench_users_models").markdown(_load("users_models_cpu.json", results))


# ----------------------------------------------------------------------------- the README's summary
def _lin_models(results: pathlib.Path) -> dict:
    return _load("linearized_models_cpu.json", results)


def _range(vals) -> str:
    lo, hi = min(vals), max(vals)
    return _x(lo) if _x(lo) == _x(hi) else f"{_x(lo)}–{_x(hi)}"


def _repro_row(figures: pathlib.Path) -> str:
    """The reproduction row of the summary: the verdict of every row of the reproduction table."""
    from lazyfast.experiments import claims

    rows = [line for line in claims.table(figures).splitlines() if line.startswith("| `")]
    holds, other = [], []
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0].split(" (")[0]  # "`cnn-sweep` vgg11 (÷8 widths, …)" → "`cnn-sweep` vgg11"
        (holds if cells[-1] == "yes" else other).append((name, cells[-1]))
    text = f"**{len(holds)} of {len(rows)}** rows hold: " + ", ".join(n for n, _ in holds)
    if other:
        text += "; " + "; ".join(f"{n}: {v}" for n, v in other)
    return (f"| the paper's claims, one row per experiment | {text} | "
            f"[summary table and figures](docs/REPRODUCTION.md#summary) (docs/figures/*.json) |")


def table_summary(results: pathlib.Path, figures: pathlib.Path) -> str:
    """README.md's one table: a few headline rows from the results files and docs/figures, each
    linking to the table it comes from (docs/benchmarks.md, docs/REPRODUCTION.md)."""
    bm = "docs/benchmarks.md"
    rows = ["| result | measured | details |", "|---|---|---|", _repro_row(figures)]

    g = _load("two_layer_cpu.json", results)["gram"]
    sh, t = g["shape"], g["time_s"]
    if "torch_func_sym" in t:
        rows.append(f"| two-layer eNTK Gram, n = {sh['n']}, d = {sh['d']}, m = {sh['m']} | {_s(t['fused_sym'])}: "
                    f"**{_x(g['speedup_vs_torch_func_sym'])}** the torch.func Jacobian contraction "
                    f"({_s(t['torch_func_sym'])}), {_x(g['speedup_vs_dense_sym'])} the same math as dense GEMMs | "
                    f"[two-layer table]({bm}#two-layer-kernels-at-the-target-sizes) (two_layer_cpu.json) |")

    b = {x["name"]: x for x in _load("mlp_cpu.json", results)["benchmarks"]}
    e = b["test_mlp_torchfunc_jacobian"]["extra_info"]
    lf, lw = b["test_mlp_lazyfast"]["stats"]["min"], b["test_mlp_layerwise_pytorch"]["stats"]["min"]
    jc = b["test_mlp_torchfunc_jacobian"]["stats"]["min"]
    rows.append(f"| MLP eNTK, 100 → 2048³ → 1 | n = {e['n']}: **{_x(jc / e['lazyfast_same_n_s'])}** the torch.func "
                f"Jacobian contraction; n = 1024: {_x(lw / lf)} the layerwise formula | "
                f"[MLP / VGG-11 table]({bm}#structured-mlp-entk-and-the-vgg-11-kernel) (mlp_cpu.json) |")

    _, merged = merged_models(results)
    tut, tut_range = {}, {}  # median ratio (the earlier protocol: its one ratio), and the cell with its range
    for row, _ in merged:
        by = {x["method"]: x for x in row["results"]}
        a, tt = by.get("lazyfast auto"), by.get("torch.func tutorial (J once)")
        if a and a.get("seconds") and tt and tt.get("seconds"):
            key = f"{row['model']}, n = {row['n']}, {row['mode']}"
            r = _models_ratio(tt, a)
            tut[key], tut_range[key] = r[0], _x_range(*r)
    tg = [x for x in _bench_models().targets([row for row, _ in merged]) if x["met"] is not None]
    lo, hi = min(tut, key=tut.get), max(tut, key=tut.get)
    rows.append(f"| eNTK of the models users bring (MLPs, weight sharing, VGG-11, ResNet-18s, Transformers; "
                f"{len(merged)} rows) | **{_x(tut[lo])}–{_x(tut[hi])}** the torch.func tutorial "
                f"({tut_range[lo]}: {lo}; {tut_range[hi]}: {hi}); {sum(x['met'] for x in tg)} of {len(tg)} targets met | "
                f"[models table]({bm}#the-models-users-bring) (models_cpu*.json) |")

    um = _load("users_models_cpu.json", results)["rows"]
    tu = {r["row"]: r["tutorial_over_lazyfast"]["median"] for r in um if r["tutorial_over_lazyfast"]}
    ulo, uhi = min(tu, key=tu.get), max(tu, key=tu.get)
    shares = [r["rule_share"] for r in um]
    rows.append(f"| eNTK of timm / Hugging Face models and the default TransformerEncoderLayer (random init, "
                f"{len(um)} rows, interleaved rounds) | **{_x(tu[ulo])}–{_x(tu[uhi])}** the torch.func tutorial "
                f"({_x(tu[ulo])}: {ulo}; {_x(tu[uhi])}: {uhi}); {100 * min(shares):.1f}–{100 * max(shares):.0f} % of "
                f"parameters on layer rules | [timm / HF table]({bm}#timm-and-hugging-face-models-by-interleaved-rounds) "
                f"(users_models_cpu.json) |")

    nt = _load("nt_compare_cpu.json", results)
    lz = [x for row in nt["rows"] for x in row["results"] if _is_lazyfast_nt(x)]
    sp = [_nt_ratio(x, "sd")["median"] for x in lz]  # medians over rounds (one number in an earlier file)
    fast = [_nt_ratio(x, "fastest")["median"] for x in lz]
    rounds = ", interleaved rounds" if "rounds" in nt else ""
    rows.append(f"| against neural-tangents (JAX, jit) on MLPs, TwoLayer, a CNN{rounds} | **{_range(sp)}** its structured "
                f"derivatives, {_range(fast)} its fastest method; {sum(x['met'] for x in nt['targets'])} of "
                f"{len(nt['targets'])} targets met" + (
                    f"; ≥ 1.5× its fastest (issue 19): {sum(t['met'] for t in nt['targets19'])} of {len(nt['targets19'])}, "
                    f"{sum(bool(t['reachable']) for t in nt['targets19'])} reachable above the product floor"
                    if nt.get("targets19") else "")
                + f" | [neural-tangents table]({bm}#against-neural-tangents) (nt_compare_cpu.json) |")

    r = _load("engine_cpu.json", results)
    if "cg" in r:
        c = r["cg"]
        rows.append(f"| matrix-free kernel regression (CG on Θ + λI), n = {c['n']:,} | {c['iterations']} iterations, "
                    f"{_s(c['seconds'])}, **{c['peak_mb']:.0f} MB** peak (a dense Θ would need "
                    f"{c['dense_theta_gb']:.0f} GB) | [engine table]({bm}#linearized-training-and-matrix-free-regression) "
                    f"(engine_cpu.json) |")
    if "step" in r:
        s = r["step"]
        v = s["variants"]
        std, tf, lz = v["standard"]["min"], v["torch_func"]["min"], v["lazyfast"]["min"]
        rows.append(f"| `Linearized(TwoLayer)` training step, n = {s['n']}, m = {s['m']} | **{lz / std:.2f}×** the "
                    f"standard step, {_x(tf / lz)} faster than the torch.func.jvp linearization | "
                    f"[engine table]({bm}#linearized-training-and-matrix-free-regression) (engine_cpu.json) |")

    lm = _lin_models(results)["models"]
    ls = [m["ratios"]["lazyfast/standard"]["median"] for m in lm]
    tl = [m["ratios"]["torch_func/lazyfast"]["median"] for m in lm]
    rows.append(f"| `Linearized(model)` training step on {len(lm)} timm / Hugging Face models | **{_range(ls)}** a "
                f"standard step (target ≤ 1.4×: {sum(v <= 1.4 for v in ls)} of {len(lm)} met); torch.func jvp + vjp "
                f"takes {_range(tl)} its time (target ≥ 1.5×: {sum(v >= 1.5 for v in tl)} of {len(lm)} met) | "
                f"[linearized-models table]({bm}#linearized-training-on-the-models-users-bring) "
                f"(linearized_models_cpu.json) |")
    files = ("two_layer_cpu.json, mlp_cpu.json, models_cpu*.json, users_models_cpu.json, nt_compare_cpu.json, "
             "engine_cpu.json, linearized_models_cpu.json")
    return (f"*Generated by `python scripts/update_readme.py` from benchmarks/results/ ({files}) and docs/figures/*.json; "
            "float32 on the project's shared 2-core CPU; each linked table names the command, date, commit and load "
            "average of its run.*\n\n" + "\n".join(rows))


# ----------------------------------------------------------------------------- the reproduction blocks
def _claims():
    from lazyfast.experiments import claims

    return claims


def table_reproduction(results: pathlib.Path, figures: pathlib.Path) -> str:
    return _claims().table(figures)


def section_cnn_alpha(results: pathlib.Path, figures: pathlib.Path) -> str:
    return _claims().cnn_alpha_section(figures)


def section_cnn_sweep(results: pathlib.Path, figures: pathlib.Path) -> str:
    return _claims().cnn_sweep_section(figures)


def section_cnn_gpu_sizing(results: pathlib.Path, figures: pathlib.Path) -> str:
    return _claims().cnn_gpu_sizing_section(figures)


def _results_only(fn: Callable[[pathlib.Path], str]) -> Callable[[pathlib.Path, pathlib.Path], str]:
    return lambda results, figures: fn(results)


# Every generated block: name → its generator(results, figures). The performance tables read
# benchmarks/results/ only (each stamped with the file, the command and the run); the reproduction
# blocks read docs/figures/ only (lazyfast/experiments/claims.py); the README's summary reads both.
TABLES: Dict[str, Callable[[pathlib.Path], str]] = {
    "bench-quick": table_bench_quick,
    "two-layer": table_two_layer,
    "mlp": table_mlp,
    "engine": table_engine,
    "models": table_models,
    "nt": table_nt,
    "linearized-models": table_linearized_models,
    "users-models": table_users_models,
}
GENERATORS: Dict[str, Callable[[pathlib.Path, pathlib.Path], str]] = {
    **{name: _results_only(fn) for name, fn in TABLES.items()},
    "summary": table_summary,
    "reproduction": table_reproduction,
    "cnn-alpha": section_cnn_alpha,
    "cnn-sweep": section_cnn_sweep,
    "cnn-gpu-sizing": section_cnn_gpu_sizing,
}

# Which document holds which blocks (paths relative to the repository root); every block is in
# exactly one document.
DOCS: Dict[str, Tuple[str, ...]] = {
    "README.md": ("summary",),
    "docs/benchmarks.md": ("bench-quick", "two-layer", "mlp", "engine", "models", "users-models", "nt",
                           "linearized-models"),
    "docs/REPRODUCTION.md": ("reproduction", "cnn-alpha", "cnn-sweep", "cnn-gpu-sizing"),
}


def _markers(name: str) -> Tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def blocks(text: str, names=None, doc: str = "README.md") -> Dict[str, str]:
    """The current text of the generated blocks ``names`` (default: those DOCS gives ``doc``) in
    ``text`` (name → text between the markers). A document must hold each of its blocks exactly once,
    and no block of another document."""
    names = DOCS[doc] if names is None else names
    out = {}
    for name in names:
        start, end = _markers(name)
        if text.count(start) != 1 or text.count(end) != 1:
            raise ValueError(f"{doc} must contain exactly one {start} … {end} block")
        out[name] = text.split(start, 1)[1].split(end, 1)[0].strip("\n")
    own = set(DOCS.get(doc, ())) | set(names)
    for other in GENERATORS:
        if other not in own and any(m in text for m in _markers(other)):
            raise ValueError(f"{doc} holds a <!-- {other}:… --> marker, but that block belongs to another document "
                             f"(scripts/update_readme.py, DOCS)")
    return out


def render(text: str, names=None, results: pathlib.Path = RESULTS, figures: pathlib.Path = FIGURES,
           doc: str = "README.md") -> str:
    """``text`` (the document ``doc``) with its generated blocks rebuilt from ``results`` and ``figures``."""
    names = DOCS[doc] if names is None else names
    blocks(text, names, doc)  # validates the markers
    for name in names:
        start, end = _markers(name)
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{GENERATORS[name](results, figures)}\n{end}{tail}"
    return text


def check(root: pathlib.Path = ROOT, results: pathlib.Path = RESULTS, figures: pathlib.Path = FIGURES) -> list:
    """Names of the blocks whose text in the documents under ``root`` differs from what ``results``
    and ``figures`` give."""
    bad = []
    for doc, names in DOCS.items():
        text = (pathlib.Path(root) / doc).read_text()
        want, have = blocks(render(text, names, results, figures, doc), names, doc), blocks(text, names, doc)
        bad += [k for k in names if want[k] != have[k]]
    return bad


def write(root: pathlib.Path = ROOT, results: pathlib.Path = RESULTS, figures: pathlib.Path = FIGURES) -> None:
    for doc, names in DOCS.items():
        path = pathlib.Path(root) / doc
        path.write_text(render(path.read_text(), names, results, figures, doc))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a document and the results files disagree")
    ap.add_argument("--root", default=str(ROOT), help="the tree whose documents (DOCS) are read and written")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--figures", default=str(FIGURES))
    args = ap.parse_args(argv)
    root, results, figures = pathlib.Path(args.root), pathlib.Path(args.results), pathlib.Path(args.figures)
    if args.check:
        bad = check(root, results, figures)
        if bad:
            print(f"generated blocks out of date with benchmarks/results or docs/figures: {bad}; "
                  "run python scripts/update_readme.py")
            return 1
        print(f"every generated block of {', '.join(DOCS)} matches benchmarks/results and docs/figures")
        return 0
    write(root, results, figures)
    for doc, names in DOCS.items():
        print(f"{doc}: {', '.join(names)} regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
