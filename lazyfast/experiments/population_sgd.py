"""Population loss at convergence against τ with online SGD (the authors' ``populationSGD.jl``).

The under-parameterized case: m = 50 neurons in d = 100, each SGD step on a fresh batch of 200
sphere-uniform inputs, so the population loss itself is minimized. Student
``(1/m) Σ_j a_j relu(b_j·x)`` with the symmetrized init (positive first-half output weights)
scaled by τ; teacher ``Σ_k a*_k relu(b*_k·x) / batchsize`` (the authors' scaling, which sets the
τ axis). Step ``min(0.25/τ², 25)``; as in the authors' code the gradients omit the 1/m and the
input weights step d× further. Metric: mean of the last ``tail`` batch losses (recorded before each
update, so an unbiased population-loss estimate); the figure normalizes the trial mean by its max
over τ. One run = one trial (new teacher; all τ batched, sharing W0 and the batches).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lazyfast.data import relu_teacher
from lazyfast.experiments import common
from lazyfast.experiments.shallow import (gaussian_init, generator_for, log_grid, relative_change,
                                          relu_net_population_sgd)

NAME = "population-sgd"
DEFAULT_THREADS = 1  # see runner.reproduce


def _paper_taus():
    return [0.01, 0.02, 0.04] + log_grid(-1.0, 0.0, 0.1) + [2.0, 4.0, 8.0]


@dataclass
class Config(common.ExperimentConfig):
    d: int = 100
    m0: int = 3
    m: int = 50
    taus: List[float] = field(default_factory=_paper_taus)  # 17 values
    niter: int = 20_000
    batchsize: int = 200
    tail: int = 2000  # the last `tail` losses are averaged
    ntrials: int = 10
    step_base: float = 0.25  # stepsize = min(step_base / τ², step_cap)
    step_cap: float = 25.0
    teacher_scale: Optional[float] = None  # None: 1/batchsize, the authors' choice
    curve_points: int = 100
    seed: int = 1

    @classmethod
    def quick(cls) -> "Config":
        return cls(d=30, taus=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 8.0], niter=4000, tail=500, ntrials=2)

    def validate(self) -> None:
        for name in ("d", "m0", "m", "niter", "batchsize", "tail", "ntrials", "curve_points"):
            common.check_positive(getattr(self, name), name, integer=True)
        if self.tail > self.niter:
            raise ValueError(f"tail must be <= niter, got tail={self.tail}, niter={self.niter}")
        common.check_positive_list(self.taus, "taus")
        common.check_positive(self.step_base, "step_base")
        common.check_positive(self.step_cap, "step_cap")
        if self.teacher_scale is not None:
            common.check_positive(self.teacher_scale, "teacher_scale")
        if self.m % 2:
            raise ValueError(f"m must be even (symmetrized init), got m={self.m}")
        common.resolve_dtype(self.dtype)


def run_trial(cfg: Config, trial: int) -> dict:
    dtype, device = common.resolve_dtype(cfg.dtype), common.resolve_device(cfg.device)
    g = generator_for(cfg.seed, trial)
    teacher = relu_teacher(cfg.d, cfg.m0, generator=g)
    W0, a0 = gaussian_init(1, cfg.m, cfg.d, g, symmetric=True, positive_first_half=True)
    taus = torch.tensor(cfg.taus, dtype=torch.float64)
    W = (taus[:, None, None] * W0).to(device, dtype)
    a = (taus[:, None] * a0).to(device, dtype)
    steps = [min(cfg.step_base / t ** 2, cfg.step_cap) for t in cfg.taus]
    t0 = time.perf_counter()
    out = relu_net_population_sgd(teacher.weight.to(device, dtype), teacher.out.to(device, dtype), W, a,
                                  stepsize=steps, batchsize=cfg.batchsize, niter=cfg.niter, generator=g,
                                  teacher_scale=cfg.teacher_scale, desc=f"trial {trial} SGD steps",
                                  show_progress=cfg.show_progress)
    seconds = time.perf_counter() - t0
    loss = out["loss"]  # (niter, B)
    idx = common.log_indices(cfg.niter, cfg.curve_points)
    # Smooth the noisy per-batch loss for the curves: mean over a window ending at each index.
    csum = torch.cat([torch.zeros(1, loss.shape[1], dtype=loss.dtype), loss.cumsum(0)])
    win = [max(1, min(i + 1, cfg.niter // 100)) for i in idx]
    smooth = torch.stack([(csum[i + 1] - csum[i + 1 - w]) / w for i, w in zip(idx, win)])
    return {
        "trial": trial,
        "taus": list(cfg.taus),
        "stepsize": steps,
        "tail_mean": common.tolist(loss[-cfg.tail:].mean(0)),
        "init_loss": common.tolist(loss[0]),  # the output is 0 at init: ½·mean y0² on the first batch
        "relative_change": common.tolist(relative_change(out["W"], out["a"], W, a)),
        "curve_iters": idx,
        "curve_loss": common.tolist(smooth.T),
        "seconds": seconds,
    }


def summarize(cfg: Config, trials: List[dict]) -> dict:
    taus = list(cfg.taus)
    mean, std = common.mean_std([t["tail_mean"] for t in trials])
    # loss before the first update (= curve_loss[:, 0]; the student outputs exactly 0 there)
    init_mean, _ = common.mean_std([[c[0] for c in t["curve_loss"]] for t in trials])
    rel_mean, _ = common.mean_std([t["relative_change"] for t in trials])
    top = max(mean)
    norm = [v / top for v in mean]
    small = [norm[i] for i, t in enumerate(taus) if t <= 0.1 + 1e-12]
    lazy = [norm[i] for i, t in enumerate(taus) if t >= 1.0 - 1e-12]
    return {
        "taus": taus,
        "loss_mean": mean, "loss_std": std,
        "normalized_mean": norm, "normalized_std": [s / top for s in std],
        "init_loss_mean": init_mean,
        "final_over_init": [m_ / i_ for m_, i_ in zip(mean, init_mean)],
        "relative_change_mean": rel_mean,
        "max_normalized_tau_le_0.1": max(small) if small else None,
        "min_normalized_tau_ge_1": min(lazy) if lazy else None,
        "ntrials_done": len(trials),
        "seconds_per_trial": [t["seconds"] for t in trials],
    }


def run(cfg: Optional[Config] = None, store: Optional[common.RunStore] = None) -> dict:
    cfg = cfg or Config.quick()
    cfg.validate()
    store = common.RunStore() if store is None else store
    fp = common.fingerprint(cfg, exclude=("ntrials", "show_progress", "device"))
    trials = []
    for k in common.progress(range(cfg.ntrials), desc=f"{NAME} trials", enabled=cfg.show_progress):
        trials.append(store.run(f"{NAME}/{fp}/trial{k}", lambda: run_trial(cfg, k)))
    return {"experiment": NAME, "config": common.config_dict(cfg), "trials": trials, "summary": summarize(cfg, trials)}
