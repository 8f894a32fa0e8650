"""One PNG figure per experiment, drawn from the experiment's result dict (matplotlib, Agg).

Each ``plot_<name>(result, path)`` writes ``path`` and returns it; :func:`plot` dispatches on
``result["experiment"]``. The figures follow the layout of the paper's figures where the
authors' plotting code says what it was.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _nan(v):
    """None (a diverged run, written as JSON null) → NaN, which matplotlib leaves out."""
    return float("nan") if v is None else v


def _scaled(values, scale):
    return [scale * _nan(v) for v in values]


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_cover(res: dict, path: str) -> str:
    runs = res["runs"]
    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(4.2 * (1 + len(runs)), 4))
    ax = axes[0]
    for r, c in zip(runs, ("C3", "C0", "C2", "C1")):
        it = [i + 1 for i in r["curve_iters"]]
        ax.semilogy(it, r["curve_train"], color=c, label=f"train, τ={r['tau']:g}")
        ax.semilogy(it, r["curve_test"], color=c, ls="--", label=f"test, τ={r['tau']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("iteration")
    ax.set_title("Convergence")
    ax.legend(fontsize=7)
    t = [i * 2 * math.pi / 200 for i in range(201)]
    for ax, r in zip(axes[1:], runs):
        ax.plot([math.cos(v) for v in t], [math.sin(v) for v in t], ":", color="k", lw=0.8)
        for (tx, ty), sgn in zip(res["teacher_directions"], res["teacher_signs"]):
            ax.arrow(0, 0, tx, ty, head_width=0.06, length_includes_head=True,
                     facecolor="C3" if sgn > 0 else "C0", edgecolor="k")
        bx = 1.1
        for path_j, sgn in zip(r["paths"], r["final_sign"]):
            xs = [p[0] for p in path_j]
            ys = [p[1] for p in path_j]
            c = "C3" if sgn > 0 else "C0"
            ax.plot(xs, ys, color=c, lw=1.0)
            ax.scatter([xs[-1]], [ys[-1]], s=20, color=c, zorder=3)
            bx = max(bx, 1.1 * max(max(abs(v) for v in xs), max(abs(v) for v in ys)))
        ax.set_xlim(-bx, bx)
        ax.set_ylim(-bx, bx)
        ax.set_aspect("equal")
        ax.axis("off")
        kind = "lazy" if r["relative_change"] < 0.1 else "non-lazy"
        ax.set_title(f"τ = {r['tau']:g} ({kind}): ‖Δw‖/‖w0‖ = {r['relative_change']:.3g}", fontsize=9)
    return _save(fig, path)


def plot_tau_sweep(res: dict, path: str) -> str:
    s = res["summary"]
    ss = 1000.0  # the authors' "for nicer yticks"
    taus = s["taus"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for mean, std, style, label in ((s["test_end_mean"], s["test_end_std"], "-", "end of training"),
                                    (s["test_best_mean"], s["test_best_std"], ":", "best throughout training")):
        ax.fill_between(taus, [ss * (m - d) for m, d in zip(mean, std)], [ss * (m + d) for m, d in zip(mean, std)],
                        color=(0.85, 0.85, 0.85))
        ax.plot(taus, [ss * m for m in mean], style, color="k", lw=2.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("τ")
    ax.set_ylabel("Test loss (×1000)")
    ax.set_title(f"m={res['config']['m']}, d={res['config']['d']}, n={res['config']['n_train']}, "
                 f"{s['ntrials_done']} trial(s)", fontsize=9)
    ax.legend()
    return _save(fig, path)


def plot_population_sgd(res: dict, path: str) -> str:
    s = res["summary"]
    taus = s["taus"]
    mean, std = s["normalized_mean"], s["normalized_std"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.fill_between(taus, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                    color=(0.85, 0.85, 0.85))
    ax.plot(taus, mean, "k", lw=2)
    ax.set_xscale("log")
    ax.set_xlabel("τ")
    ax.set_ylabel("Population loss at convergence (normalized)")
    ax.set_title(f"m={res['config']['m']}, d={res['config']['d']}, {res['config']['niter']} SGD steps, "
                 f"{s['ntrials_done']} trial(s)", fontsize=9)
    return _save(fig, path)


def plot_width_sweep(res: dict, path: str) -> str:
    s = res["summary"]
    ms = s["ms"]
    ss = res["config"].get("plot_scale", 1.0)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for key, color, label in (("ntk", "k", "scaling 1/√m"), ("mean_field", (0.5, 0.5, 0.5), "scaling 1/m")):
        for t in res["trials"]:
            ax.plot(ms, _scaled(t[key]["test_end"], ss), "o", color=color, ms=2)
        ax.plot(ms, _scaled(s[key]["test_end_mean"], ss), color=color, lw=2.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("m")
    ax.set_ylabel(f"Test loss (×{ss:g})")
    ax.legend()
    return _save(fig, path)


def plot_rates(res: dict, path: str) -> str:
    s = res["summary"]
    labels = {"weight_change": "sup‖w_α − w0‖", "output_gap": "sup‖αh(w_α) − αh̄(w̄_α)‖",
              "param_gap": "sup‖w_α − w̄_α‖"}
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for si, ser in enumerate(res["series"]):
        st = ser["setting"]
        for j, (key, marker) in enumerate(zip(labels, "os^")):
            ax.loglog(ser["alphas"], ser["curves"][key], marker + ("-", "--", ":")[min(si, 2)], color=f"C{j}",
                      ms=4, alpha=1.0 if si == 0 else 0.5,
                      label=f"{labels[key]} [{st['activation']}, {st['init']}]: slope {ser['slopes'][key]:.2f}")
    alphas = s["alphas"]
    for key, p in (("weight_change", -1), ("param_gap", -2)):
        ref = s[key][0]
        ax.loglog(alphas, [ref * (a / alphas[0]) ** p for a in alphas], ":", color="gray", lw=0.8)
    ax.set_xlabel("α")
    ax.set_title("Theorem 2.2 rates (dotted grey: slopes −1 and −2)", fontsize=9)
    ax.legend(fontsize=6)
    return _save(fig, path)


def plot_kernel_equivalence(res: dict, path: str) -> str:
    s = res["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4))
    ax = axes[0]
    t = s["times"][1:]  # log time axis: leave out t = 0
    ax.loglog(t, s["kernel_flow_test"][1:], "k-", lw=3, label="kernel GD (closed form)")
    ax.loglog(t, s["linearized_test"][1:], "C1--", lw=2, label="linearized GD")
    for a, curve in zip(s["alphas"], s["lazy_test"]):
        ax.loglog(t, curve[1:], lw=1, label=f"lazy GD, α={a:g}")
    ax.axhline(s["kernel_interpolation_test"], color="gray", ls=":", lw=1, label="kernel interpolation (t=∞)")
    ax.set_xlabel("time t = η·steps")
    ax.set_ylabel("test loss")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.loglog(s["alphas"], s["lazy_vs_kernel_gap"], "o-", label="sup_t RMS(αh(w_α) − kernel GD), test")
    ax.loglog(s["alphas"], [max(s["linearized_vs_kernel_gap"], 1e-300)] * len(s["alphas"]), "k:",
              label="linearized GD vs kernel GD")
    ax.set_xlabel("α")
    slope = s["gap_slope"]
    ax.set_title(f"slope of the lazy gap (α ≥ 10): {slope:.2f}" if slope is not None else "", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_cnn_alpha(res: dict, path: str) -> str:
    s = res["summary"]
    alphas = s["alphas"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    fig.subplots_adjust(wspace=0.32)
    ax = axes[0]
    ax.semilogx(alphas, s["test_acc"], "ko-", label="network")
    ax.semilogx(alphas, s["frozen_pattern_acc"], "C0s--", label="frozen-pattern surrogate")
    if any(v is not None for v in s.get("linearized_acc", [])):
        xs = [a for a, v in zip(alphas, s["linearized_acc"]) if v is not None]
        ax.semilogx(xs, [v for v in s["linearized_acc"] if v is not None], "C1^:", label="linearized model")
    ax.set_xlabel("α")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax = axes[1]
    layers = list(s["stability"][0].keys()) if s["stability"] else []
    for j, name in enumerate(layers):
        ax.semilogx(alphas, [st[name] for st in s["stability"]], "o-", ms=3, color=plt.cm.viridis(j / max(1, len(layers) - 1)),
                    label=name)
    ax.set_xlabel("α")
    ax.set_ylabel("stability of activations (%)")
    ax.legend(fontsize=5, ncol=2)
    ax = axes[2]
    for a, curve in zip(alphas, s["train_loss_curves"]):
        ax.semilogy(range(1, len(curve) + 1), [_nan(v) for v in curve], label=f"α={a:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss MSE(αh, onehot)")
    ax.legend(fontsize=6)
    fig.suptitle(f"VGG-11 on {res['summary']['dataset']}", fontsize=10)
    return _save(fig, path)


def plot_kernel_spectrum(res: dict, path: str) -> str:
    s = res["summary"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, label in (("eigenvalues_images", s.get("dataset", "images")), ("eigenvalues_random", "random images")):
        ev = s[key]
        ax.loglog(range(1, len(ev) + 1), [e / ev[0] for e in ev], label=label)
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue / largest")
    ax.set_title(f"eNTK of centred VGG-11 at init, N={s['n']}", fontsize=9)
    ax.legend()
    return _save(fig, path)


def plot_cnn_sweep(res: dict, path: str) -> str:
    """The paper's CNN figure, one row per architecture: test accuracy vs α (mean ± std over seeds, at
    the η0 selected on validation) for the network, the frozen-pattern surrogate and the linearized
    model; stability of activations vs α per layer; training curves MSE(αh, onehot) per epoch."""
    s = res["summary"]
    archs = list(s["archs"])
    fig, axes = plt.subplots(len(archs), 3, figsize=(14, 4.2 * len(archs)), squeeze=False)
    fig.subplots_adjust(wspace=0.3, hspace=0.4)
    for row, arch in zip(axes, archs):
        a = s["archs"][arch]
        st = a["settings"]
        rows = a["per_alpha"]
        alphas = [r["alpha"] for r in rows]
        ax = row[0]
        for key, fmt, label in (("test_acc", "ko-", "network"), ("frozen_pattern_acc", "C0s--",
                                                                 "frozen-pattern surrogate")):
            ys = [_nan(r[key]) for r in rows]
            es = [_nan(r[key + "_std"]) for r in rows]
            ax.errorbar(alphas, ys, yerr=es, fmt=fmt, ms=4, capsize=3, label=label)
        lin = a["linearized"]
        if lin and lin.get("test_acc") is not None:
            m, d = lin["test_acc"], lin["test_acc_std"] or 0.0
            ax.axhspan(m - d, m + d, color="C1", alpha=0.2)
            ax.axhline(m, color="C1", ls=":", label=f"linearized model (η0={lin['best_lr']:g})")
        ax.set_xscale("log")
        ax.set_xlabel("α")
        ax.set_ylabel("test accuracy (%)")
        v = res.get("verdict", {}).get("archs", {}).get(arch, {})
        holds = v.get("holds")
        ax.set_title(f"{arch} ÷{st['divisor']}, {st.get('subset') or res['n_train']} train images, {st['epochs']} "
                     f"epochs, {len(res['config']['seeds'])} seeds: "
                     f"claim {'holds' if holds else 'does not hold'}", fontsize=9)
        ax.legend(fontsize=7)
        ax = row[1]
        stab = [r["stability"] for r in rows]
        names = list(next((x for x in stab if x), {}) or {})
        for j, name in enumerate(names):
            ax.semilogx(alphas, [_nan(x[name]) if x else float("nan") for x in stab], "o-", ms=3,
                        color=plt.cm.viridis(j / max(1, len(names) - 1)), label=name)
        ax.axhline(res["config"]["stability_min"], color="gray", ls=":", lw=0.8)
        ax.set_xlabel("α")
        ax.set_ylabel("stability of activations (%)")
        ax.legend(fontsize=5, ncol=2)
        ax = row[2]
        for j, r in enumerate(rows):
            c = r["train_mse_curve"]
            if c:
                ax.semilogy(range(1, len(c) + 1), [_nan(v) for v in c], color=plt.cm.plasma(j / max(1, len(rows))),
                            label=f"α={r['alpha']:g}")
        if lin and lin.get("train_mse_curve"):
            c = lin["train_mse_curve"]
            ax.semilogy(range(1, len(c) + 1), [_nan(v) for v in c], "k:", label="linearized")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss MSE(αh, onehot)")
        ax.legend(fontsize=6)
    fig.suptitle(f"{res['dataset']}: {res['n_train']} train / {res['n_val']} validation / {res['n_test']} test "
                 f"({res.get('preset', '?')} preset)", fontsize=10)
    return _save(fig, path)


PLOTTERS = {
    "cover": plot_cover,
    "tau-sweep": plot_tau_sweep,
    "population-sgd": plot_population_sgd,
    "width-sweep": plot_width_sweep,
    "rates": plot_rates,
    "kernel-equivalence": plot_kernel_equivalence,
    "cnn-alpha": plot_cnn_alpha,
    "cnn-sweep": plot_cnn_sweep,
    "kernel-spectrum": plot_kernel_spectrum,
}


def plot(result: dict, out_dir: str) -> List[str]:
    """Writes the figure of ``result`` into ``out_dir`` as ``<experiment>.png``; returns the paths."""
    name = result["experiment"]
    if name == "demo":
        return [p for sub in result["parts"].values() for p in plot(sub, out_dir)]
    return [PLOTTERS[name](result, os.path.join(out_dir, f"{name}.png"))]
