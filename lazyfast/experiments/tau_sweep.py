"""Test loss against the init scale τ (the authors' ``test_vs_scale.jl``; paper Fig. 1, right).

Two-layer ReLU student (m = 50, no biases, symmetrized init with positive first-half output
weights, all weights τ·N(0,1)) trained by full-batch GD on ½·mean square loss against a
3-neuron ReLU teacher on the sphere. Scaling the init by τ is lazy training with α = τ²; the step
is min(10, 0.1/τ²) so that the step on F_α is 0.1 whenever τ ≥ 0.1. One *run* = one trial (new
teacher, data and W0; W0 shared by all τ), with every τ of the trial trained as one batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lazyfast.data import relu_teacher, sphere
from lazyfast.experiments import common
from lazyfast.experiments.shallow import (gaussian_init, generator_for, log_grid, relative_change, relu_net_gd,
                                          teacher_alignment)

NAME = "tau-sweep"
DEFAULT_THREADS = 1  # see runner.reproduce


@dataclass
class Config(common.ExperimentConfig):
    d: int = 100
    n_train: int = 1000
    n_test: int = 1000
    m0: int = 3
    m: int = 50
    taus: List[float] = field(default_factory=lambda: log_grid(-2.2, 1.0, 0.1))  # 33 values, 10^-2.2 .. 10
    niter: int = 10_000
    ntrials: int = 10
    step_cap: float = 10.0  # stepsize = min(step_cap, step_base / τ²)
    step_base: float = 0.1
    symmetric: bool = True
    positive_first_half: bool = True
    curve_points: int = 100  # log-spaced loss-curve samples kept per run
    seed: int = 1

    @classmethod
    def quick(cls) -> "Config":
        return cls(d=20, n_train=200, n_test=500, taus=log_grid(-2.0, 1.0, 0.25), niter=2000, ntrials=2)

    def validate(self) -> None:
        for name in ("d", "n_train", "n_test", "m0", "m", "niter", "ntrials", "curve_points"):
            common.check_positive(getattr(self, name), name, integer=True)
        common.check_positive_list(self.taus, "taus")
        common.check_positive(self.step_cap, "step_cap")
        common.check_positive(self.step_base, "step_base")
        if self.symmetric and self.m % 2:
            raise ValueError(f"m must be even with symmetric=True, got m={self.m}")
        common.resolve_dtype(self.dtype)


def stepsize(cfg: Config, tau: float) -> float:
    return min(cfg.step_cap, cfg.step_base / tau ** 2)


def run_trial(cfg: Config, trial: int) -> dict:
    """One trial: a new teacher, train/test sets and W0; GD for every τ (batched)."""
    dtype, device = common.resolve_dtype(cfg.dtype), common.resolve_device(cfg.device)
    g = generator_for(cfg.seed, trial)
    teacher = relu_teacher(cfg.d, cfg.m0, generator=g)
    x_tr = sphere(cfg.n_train, cfg.d, generator=g)
    x_te = sphere(cfg.n_test, cfg.d, generator=g)
    y_tr, y_te = teacher(x_tr), teacher(x_te)
    W0, a0 = gaussian_init(1, cfg.m, cfg.d, g, symmetric=cfg.symmetric, positive_first_half=cfg.positive_first_half)
    taus = torch.tensor(cfg.taus, dtype=torch.float64)
    B = len(cfg.taus)
    W = (taus[:, None, None] * W0).to(device, dtype)
    a = (taus[:, None] * a0).to(device, dtype)
    steps = [stepsize(cfg, t) for t in cfg.taus]
    cast = lambda t: t.to(device, dtype)
    t0 = time.perf_counter()
    out = relu_net_gd(cast(x_tr), cast(y_tr), cast(x_te), cast(y_te), W, a, scaling=1.0, stepsize=steps,
                      niter=cfg.niter, desc=f"trial {trial} GD steps", show_progress=cfg.show_progress)
    seconds = time.perf_counter() - t0
    ltr, lte = out["loss_train"], out["loss_test"]  # (niter, B)
    idx = common.log_indices(cfg.niter, cfg.curve_points)
    return {
        "trial": trial,
        "taus": list(cfg.taus),
        "stepsize": steps,
        "test_end": common.tolist(lte[-1]),
        "test_best": common.tolist(lte.min(0).values),
        "train_end": common.tolist(ltr[-1]),
        "train_init": common.tolist(ltr[0]),
        "test_init": common.tolist(lte[0]),
        "relative_change": common.tolist(relative_change(out["W"], out["a"], W, a)),
        "teacher_alignment": common.tolist(teacher_alignment(out["W"], out["a"], teacher.weight.to(device))),
        "curve_iters": idx,
        "curve_train": common.tolist(ltr[idx].T),
        "curve_test": common.tolist(lte[idx].T),
        "seconds": seconds,
    }


def summarize(cfg: Config, trials: List[dict]) -> dict:
    taus = list(cfg.taus)
    end_mean, end_std = common.mean_std([t["test_end"] for t in trials])
    best_mean, best_std = common.mean_std([t["test_best"] for t in trials])
    train_mean, _ = common.mean_std([t["train_end"] for t in trials])
    rel_mean, _ = common.mean_std([t["relative_change"] for t in trials])
    align_mean, _ = common.mean_std([t["teacher_alignment"] for t in trials])
    init_mean, _ = common.mean_std([t["test_init"] for t in trials])
    big = [i for i, t in enumerate(taus) if t >= 0.1 - 1e-12]
    small = [i for i, t in enumerate(taus) if t <= 0.1 + 1e-12]
    lazy = [i for i, t in enumerate(taus) if t >= 1.0 - 1e-12]
    out = {
        "taus": taus,
        "test_end_mean": end_mean, "test_end_std": end_std,
        "test_best_mean": best_mean, "test_best_std": best_std,
        "train_end_mean": train_mean,
        "test_init_mean": init_mean,
        "relative_change_mean": rel_mean,
        "teacher_alignment_mean": align_mean,
        "ntrials_done": len(trials),
        "seconds_per_trial": [t["seconds"] for t in trials],
    }
    if len(big) >= 2:
        out["spearman_end_tau_ge_0.1"] = common.spearman([taus[i] for i in big], [end_mean[i] for i in big])
        out["spearman_best_tau_ge_0.1"] = common.spearman([taus[i] for i in big], [best_mean[i] for i in big])
    if small and lazy:
        lo = min(end_mean[i] for i in small)
        hi = sum(end_mean[i] for i in lazy) / len(lazy)
        out["lazy_plateau_over_small_tau"] = hi / lo if lo > 0 else math.inf
    return out


def run(cfg: Optional[Config] = None, store: Optional[common.RunStore] = None) -> dict:
    """Runs (or resumes) the sweep; returns per-trial results and the summary."""
    cfg = cfg or Config.quick()
    cfg.validate()
    store = common.RunStore() if store is None else store
    fp = common.fingerprint(cfg, exclude=("ntrials", "show_progress", "device"))
    trials = []
    for k in common.progress(range(cfg.ntrials), desc=f"{NAME} trials", enabled=cfg.show_progress):
        trials.append(store.run(f"{NAME}/{fp}/trial{k}", lambda: run_trial(cfg, k)))
    return {"experiment": NAME, "config": common.config_dict(cfg), "trials": trials, "summary": summarize(cfg, trials)}


PER_TAU_KEYS = ("taus", "stepsize", "test_end", "test_best", "train_end", "train_init", "test_init",
                "relative_change", "teacher_alignment", "curve_train", "curve_test")


def merge_trials(parts: List[List[dict]]) -> List[dict]:
    """Joins sweeps of the same trials over disjoint τ sets (e.g. run in parallel, or in another
    dtype) into one list of trials with all τ, sorted. Trials are matched by index; only trials
    present in every part are kept. The same seed gives the same teacher, data and W0 for a trial
    index whatever the τ set or dtype, so the joined trial is one consistent sweep."""
    by_part = [{t["trial"]: t for t in p} for p in parts]
    common_ids = sorted(set.intersection(*(set(d) for d in by_part))) if by_part else []
    out = []
    for k in common_ids:
        rows = []
        for d in by_part:
            t = d[k]
            if t["curve_iters"] != by_part[0][k]["curve_iters"]:
                raise ValueError(f"trial {k}: parts were logged at different iterations; they cannot be merged")
            for i in range(len(t["taus"])):
                rows.append({key: t[key][i] for key in PER_TAU_KEYS})
        rows.sort(key=lambda r: r["taus"])
        taus = [r["taus"] for r in rows]
        if len(set(taus)) != len(taus):
            raise ValueError(f"trial {k}: the parts share τ values {sorted(set(t for t in taus if taus.count(t) > 1))}")
        merged = {key: [r[key] for r in rows] for key in PER_TAU_KEYS}
        merged.update(trial=k, curve_iters=by_part[0][k]["curve_iters"],
                      seconds=sum(d[k]["seconds"] for d in by_part))
        out.append(merged)
    return out
