"""The CNN sweep's text, generated from a result dict, never typed: the summary-table rows, the per-α
tables, the markdown of docs/REPRODUCTION.md, the console summary and the `gpu` preset's sizing table."""
from __future__ import annotations

from typing import List

from lazyfast.experiments.cnn_sweep.config import NAME


def _f(v, fmt="{:.1f}"):
    return "–" if v is None else fmt.format(v)


def table_rows(result: dict) -> List[str]:
    """Markdown rows (one per architecture) for the summary tables of README / REPRODUCTION, from a
    result dict (results.json) — never typed by hand."""
    rows = []
    n = result.get("n_test")
    for arch, v in result["verdict"]["archs"].items():
        st = result["summary"]["archs"][arch]["settings"]
        if "best_alpha" not in v:
            rows.append(f"| `{NAME}` {arch} | {result.get('preset', '?')} | – | {v.get('reason', '')} | no |")
            continue
        rows.append(
            f"| `{NAME}` {arch} (÷{st['divisor']} widths, {st['epochs']} epochs, {result['dataset']} "
            f"{st.get('subset') or result['n_train']} train / {n} test, {len(result['config']['seeds'])} seeds) "
            f"| {result.get('preset', '?')} "
            f"| best non-lazy > large-α plateau by > {result['config']['margin_points']:g} pt and > "
            f"{result['config']['margin_stds']:g}σ; no rise beyond best α; linearized = network at large α; "
            f"stability ≥ {result['config']['stability_min']:g} % "
            f"| α = {v['best_alpha']:g}: {_f(v['best_test_acc'])} ± {_f(v['best_test_acc_std'], '{:.2f}')} % test "
            f"({_f(v['best_train_acc'])} % train) vs plateau {_f(v['plateau_test_acc'])} ± "
            f"{_f(v['plateau_std'], '{:.2f}')} % (gap {_f(v['gap_points'])} pt = "
            f"{_f(v['gap_in_sigmas'])}σ); linearized {_f(v['linearized_test_acc'])} vs network "
            f"{_f(v['network_at_alpha_max'])} % at α = {v['alpha_max']:g}; surrogate "
            f"{_f(v['surrogate_at_alpha_max'])} %; stability ≥ {_f(v['stability_min_at_alpha_max'], '{:.2f}')} % "
            f"| {'yes' if v['holds'] else 'no'} |")
    return rows


def per_alpha_table(result: dict, arch: str) -> List[str]:
    """Markdown table of the per-α results of one architecture."""
    s = result["summary"]["archs"][arch]
    rows = s["per_alpha"]
    head = "| α | " + " | ".join(f"{r['alpha']:g}" for r in rows) + " | linearized |"
    lin = s["linearized"] or {}
    lines = [head, "|---" * (len(rows) + 2) + "|"]

    def line(label, key, fmt="{:.1f}", std=True, lin_key=None):
        cells = []
        for r in rows:
            v = r.get(key)
            c = _f(v, fmt)
            if std and v is not None and r.get(key + "_std") is not None:
                c += " ± " + _f(r[key + "_std"], "{:.1f}")
            cells.append(c)
        lv = lin.get(lin_key) if lin_key else None
        lc = _f(lv, fmt) + (" ± " + _f(lin.get(lin_key + "_std"), "{:.1f}") if lv is not None and std else "") \
            if lin_key else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {lc} |")

    line("test accuracy (%)", "test_acc", lin_key="test_acc")
    line("validation accuracy (%)", "val_acc", lin_key="val_acc")
    line("train accuracy (%)", "train_acc", lin_key="train_acc")
    line("frozen-pattern surrogate (%)", "frozen_pattern_acc")
    line("stability, worst layer (%)", "stability_min", "{:.2f}", std=False)
    line("‖w − w0‖/‖w0‖", "relative_change", "{:.2g}", std=False)
    lines.append("| η0 selected on validation | " + " | ".join(_f(r["best_lr"], "{:g}") for r in rows)
                 + f" | {_f(lin.get('best_lr'), '{:g}')} |")
    return lines


