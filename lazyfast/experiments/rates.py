"""The rates of Theorem 2.2, measured with the engine's rate check (:func:`lazyfast.diagnostics.rate_check`).

For a list of α, gradient descent on the scaled objective R(αh)/α² is run from the same w0 on the
lazy model αh and on its linearization αh̄ (h(w0) = 0 by centering), over a fixed horizon. The
sup over the path of ‖w_α − w0‖, ‖αh(w_α) − αh̄(w̄_α)‖ and ‖w_α − w̄_α‖ should decay like α⁻¹,
α⁻¹ and α⁻²; the slopes are fitted in log-log. One run per model setting (``series``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from lazyfast.diagnostics import rate_check  # the engine's implementation
from lazyfast.experiments import common

NAME = "rates"
DEFAULT_THREADS = 1  # see runner.reproduce
EXPECTED = {"weight_change": -1.0, "output_gap": -1.0, "param_gap": -2.0}
# Tolerances on the log-log slopes of Theorem 2.2 (the claims of docs/REPRODUCTION.md, `rates`).
TOLERANCE = {"weight_change": 0.1, "output_gap": 0.15, "param_gap": 0.15}


@dataclass
class Config(common.ExperimentConfig):
    alphas: List[float] = field(default_factory=lambda: [10.0, 20.0, 50.0, 100.0, 200.0, 500.0])
    n: int = 20
    d: int = 5
    m: int = 40
    activation: str = "tanh"  # smooth: the theorem assumes a locally Lipschitz Jacobian
    init: str = "centered"
    steps: int = 100
    lr: float = 0.5
    # Extra settings run with the same α grid: the paper's ReLU net with the symmetrized init, and a
    # control without centering (h(w0) ≠ 0, outside the theorem), where the rates must fail.
    extra_series: List[dict] = field(default_factory=lambda: [{"activation": "relu", "init": "symmetric"},
                                                              {"activation": "tanh", "init": "uncentered"}])
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls()

    @classmethod
    def paper(cls) -> "Config":
        return cls(alphas=[10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0], steps=400,
                   lr=0.5)

    def validate(self) -> None:
        common.check_positive_list(self.alphas, "alphas")
        if len(set(self.alphas)) < 2:
            raise ValueError("alphas must hold at least two distinct values")
        for name in ("n", "d", "m", "steps"):
            common.check_positive(getattr(self, name), name, integer=True)
        common.check_positive(self.lr, "lr")
        common.resolve_dtype(self.dtype)  # `device` is ignored: the engine's rate check is a tiny CPU problem


def _series(cfg: Config) -> List[dict]:
    base = {"activation": cfg.activation, "init": cfg.init}
    return [base] + [dict(base, **s) for s in cfg.extra_series]


def _run_series(cfg: Config, setting: dict) -> dict:
    res = rate_check(cfg.alphas, n=cfg.n, d=cfg.d, m=cfg.m, k=1, activation=setting["activation"],
                     init=setting["init"], steps=cfg.steps, lr=cfg.lr, seed=cfg.seed,
                     dtype=common.resolve_dtype(cfg.dtype))
    return {"setting": setting, "alphas": list(res["alphas"]), "slopes": dict(res["slopes"]),
            "curves": {k: list(v) for k, v in res["curves"].items()}, "final_loss": list(res["final_loss"])}


def run(cfg: Optional[Config] = None, store: Optional[common.RunStore] = None) -> dict:
    cfg = cfg or Config.quick()
    cfg.validate()
    store = common.RunStore() if store is None else store
    fp = common.fingerprint(cfg, exclude=("show_progress", "extra_series", "device"))
    series = []
    for s in common.progress(_series(cfg), desc=f"{NAME} settings", enabled=cfg.show_progress):
        key = f"{NAME}/{fp}/{s['activation']}-{s['init']}"
        series.append(store.run(key, lambda: _run_series(cfg, s)))
    main = series[0]
    within = {k: abs(main["slopes"][k] - EXPECTED[k]) <= TOLERANCE[k] for k in EXPECTED}
    summary = {
        "alphas": main["alphas"],
        "setting": main["setting"],
        "slopes": main["slopes"],
        "expected": EXPECTED,
        "tolerance": TOLERANCE,
        "within_tolerance": within,
        **{k: main["curves"][k] for k in EXPECTED},
        "other_series": [{"setting": s["setting"], "slopes": s["slopes"]} for s in series[1:]],
        "uncentered_slopes": next((s["slopes"] for s in series if s["setting"]["init"] == "uncentered"), None),
    }
    return {"experiment": NAME, "config": common.config_dict(cfg), "series": series, "summary": summary}
