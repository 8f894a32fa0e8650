"""The cover illustration (the authors' ``illustration.jl``; paper Fig. 1, left): 2-D
teacher–student trajectories of the neurons |a_j|·b_j under GD, non-lazy (τ = 0.1) vs lazy (τ = 2).

d = 2, 15 training and 20 test points on the circle, a 3-neuron ReLU teacher, a 16-neuron
student with unit-norm input weights b_j, output weights a_j ~ U[0, 1] and the symmetrized init
(second half = first half with negated a), everything multiplied by τ; full-batch GD with step
0.005 on ½·mean square loss (scaling 1), losses recorded before each update. All τ share the data
and the base init and are trained as one batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lazyfast.data import relu_teacher, sphere
from lazyfast.experiments import common
from lazyfast.experiments.shallow import generator_for, relative_change, relu_net_gd, teacher_alignment

NAME = "cover"
DEFAULT_THREADS = 1  # see runner.reproduce


@dataclass
class Config(common.ExperimentConfig):
    d: int = 2
    n_train: int = 15
    n_test: int = 20
    m0: int = 3
    m: int = 16
    taus: List[float] = field(default_factory=lambda: [0.1, 2.0])
    niter: int = 100_000
    stepsize: float = 0.005
    path_points: int = 100
    seed: int = 1

    @classmethod
    def quick(cls) -> "Config":
        return cls(niter=30_000)

    def validate(self) -> None:
        for name in ("d", "n_train", "n_test", "m0", "m", "niter", "path_points"):
            common.check_positive(getattr(self, name), name, integer=True)
        common.check_positive_list(self.taus, "taus")
        common.check_positive(self.stepsize, "stepsize")
        if self.m % 2:
            raise ValueError(f"m must be even (symmetrized init), got m={self.m}")
        common.resolve_dtype(self.dtype)


def cover_init(m: int, d: int, generator: torch.Generator):
    """Unit-norm input weights, output weights U[0, 1], symmetrized: W (m, d), a (m,), float64."""
    W = torch.randn(m, d, generator=generator, dtype=torch.float64)
    W = W / W.norm(dim=1, keepdim=True)
    a = torch.rand(m, generator=generator, dtype=torch.float64)
    h = m // 2
    a[h:] = -a[:h]
    W[h:] = W[:h]
    return W, a


def _run(cfg: Config) -> dict:
    dtype, device = common.resolve_dtype(cfg.dtype), common.resolve_device(cfg.device)
    g = generator_for(cfg.seed, 0)
    teacher = relu_teacher(cfg.d, cfg.m0, generator=g)
    x_tr = sphere(cfg.n_train, cfg.d, generator=g)
    x_te = sphere(cfg.n_test, cfg.d, generator=g)
    W0, a0 = cover_init(cfg.m, cfg.d, g)
    taus = torch.tensor(cfg.taus, dtype=torch.float64)
    W = (taus[:, None, None] * W0).to(device, dtype)
    a = (taus[:, None] * a0).to(device, dtype)
    cast = lambda t: t.to(device, dtype)
    snaps = sorted(set(common.log_indices(cfg.niter, cfg.path_points)) | {cfg.niter})
    t0 = time.perf_counter()
    out = relu_net_gd(cast(x_tr), cast(teacher(x_tr)), cast(x_te), cast(teacher(x_te)), W, a, scaling=1.0,
                      stepsize=cfg.stepsize, niter=cfg.niter, snapshot_at=snaps, desc="cover GD steps",
                      show_progress=cfg.show_progress)
    seconds = time.perf_counter() - t0
    # Neuron positions |a_j|·b_j at the snapshots: (B, m, T, d)
    pos = torch.stack([(s[1].abs().unsqueeze(-1) * s[0]) for _, s in sorted(out["snapshots"].items())], dim=2)
    idx = common.log_indices(cfg.niter, cfg.path_points)
    runs = []
    for b, tau in enumerate(cfg.taus):
        runs.append({
            "tau": tau,
            "relative_change": float(relative_change(out["W"][b:b + 1], out["a"][b:b + 1], W[b:b + 1], a[b:b + 1])[0]),
            "teacher_alignment": float(teacher_alignment(out["W"][b:b + 1], out["a"][b:b + 1],
                                                         teacher.weight.to(device, dtype))[0]),
            "train_init": float(out["loss_train"][0, b]),
            "train_end": float(out["loss_train"][-1, b]),
            "test_end": float(out["loss_test"][-1, b]),
            "curve_iters": idx,
            "curve_train": common.tolist(out["loss_train"][idx, b]),
            "curve_test": common.tolist(out["loss_test"][idx, b]),
            "final_sign": common.tolist(torch.sign(out["a"][b])),
            "paths": common.tolist(pos[b]),  # (m, T, 2)
        })
    return {"runs": runs, "teacher_directions": common.tolist(teacher.weight), "teacher_signs": common.tolist(teacher.out),
            "seconds": seconds}


def run(cfg: Optional[Config] = None, store: Optional[common.RunStore] = None) -> dict:
    cfg = cfg or Config.quick()
    cfg.validate()
    store = common.RunStore() if store is None else store
    res = store.run(f"{NAME}/{common.fingerprint(cfg, exclude=('show_progress', 'device'))}", lambda: _run(cfg))
    summary = {f"tau={r['tau']:g}": {k: r[k] for k in ("relative_change", "teacher_alignment", "train_init",
                                                     "train_end", "test_end")} for r in res["runs"]}
    return {"experiment": NAME, "config": common.config_dict(cfg), **res, "summary": summary}