def gpu_sizing_table(res: dict) -> str:
    """The markdown of the `gpu` preset's size and time (docs/REPRODUCTION.md), from the JSON written by
    ``scripts/size_cnn_gpu.py``."""
    lines = [f"`gpu` preset on one GPU ({res['rates_kind']} rates: "
             + ", ".join(f"{k} {v['float32']:.1f} / {v['float64']:.1f} TFLOP/s in float32 / float64"
                         for k, v in res["rates"].items())
             + f"; FLOPs counted by {res['counter']}; commit {res['machine']['commit']}):", "",
             "| network | parameters | runs | epochs | steps / run | step FLOPs (batch 128) | GPU hours |",
             "|---|---|---|---|---|---|---|"]
    for arch, v in res["size"]["archs"].items():
        lines.append(f"| {arch} | {v['parameters']:,} | {v['runs']} | {v['epochs']} | {v['steps_per_run']} | "
                     f"{res['flops'][arch]['step_flops'] / 1e9:.0f} G | {v['gpu_hours']:.1f} |")
    lines.append(f"| **all** | | | | | | **{res['size']['total_gpu_hours']:.1f}** |")
    return "\n".join(lines)


def report_markdown(result: dict) -> str:
    """The markdown that docs/REPRODUCTION.md shows for a finished sweep, generated from results.json:
    the summary-table rows, one per-α table per architecture and the verdict."""
    lines = ["Summary rows (README / REPRODUCTION summary table):", ""] + table_rows(result) + [""]
    m = result.get("machine", {})
    secs = [r.get("seconds") for r in result.get("runs", []) if isinstance(r, dict) and r.get("seconds") is not None]
    lines.append(f"Run: `{result.get('preset')}` preset, {len(secs)} runs, {sum(secs) / 3600:.2f} h of compute in all "
                 f"(each run's own time, one torch thread each; {result.get('wall_seconds', 0):.0f} s wall for the "
                 f"process that collected them) on "
                 f"{m.get('host', '?')} ({m.get('cpus', '?')} cores, {m.get('threads', '?')} thread(s) per process, "
                 f"load average at the end {(m.get('loadavg_at_end') or ['?'])[0]}), {m.get('date_utc', '?')} UTC; "
                 f"{result['dataset']}, {result['n_train']} train / {result['n_val']} validation / "
                 f"{result['n_test']} test images.")
    for arch in result["summary"]["archs"]:
        v = result["verdict"]["archs"][arch]
        lines += ["", f"**{arch}** (mean ± std over seeds; η0 selected on validation):", ""]
        lines += per_alpha_table(result, arch)
        checks = ("c1_gap", "c2_no_increase_beyond_best", "c3_linearized_matches", "c4_stability")
        lines += ["", f"Criterion: " + ", ".join(f"{c} = {v.get(c)}" for c in checks)
                  + f" → the claim {'holds' if v.get('holds') else 'does not hold'} for {arch}; the three lazy "
                    f"limits agree: {v.get('lazy_limit_three_agree')}."]
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    lines = [f"== {NAME} ({result.get('preset', '?')} preset, {result.get('wall_seconds', float('nan')):.0f} s): "
             f"{result['dataset']}, {result['n_train']} train / {result['n_val']} val / {result['n_test']} test =="]
    if "verdict" not in result:
        return lines[0] + f"\n  shard {result.get('shard')}: {len(result['runs'])} runs"
    for arch in result["summary"]["archs"]:
        lines.append(f"-- {arch}")
        lines += ["  " + ln for ln in per_alpha_table(result, arch)]
        v = result["verdict"]["archs"][arch]
        lines.append(f"  claim holds: {v.get('holds')}  " + ", ".join(
            f"{k}={v.get(k)}" for k in ("c1_gap", "c2_no_increase_beyond_best", "c3_linearized_matches",
                                        "c4_stability", "lazy_limit_three_agree")))
    return "\n".join(lines)
