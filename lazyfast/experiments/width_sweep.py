"""Test loss against the width m under the two scalings (the authors' ``test_vs_m.jl``).

Two-layer ReLU student, i.i.d. N(0,1) init (no symmetrization), trained by full-batch GD on
½·mean square loss against a 3-neuron ReLU teacher multiplied by 100 (the authors' targets):
output scaling 1/√m with step 1/m (NTK scaling: lazy as m grows), and scaling 1/m with step 0.05/m
(mean-field scaling: not lazy). The authors' step convention is W ← W − (η/s²)·∇R, so the step on
F_α is η. One run = one trial (new teacher and data); for each m the two scalings are trained as
one batch of two nets.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lazyfast.data import relu_teacher, sphere
from lazyfast.experiments import common
from lazyfast.experiments.shallow import gaussian_init, generator_for, relative_change, relu_net_gd

NAME = "width-sweep"
DEFAULT_THREADS = 1  # see runner.reproduce
SCALINGS = ("ntk", "mean_field")


@dataclass
class Config(common.ExperimentConfig):
    d: int = 100
    n_train: int = 1000
    n_test: int = 1000
    m0: int = 3
    ms: List[int] = field(default_factory=lambda: [2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 512])
    teacher_scale: float = 100.0
    niter: int = 25_000
    ntrials: int = 10
    ntk_step: float = 1.0  # stepsize = ntk_step / m with scaling 1/√m
    mean_field_step: float = 0.05  # stepsize = mean_field_step / m with scaling 1/m
    plot_scale: float = 0.1  # the authors plot test loss × 0.1
    seed: int = 2

    @classmethod
    def quick(cls) -> "Config":
        return cls(d=20, n_train=200, n_test=500, ms=[2, 4, 8, 16, 32, 64, 128, 256], niter=3000, ntrials=2)

    def validate(self) -> None:
        for name in ("d", "n_train", "n_test", "m0", "niter", "ntrials"):
            common.check_positive(getattr(self, name), name, integer=True)
        if not self.ms:
            raise ValueError("ms must not be empty")
        for i, m in enumerate(self.ms):
            common.check_positive(m, f"ms[{i}]", integer=True)
        for name in ("teacher_scale", "ntk_step", "mean_field_step", "plot_scale"):
            common.check_positive(getattr(self, name), name)
        common.resolve_dtype(self.dtype)


def kappa_proxy(W: torch.Tensor, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, s: float) -> float:
    """Laziness criterion κ = ‖h(w0) − y‖·‖D²h‖/‖Dh‖² (the paper's laziness criterion, §2 of
    Chizat, Oyallon & Bach 2019) with the norms estimated
    on the data: ‖Dh‖² = tr Θ / n (mean eNTK diagonal), ‖D²h‖ ≈ s·max_j ‖x‖ (block-diagonal Hessian of
    the bilinear a·relu(b·x) terms, operator norm s on the sphere), residual RMS over the data."""
    z = x @ W.T  # (n, m)
    out = s * (torch.relu(z) @ a)
    res = float(((out - y) ** 2).mean().sqrt())
    tr = s * s * ((torch.relu(z) ** 2).sum(1) + ((z > 0).to(x.dtype) * a ** 2).sum(1) * (x * x).sum(1))
    return res * s / float(tr.mean())


def run_trial(cfg: Config, trial: int) -> dict:
    dtype, device = common.resolve_dtype(cfg.dtype), common.resolve_device(cfg.device)
    g = generator_for(cfg.seed, trial)
    teacher = relu_teacher(cfg.d, cfg.m0, generator=g)
    x_tr = sphere(cfg.n_train, cfg.d, generator=g)
    x_te = sphere(cfg.n_test, cfg.d, generator=g)
    y_tr, y_te = cfg.teacher_scale * teacher(x_tr), cfg.teacher_scale * teacher(x_te)
    cast = lambda t: t.to(device, dtype)
    res = {key: {"test_end": [], "test_best": [], "train_end": [], "relative_change": [], "kappa": []}
           for key in SCALINGS}
    t0 = time.perf_counter()
    for m in common.progress(cfg.ms, desc=f"trial {trial} widths", leave=False, enabled=cfg.show_progress):
        # each scaling draws its own N(0,1) init, as the authors' two loops do
        W, a = gaussian_init(2, m, cfg.d, g, symmetric=False, positive_first_half=False)
        scal = [1.0 / math.sqrt(m), 1.0 / m]
        steps = [cfg.ntk_step / m, cfg.mean_field_step / m]
        out = relu_net_gd(cast(x_tr), cast(y_tr), cast(x_te), cast(y_te), cast(W), cast(a), scaling=scal,
                          stepsize=steps, niter=cfg.niter, desc=f"m={m} GD steps", show_progress=cfg.show_progress)
        rel = relative_change(out["W"], out["a"], cast(W), cast(a))
        for b, key in enumerate(SCALINGS):
            res[key]["test_end"].append(float(out["loss_test"][-1, b]))
            res[key]["test_best"].append(float(out["loss_test"][:, b].min()))
            res[key]["train_end"].append(float(out["loss_train"][-1, b]))
            res[key]["relative_change"].append(float(rel[b]))
            res[key]["kappa"].append(kappa_proxy(W[b], a[b], x_tr, y_tr, scal[b]))
    return {"trial": trial, "ms": list(cfg.ms), **res, "seconds": time.perf_counter() - t0}


def summarize(cfg: Config, trials: List[dict]) -> dict:
    out = {"ms": list(cfg.ms), "ntrials_done": len(trials)}
    for key in SCALINGS:
        end_mean, end_std = common.mean_std([t[key]["test_end"] for t in trials])
        rel_mean, _ = common.mean_std([t[key]["relative_change"] for t in trials])
        kap_mean, _ = common.mean_std([t[key]["kappa"] for t in trials])
        out[key] = {"test_end_mean": end_mean, "test_end_std": end_std, "relative_change_mean": rel_mean,
                    "diverged": common.count_nonfinite([t[key]["test_end"] for t in trials]),
                    "kappa_mean": kap_mean, "kappa_slope": common.loglog_slope(cfg.ms, kap_mean)
                    if len(cfg.ms) > 1 else None}
    big = [i for i, m in enumerate(cfg.ms) if m >= 16]
    out["ntk_above_mean_field_for_m_ge_16"] = all(out["ntk"]["test_end_mean"][i] >= out["mean_field"]["test_end_mean"][i]
                                                  for i in big) if big else None
    return out


def run(cfg: Optional[Config] = None, store: Optional[common.RunStore] = None) -> dict:
    cfg = cfg or Config.quick()
    cfg.validate()
    store = common.RunStore() if store is None else store
    fp = common.fingerprint(cfg, exclude=("ntrials", "show_progress", "plot_scale", "device"))
    trials = []
    for k in common.progress(range(cfg.ntrials), desc=f"{NAME} trials", enabled=cfg.show_progress):
        trials.append(store.run(f"{NAME}/{fp}/trial{k}", lambda: run_trial(cfg, k)))
    return {"experiment": NAME, "config": common.config_dict(cfg), "trials": trials, "summary": summarize(cfg, trials)}
