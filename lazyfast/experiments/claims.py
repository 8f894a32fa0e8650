"""The reproduction summary table (docs/REPRODUCTION.md; its verdicts row in the README summary), computed from the committed
results files in docs/figures/ — never typed.

Each experiment has one row: the preset that was run, the paper's claim as a reproduction must
show it (fixed here, with its numeric criterion), the measured values, and whether the criterion
holds, computed from the experiment's ``results.json`` (copied to ``docs/figures/NAME.json`` by
the run that produced the figure). ``scripts/update_readme.py`` writes the table between the
``<!-- reproduction:start/end -->`` markers; its ``--check`` (run by tests/test_readme_tables.py)
fails when a table and the files disagree.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Callable, Dict, List, Optional, Tuple

from lazyfast.experiments import cnn_sweep

FIGURES = pathlib.Path(__file__).resolve().parents[2] / "docs" / "figures"

HEADER = ["| experiment | preset run here | claim of the paper (from the paper and its code: docs/REPRODUCTION.md) "
          "| our result | holds |", "|---|---|---|---|---|"]

Row = Tuple[str, str, str, str]  # preset, claim, result, holds


def _yes(b: bool) -> str:
    return "yes" if b else "**no**"


def _g(v: float, digits: int = 2) -> str:
    """A number with ``digits`` significant digits, exponents as ×10ⁿ-free e-notation with a real minus."""
    s = f"{v:.{digits}g}"
    if "e" in s:
        m, e = s.split("e")
        s = f"{m}e{int(e)}"
    return s.replace("-", "−")


def _m(v: float, fmt: str) -> str:
    return fmt.format(v).replace("-", "−")


def _preset(d: dict, extra: str = "") -> str:
    return d.get("preset", "?") + (f", {extra}" if extra else "")


def cover(d: dict) -> Row:
    s = d["summary"]
    small = [(float(k.split("=")[1]), v) for k, v in s.items() if float(k.split("=")[1]) <= 0.1 + 1e-12]
    large = [(float(k.split("=")[1]), v) for k, v in s.items() if float(k.split("=")[1]) >= 1.0]
    (t0, a), (t1, b) = small[0], large[0]
    holds = a["relative_change"] > 0.5 and a["teacher_alignment"] > 0.9 and b["relative_change"] < 0.1
    steps = d["config"]["niter"]
    return (_preset(d, f"10^{round(math.log10(steps))} steps" if steps >= 1000 else f"{steps} steps"),
            f"τ = {t0:g} neurons move O(1) onto the teacher (‖Δw‖/‖w0‖ > 0.5, alignment > 0.9); "
            f"τ = {t1:g} moves < 10 %",
            f"‖Δw‖/‖w0‖ = {a['relative_change']:.2f} (alignment {a['teacher_alignment']:.2f}) vs "
            f"{b['relative_change']:.3f}", _yes(holds))


def tau_sweep(d: dict) -> Row:
    s = d["summary"]
    end, best, ratio = s["spearman_end_tau_ge_0.1"], s["spearman_best_tau_ge_0.1"], s["lazy_plateau_over_small_tau"]
    return (_preset(d, f"{s['ntrials_done']} trials"),
            "test loss grows with τ (Spearman ≥ 0.8 over τ ≥ 0.1), lazy plateau ≥ 3× small-τ level",
            f"Spearman {end:.2f} (end) / {best:.2f} (best); plateau {ratio:.0f}× the small-τ level",
            _yes(end >= 0.8 and ratio >= 3))


def population_sgd(d: dict) -> Row:
    s = d["summary"]
    taus, nm = s["taus"], s["normalized_mean"]
    lo, hi = s["max_normalized_tau_le_0.1"], s["min_normalized_tau_ge_1"]
    inside = [(t, v) for t, v in zip(taus, nm) if 0.1 < t < 0.5]
    cross = next((t for t, v in zip(taus, nm) if v >= 0.5), None)
    trans = (f"{_g(inside[0][1])} at τ = {inside[0][0]:.3g} → {_g(inside[-1][1])} at τ = {inside[-1][0]:.2f}"
             if inside else "no τ in (0.1, 0.5)")
    holds = lo <= 0.01 and hi >= 0.9 and cross is not None and 0.1 < cross < 0.5
    return (_preset(d, f"{s['ntrials_done']} trials"),
            "normalized loss ≤ 0.01 for τ ≤ 0.1, ≥ 0.9 for τ ≥ 1, transition (crossing 0.5) in (0.1, 0.5)",
            f"{_g(lo)} max for τ ≤ 0.1; {hi:.3g} min for τ ≥ 1; {trans}", _yes(holds))


def width_sweep(d: dict) -> Row:
    s = d["summary"]
    ms, ntk, mf = s["ms"], s["ntk"], s["mean_field"]

    def at(series, m):
        return series["test_end_mean"][ms.index(m)]

    m_lo = 32 if 32 in ms else ms[len(ms) // 2]
    mf8 = [v for m, v in zip(ms, mf["test_end_mean"]) if m >= 8 and v is not None]
    holds = bool(s["ntk_above_mean_field_for_m_ge_16"]) and abs(ntk["kappa_slope"] + 0.5) <= 0.15 \
        and abs(mf["kappa_slope"]) <= 0.2
    tag = "yes (quick size only)" if d.get("preset") == "quick" and holds else _yes(holds)
    return (_preset(d, f"{s['ntrials_done']} trials"),
            "1/√m: test loss stays up as m grows, above 1/m for m ≥ 16; 1/m near 0; κ ~ m^−½ (slope −0.5 ± 0.15) "
            "vs flat (abs. slope ≤ 0.2)",
            f"1/√m test loss {at(ntk, m_lo):.1f} → {at(ntk, ms[-1]):.1f} from m = {m_lo} to {ms[-1]}, 1/m at most "
            f"{max(mf8):.2f} for m ≥ 8; 1/√m above 1/m for every m ≥ 16: "
            f"{'yes' if s['ntk_above_mean_field_for_m_ge_16'] else 'no'}; κ slope {_m(ntk['kappa_slope'], '{:.2f}')} "
            f"vs {_m(mf['kappa_slope'], '{:.2f}')}", tag)


def rates(d: dict) -> Row:
    s = d["summary"]
    keys = ("weight_change", "output_gap", "param_gap")
    exp = ", ".join(f"{_m(s['expected'][k], '{:g}')} ± {s['tolerance'][k]:g}" for k in keys)
    got = ", ".join(_m(s["slopes"][k], "{:.3f}") for k in keys)
    holds = all(s["within_tolerance"][k] for k in keys)
    res = f"{got} ({s['setting']['activation']}, {s['setting']['init']})"
    u = s.get("uncentered_slopes")
    if u:
        fails = u["weight_change"] > -0.5
        holds = holds and fails
        res += (f"; uncentred control: weight change {_m(u['weight_change'], '{:.2f}')}, output gap "
                f"{_m(u['output_gap'], '{:+.1f}')} ({'fails, as it must' if fails else 'does not fail'})")
    return (_preset(d), f"slopes of weight change, output gap, parameter gap vs α: {exp}", res, _yes(holds))


def kernel_equivalence(d: dict) -> Row:
    s = d["summary"]
    al, gaps = s["alphas"], s["lazy_vs_kernel_gap"]
    lin = s["linearized_vs_kernel_gap"]
    holds = lin < 1e-10 and all(b < a for a, b in zip(gaps, gaps[1:])) and s["gap_slope"] < -1.5
    return (_preset(d), "linearized GD = kernel GD (round-off, < 1e−10); lazy → kernel as α grows (gap falls, "
                        "slope < −1.5)",
            f"linearized vs kernel GD: {_g(lin)}; lazy gap {_g(gaps[0])} → {_g(gaps[-1])} for α = {al[0]:g} → "
            f"{al[-1]:g} (slope {_m(s['gap_slope'], '{:.1f}')})", _yes(holds))


def cnn_alpha(d: dict) -> Row:
    s, c = d["summary"], d["config"]
    al, acc, fp, stab = s["alphas"], s["test_acc"], s["frozen_pattern_acc"], s["stability"]
    non = [(a, v) for a, v in zip(al, acc) if a <= 1 and v is not None]
    lazy = [v for a, v in zip(al, acc) if a >= 10 and v is not None]
    sur = [abs(f - v) for a, v, f in zip(al, acc, fp) if a >= 10 and v is not None and f is not None]
    mean_stab = [sum(x.values()) / len(x) for x in stab]
    best_a, best = max(non, key=lambda t: t[1])
    drop = best - max(lazy)
    order = drop > 0 and mean_stab[-1] >= 99
    data = s.get("dataset", c.get("data"))
    return (_preset(d, "CPU-sized substitute" if d.get("preset") == "quick" else ""),
            "accuracy falls with α; stability → 100 %; surrogate = network at large α",
            f"{d.get('preset')} ({data}, VGG-11 ÷{c['channel_divisor']} channels, {c['epochs']} epochs, "
            f"{c['n_train']} train images, 1 seed): {best:.1f} % at α = {best_a:g} vs {min(lazy):.1f}–{max(lazy):.1f} % "
            f"for α ≥ 10; surrogate = network within {max(sur):.1f} pt for α ≥ 10; stability {mean_stab[0]:.0f} % → "
            f"{mean_stab[-1]:.0f} %",
            f"ordering {'yes' if order else 'no'}; drop {drop:.1f} pt (paper: ≈ 30 pt on CIFAR-10, not at this scale)")


def kernel_spectrum(d: dict) -> Row:
    s = d["summary"]
    n = len(s["eigenvalues_images"])
    ti, tr = s["stats_images"]["top10_fraction"], s["stats_random"]["top10_fraction"]
    return (_preset(d, "CPU-sized substitute" if d.get("preset") == "quick" else ""),
            "K symmetric PSD, 10N×10N; spectrum of images vs random images",
            f"{n}×{n}, symmetry error {_g(s['symmetry_error_images'])}, λ_min/λ_max = "
            f"{_g(s['min_over_max_eig_images'])}; top-10 eigenvalues hold {100 * ti:.0f} % of the trace for images vs "
            f"{100 * tr:.0f} % for random images", "n/a (no claim recovered)")


def demo(d: dict) -> Row:
    ch = d["checks"]
    ok = sum(bool(c["holds"]) for c in ch)
    return (_preset(d), "cover + tau-sweep + rates claims (quick presets)", f"{ok}/{len(ch)} checks",
            _yes(ok == len(ch)))


def cnn_sweep_rows(d: dict) -> List[str]:
    return cnn_sweep.table_rows(d)


ROWS: Dict[str, Callable[[dict], Row]] = {
    "cover": cover, "tau-sweep": tau_sweep, "population-sgd": population_sgd, "width-sweep": width_sweep,
    "rates": rates, "kernel-equivalence": kernel_equivalence, "cnn-alpha": cnn_alpha,
    "cnn-sweep": None, "kernel-spectrum": kernel_spectrum, "demo": demo,
}

CNN_SWEEP_FILES = ("cnn-sweep.json", "cnn-sweep-vgg.json", "cnn-sweep-resnet.json")


def table(figures: Optional[pathlib.Path] = None) -> str:
    """The summary table, one row per experiment (cnn-sweep: one per architecture run)."""
    figures = pathlib.Path(figures or FIGURES)
    lines = list(HEADER)
    for name, fn in ROWS.items():
        if name == "cnn-sweep":
            # the whole `cpu` preset when it is there, else its per-architecture halves
            found = [f for f in CNN_SWEEP_FILES if (figures / f).exists()]
            if CNN_SWEEP_FILES[0] in found:
                found = found[:1]
            for f in found:
                lines += cnn_sweep_rows(json.loads((figures / f).read_text()))
            if found and CNN_SWEEP_FILES[0] not in found:
                for f, arch in ((CNN_SWEEP_FILES[1], "vgg11"), (CNN_SWEEP_FILES[2], "resnet18")):
                    if f not in found:
                        lines.append(f"| `{name}` {arch} | `cpu` preset, not finished | deep CNNs degrade in the lazy "
                                     "regime (criterion fixed in `lazyfast/experiments/cnn_sweep/summary.py`) | – (its "
                                     "finished runs are in docs/figures/cnn-sweep-runs/: docs/REPRODUCTION.md) | not "
                                     "yet known |")
            if not found:
                lines.append(f"| `{name}` | not yet run | deep CNNs degrade in the lazy regime (criterion fixed in "
                             "`lazyfast/experiments/cnn_sweep/summary.py`) | – | not yet known |")
            continue
        path = figures / f"{name}.json"
        if not path.exists():
            lines.append(f"| `{name}` | not yet run | – | – | not yet known |")
            continue
        preset, claim, result, holds = fn(json.loads(path.read_text()))
        lines.append(f"| `{name}` | {preset} | {claim} | {result} | {holds} |")
    src = ", ".join(sorted(p.name for p in figures.glob("*.json") if p.stem in ROWS or p.name in CNN_SWEEP_FILES))
    lines += ["", f"*Generated by `python scripts/update_readme.py` from docs/figures/ ({src}); the criteria are "
                  "in `lazyfast/experiments/claims.py`.*"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- docs/REPRODUCTION.md sections
def _sup(a: float) -> str:
    if a >= 1000 and math.log10(a).is_integer():
        return "10" + str(int(math.log10(a))).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"{a:g}"


def cnn_alpha_section(figures: Optional[pathlib.Path] = None) -> str:
    """The setup line and per-α table of the committed cnn-alpha run (docs/figures/cnn-alpha.json)."""
    figures = pathlib.Path(figures or FIGURES)
    d = json.loads((figures / "cnn-alpha.json").read_text())
    s, c = d["summary"], d["config"]
    al = s["alphas"]
    best = max(range(len(al)), key=lambda i: -1 if s["test_acc"][i] is None else s["test_acc"][i])
    mean_stab = [sum(x.values()) / len(x) for x in s["stability"]]
    worst = [min(x.values()) for x in s["stability"]]

    def row(label, vals, fmt, bold=None):
        cells = []
        for i, v in enumerate(vals):
            t = "–" if v is None else fmt(v)
            cells.append(f"**{t}**" if i == bold else t)
        return f"| {label} | " + " | ".join(cells) + " |"

    runs = d.get("runs", [])
    secs = [r.get("seconds") for r in runs if isinstance(r, dict) and r.get("seconds") is not None]
    lines = [f"Run here: the `{d.get('preset')}` preset ({s.get('dataset')}, {c['n_train']} training and {c['n_test']} "
             f"test images, VGG-11 with every width ÷ {c['channel_divisor']}, Xavier gain {c['gain']:.3g}, "
             f"{c['epochs']} epochs, batch {c['batch_size']}, augmentation {'on' if c['augment'] else 'off'}, "
             f"{c['dtype']}, one seed ({c['seed']}); η0 ∈ {{{', '.join(f'{v:g}' for v in c['lrs'])}}}, the best per α; "
             f"{d.get('wall_seconds', 0) / 60:.1f} min wall"
             + (f", runs of {min(secs):.0f}–{max(secs):.0f} s" if secs else "") + "):", "",
             "| α | " + " | ".join(_sup(a) for a in al) + " |", "|---" * (len(al) + 1) + "|",
             row("test accuracy (%)", s["test_acc"], lambda v: f"{v:.1f}", best),
             row("frozen-pattern surrogate (%)", s["frozen_pattern_acc"], lambda v: f"{v:.1f}"),
             row("true linearized model (%)", s["linearized_acc"], lambda v: f"{v:.1f}"),
             row("stability, mean over layers (%)", mean_stab, lambda v: f"{v:.2f}" if v > 99.9 else f"{v:.1f}"),
             row("stability, worst layer (%)", worst, lambda v: f"{v:.2f}" if v > 99.9 else f"{v:.1f}"),
             row("‖w − w0‖/‖w0‖", s["relative_change"], lambda v: _g(v)),
             row("η0 selected", s["best_lr"], lambda v: f"{v:g}"), "",
             "*Generated by `python scripts/update_readme.py` from docs/figures/cnn-alpha.json.*"]
    return "\n".join(lines)


def cnn_sweep_section(figures: Optional[pathlib.Path] = None) -> str:
    """The results of the committed cnn-sweep runs (docs/figures/cnn-sweep*.json), or what is missing."""

    figures = pathlib.Path(figures or FIGURES)
    found = [f for f in CNN_SWEEP_FILES if (figures / f).exists()]
    if CNN_SWEEP_FILES[0] in found:
        found = found[:1]
    if not found:
        return ("**Status: the `cpu` sweep has not been run yet.** There are no results of it in this repository; "
                "the 2-epoch miniature that the tests run (`tests/test_cnn_cpu.py`) checks the pipeline, the "
                "resumption after a kill and the verdict code, and its numbers mean nothing.")
    out = []
    for f in found:
        d = json.loads((figures / f).read_text())
        stem = f[:-len(".json")]
        out += [f"**`{d.get('preset')}` preset** (`docs/figures/{f}`, figure `docs/figures/{stem}.png`):", "",
                f"![{stem}](figures/{stem}.png)", "", cnn_sweep.report_markdown(d), ""]
    out.append("*Generated by `python scripts/update_readme.py` from " + ", ".join(f"docs/figures/{f}" for f in found)
               + " (`cnn_sweep.report_markdown`; the verdict is `cnn_sweep.verdict`).*")
    return "\n".join(out)


def cnn_gpu_sizing_section(figures: Optional[pathlib.Path] = None) -> str:
    """docs/REPRODUCTION.md's size and time of the cnn-sweep `gpu` preset, from
    docs/figures/cnn-gpu-sizing.json (``python scripts/size_cnn_gpu.py``)."""

    figures = pathlib.Path(figures or FIGURES)
    path = figures / "cnn-gpu-sizing.json"
    if not path.exists():
        return "*Not sized yet: run `python scripts/size_cnn_gpu.py`.*"
    return (cnn_sweep.gpu_sizing_table(json.loads(path.read_text()))
            + "\n\n*Generated by `python scripts/update_readme.py` from docs/figures/cnn-gpu-sizing.json.*")
