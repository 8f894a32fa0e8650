"""The CNN sweep's summary and criterion: the η0 selected on validation, mean ± std over seeds per
(architecture, α), and :func:`verdict`, the criterion :data:`CRITERION` fixed before the run."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from lazyfast.experiments.cnn_sweep.config import Config


def _mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    if not ok:
        return None, None, 0
    m = sum(ok) / len(ok)
    s = math.sqrt(sum((v - m) ** 2 for v in ok) / (len(ok) - 1)) if len(ok) > 1 else 0.0
    return m, s, len(ok)


def _select(cands: Dict[float, List[dict]]) -> Optional[float]:
    """The η0 whose runs have the best mean final validation accuracy (runs that diverged count as
    not finished; an η0 with any diverged seed loses to one with none)."""
    best, best_key = None, None
    for lr, rs in cands.items():
        m, _, cnt = _mean_std([r["final_val_acc"] for r in rs])
        if m is None:
            continue
        key = (cnt, m)
        if best_key is None or key > best_key:
            best, best_key = lr, key
    return best


def summarize(cfg: Config, runs: List[dict], n_test: int) -> dict:
    """Per architecture and α: the η0 selected on validation, and mean ± std over seeds of the test,
    validation and train accuracies, the surrogate's accuracy and the stability; the linearized model
    likewise (η0 selected on validation); and mean training curves."""
    out = {"alphas": list(cfg.alphas), "n_test": int(n_test), "archs": {}}
    for a in cfg.arch_settings():
        mine = [r for r in runs if r["arch"] == a["arch"]]
        per_alpha = []
        for alpha in a["alphas"]:
            cands = {lr: [r for r in mine if r["kind"] == "network" and r["alpha"] == alpha and r["lr"] == lr]
                     for lr in a["lrs"]}
            lr = _select(cands)
            rs = cands[lr] if lr is not None else []
            row = {"alpha": alpha, "best_lr": lr, "n_seeds": len([r for r in rs if not r["diverged"]]),
                   "diverged_lrs": [l for l, c in cands.items() if any(r["diverged"] for r in c)]}
            for key in ("final_test_acc", "final_val_acc", "final_train_acc", "frozen_pattern_acc",
                        "relative_change"):
                m, s, _ = _mean_std([r[key] for r in rs])
                row[key.replace("final_", "")] = m
                row[key.replace("final_", "") + "_std"] = s
            stab = [r["stability"] for r in rs if r["stability"]]
            if stab:
                names = list(stab[0])
                row["stability"] = {nm: _mean_std([st[nm] for st in stab])[0] for nm in names}
                row["stability_mean"] = sum(row["stability"].values()) / len(names)
                row["stability_min"] = min(row["stability"].values())
            else:
                row["stability"], row["stability_mean"], row["stability_min"] = None, None, None
            curves = [r["train_mse"] for r in rs if not r["diverged"]]
            row["train_mse_curve"] = ([_mean_std([c[e] for c in curves])[0] for e in range(len(curves[0]))]
                                      if curves else None)
            per_alpha.append(row)
        lin = None
        lin_runs = [r for r in mine if r["kind"] == "linearized"]
        if lin_runs:
            cands = {lr: [r for r in lin_runs if r["lr"] == lr] for lr in a["lrs"]}
            lr = _select(cands)
            rs = cands[lr] if lr is not None else []
            lin = {"best_lr": lr, "n_seeds": len([r for r in rs if not r["diverged"]])}
            for key in ("final_test_acc", "final_val_acc", "final_train_acc"):
                m, s, _ = _mean_std([r[key] for r in rs])
                lin[key.replace("final_", "")] = m
                lin[key.replace("final_", "") + "_std"] = s
            curves = [r["train_mse"] for r in rs if not r["diverged"]]
            lin["train_mse_curve"] = ([_mean_std([c[e] for c in curves])[0] for e in range(len(curves[0]))]
                                      if curves else None)
        out["archs"][a["arch"]] = {"settings": a, "per_alpha": per_alpha, "linearized": lin,
                                   "seconds": sum(r["seconds"] for r in mine)}
    return out


CRITERION = (
    "Fixed before the run. Per architecture, with per-α test accuracy = mean over seeds at the η0 selected "
    "on validation, σ = its seed std (ddof 1): (1) the best α (highest mean VALIDATION accuracy among "
    "α < plateau_from_alpha) has a test accuracy above the large-α plateau (mean test accuracy over "
    "α >= plateau_from_alpha) by more than margin_points (3) points AND by more than margin_stds (3) "
    "times the larger of the two σ (σ of the plateau = the largest σ over its α); (2) accuracy does not "
    "increase with α beyond the best α: for consecutive α_k < α_k+1 from the best α on, "
    "acc(α_k+1) - acc(α_k) <= max(σ_k, σ_k+1) + 100/n_test; (3) the linearized model matches the "
    "network at the largest α: |acc_lin - acc_net(α_max)| <= max(σ_lin, σ_net) + 100/n_test (one test "
    "image of resolution); (4) activation stability at the largest α is >= stability_min (99 %) in every "
    "layer. The claim holds for an architecture when (1)-(4) all hold. The frozen-pattern surrogate at "
    "α_max is compared with the same tolerance as (3) and reported, but is not part of the claim."
)


def verdict(cfg: Config, summary: dict) -> dict:
    """The criterion of :data:`CRITERION`, computed from the summary (None where a value is missing)."""
    res = {"criterion": CRITERION, "archs": {}}
    for arch, s in summary["archs"].items():
        rows = s["per_alpha"]
        resolution = 100.0 / summary["n_test"]  # one test image, in points
        v = {}
        lazy_rows = [r for r in rows if r["alpha"] >= cfg.plateau_from_alpha]
        cand = [r for r in rows if r["alpha"] < cfg.plateau_from_alpha and r["val_acc"] is not None]
        plateau = [r["test_acc"] for r in lazy_rows if r["test_acc"] is not None]
        if not cand or len(plateau) != len(lazy_rows):
            v.update(holds=False, reason="missing runs (a whole α diverged or is not finished)")
            res["archs"][arch] = v
            continue
        best = max(cand, key=lambda r: r["val_acc"])
        plat_mean = sum(plateau) / len(plateau)
        plat_std = max(r["test_acc_std"] for r in lazy_rows)
        gap = best["test_acc"] - plat_mean
        sigma = max(best["test_acc_std"], plat_std)
        c1 = gap > cfg.margin_points and gap > cfg.margin_stds * sigma
        steps = []
        i0 = rows.index(best)
        c2 = True
        for r0, r1 in zip(rows[i0:], rows[i0 + 1:]):
            if r0["test_acc"] is None or r1["test_acc"] is None:
                c2 = False
                continue
            inc = r1["test_acc"] - r0["test_acc"]
            tol = max(r0["test_acc_std"], r1["test_acc_std"]) + resolution
            steps.append({"from": r0["alpha"], "to": r1["alpha"], "increase": inc, "tolerance": tol})
            c2 = c2 and inc <= tol
        last = rows[-1]
        lin = s["linearized"]
        if lin is None or lin["test_acc"] is None:
            c3, lin_diff, lin_tol = None, None, None
        else:
            lin_diff = lin["test_acc"] - last["test_acc"]
            lin_tol = max(lin["test_acc_std"], last["test_acc_std"]) + resolution
            c3 = abs(lin_diff) <= lin_tol
        if last["frozen_pattern_acc"] is None:
            sur_ok, sur_diff, sur_tol = None, None, None
        else:
            sur_diff = last["frozen_pattern_acc"] - last["test_acc"]
            sur_tol = max(last["frozen_pattern_acc_std"], last["test_acc_std"]) + resolution
            sur_ok = abs(sur_diff) <= sur_tol
        c4 = last["stability_min"] is not None and last["stability_min"] >= cfg.stability_min
        v.update(
            best_alpha=best["alpha"], best_lr=best["best_lr"], best_test_acc=best["test_acc"],
            best_test_acc_std=best["test_acc_std"], best_train_acc=best["train_acc"],
            best_val_acc=best["val_acc"], plateau_alphas=[r["alpha"] for r in lazy_rows],
            plateau_test_acc=plat_mean, plateau_std=plat_std, gap_points=gap, gap_in_sigmas=(gap / sigma if sigma > 0
                                                                                              else None),
            c1_gap=c1, monotone_steps=steps, c2_no_increase_beyond_best=c2,
            alpha_max=last["alpha"], network_at_alpha_max=last["test_acc"], network_at_alpha_max_std=last["test_acc_std"],
            linearized_test_acc=None if lin is None else lin["test_acc"],
            linearized_test_acc_std=None if lin is None else lin["test_acc_std"],
            linearized_minus_network=lin_diff, linearized_tolerance=lin_tol, c3_linearized_matches=c3,
            surrogate_at_alpha_max=last["frozen_pattern_acc"], surrogate_minus_network=sur_diff,
            surrogate_tolerance=sur_tol, surrogate_matches=sur_ok,
            stability_min_at_alpha_max=last["stability_min"], c4_stability=c4,
            lazy_limit_three_agree=(bool(c3) and bool(sur_ok)) if (c3 is not None and sur_ok is not None) else None,
        )
        v["holds"] = bool(c1 and c2 and c3 and c4)
        res["archs"][arch] = v
    res["holds_all"] = all(v.get("holds") for v in res["archs"].values())
    return res
