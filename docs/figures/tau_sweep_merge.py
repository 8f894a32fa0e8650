"""How docs/figures/tau-sweep.{png,json} were assembled from three resumable runs of the paper preset
(see docs/REPRODUCTION.md, tau-sweep): float32 for τ < 0.5 (all 33 τ were run in float32; its large-τ
values are discarded because float32 cannot resolve the tiny lazy updates there), and float64 for
τ ≥ 0.5 in two parallel runs over disjoint τ sets. Same seed ⇒ same teacher, data and W0 per trial.

    python docs/figures/tau_sweep_merge.py RUNS_F32 RUNS_F64A RUNS_F64B OUT_DIR
"""
import json
import os
import sys

from lazyfast.experiments import common, plots, tau_sweep


def load(path):
    with open(path) as f:
        return [json.loads(line)["result"] for line in f if line.strip()]


def restrict(trials, keep):
    out = []
    for t in trials:
        idx = [i for i, tau in enumerate(t["taus"]) if keep(tau)]
        u = dict(t)
        for key in tau_sweep.PER_TAU_KEYS:
            u[key] = [t[key][i] for i in idx]
        out.append(u)
    return out


def main(f32, f64a, f64b, out_dir):
    t32 = load(f32)
    cfg32 = common.make_config(tau_sweep.Config, "paper", dtype="float32")
    os.makedirs(out_dir, exist_ok=True)
    # the float32 sweep alone, all τ (shows the float32 artifact at large τ)
    res32 = {"experiment": "tau-sweep", "preset": "paper", "config": common.config_dict(cfg32), "trials": t32,
             "summary": tau_sweep.summarize(cfg32, t32)}
    path = plots.plot_tau_sweep(res32, os.path.join(out_dir, "tau-sweep-float32.png"))
    merged = tau_sweep.merge_trials([restrict(t32, lambda tau: tau < 0.5 - 1e-9), load(f64a), load(f64b)])
    cfg = common.make_config(tau_sweep.Config, "paper")
    assert [round(t, 12) for t in merged[0]["taus"]] == [round(t, 12) for t in cfg.taus]
    res = {"experiment": "tau-sweep", "preset": "paper", "config": common.config_dict(cfg),
           "dtype_note": "float32 for tau < 0.5 (run tau-sweep, --dtype float32), float64 for tau >= 0.5",
           "trials": merged, "summary": tau_sweep.summarize(cfg, merged)}
    plots.plot_tau_sweep(res, os.path.join(out_dir, "tau-sweep.png"))
    with open(os.path.join(out_dir, "tau-sweep.json"), "w") as f:
        json.dump(common.json_safe(res), f, indent=1, allow_nan=False)
    with open(os.path.join(out_dir, "tau-sweep-float32.json"), "w") as f:
        json.dump(common.json_safe({k: v for k, v in res32.items() if k != "trials"}), f, indent=1, allow_nan=False)
    print(path, len(t32), "float32 trials;", len(merged), "merged trials")
    s = res["summary"]
    print({k: v for k, v in s.items() if not isinstance(v, list)})


if __name__ == "__main__":
    main(*sys.argv[1:5])
