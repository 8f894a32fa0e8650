"""The main job: the quick presets of ``cover``, ``tau-sweep`` and ``rates`` on the embedded
synthetic data, checked against the paper's qualitative claims, with a short table."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from lazyfast.experiments import common, cover, rates, tau_sweep

NAME = "demo"
DEFAULT_THREADS = 1  # see runner.reproduce


@dataclass
class Config(common.ExperimentConfig):
    parts_preset: str = "quick"  # preset of the three experiments
    seed: Optional[int] = None  # None: each experiment's own default seed

    @classmethod
    def quick(cls) -> "Config":
        return cls()

    @classmethod
    def paper(cls) -> "Config":
        return cls(parts_preset="paper")

    def validate(self) -> None:
        if self.parts_preset not in common.PRESETS:
            raise ValueError(f"parts_preset must be one of {common.PRESETS}, got {self.parts_preset!r}")
        common.resolve_dtype(self.dtype)


def _checks(parts: dict) -> list:
    """(experiment, quantity, value, paper's claim, holds) rows."""
    rows = []
    cv = parts["cover"]["summary"]
    for key, r in cv.items():
        tau = float(key.split("=")[1])
        if tau <= 0.1 + 1e-12:
            rows.append(("cover", f"‖Δw‖/‖w0‖ at τ={tau:g}", r["relative_change"], "> 0.5 (neurons move)",
                         r["relative_change"] > 0.5))
        elif tau >= 1.0:
            rows.append(("cover", f"‖Δw‖/‖w0‖ at τ={tau:g}", r["relative_change"], "< 0.05 (lazy)",
                         r["relative_change"] < 0.05))
    ts = parts["tau-sweep"]["summary"]
    rho = ts.get("spearman_end_tau_ge_0.1", float("nan"))
    rows.append(("tau-sweep", "Spearman(τ, test loss), τ ≥ 0.1", rho, "≥ 0.8 (increases with τ)", rho >= 0.8))
    ratio = ts.get("lazy_plateau_over_small_tau", float("nan"))
    rows.append(("tau-sweep", "test loss τ≥1 / best τ≤0.1", ratio, "≥ 3 (lazy plateau higher)", ratio >= 3))
    rs = parts["rates"]["summary"]
    for key, slope in rs["slopes"].items():
        exp, tol = rs["expected"][key], rs["tolerance"][key]
        rows.append(("rates", f"slope of {key}", slope, f"{exp:g} ± {tol:g}", abs(slope - exp) <= tol))
    if rs.get("uncentered_slopes"):
        slope = rs["uncentered_slopes"]["weight_change"]
        rows.append(("rates", "weight_change slope, no centering", slope, "fails (> -0.5)", slope > -0.5))
    return rows


def run(cfg: Optional[Config] = None, store: Optional[common.RunStore] = None) -> dict:
    cfg = cfg or Config.quick()
    cfg.validate()
    store = common.RunStore() if store is None else store
    common_over = {"dtype": cfg.dtype, "device": cfg.device, "show_progress": cfg.show_progress, "seed": cfg.seed}
    parts, seconds = {}, {}
    for mod in (cover, tau_sweep, rates):
        t0 = time.perf_counter()
        c = common.make_config(mod.Config, cfg.parts_preset, **common_over)
        parts[mod.NAME] = mod.run(c, store)
        seconds[mod.NAME] = time.perf_counter() - t0
    rows = _checks(parts)
    return {"experiment": NAME, "config": common.config_dict(cfg), "parts": parts, "seconds": seconds,
            "checks": [{"experiment": e, "quantity": q, "value": v, "claim": c, "holds": bool(h)}
                       for e, q, v, c, h in rows],
            "summary": {"all_hold": all(r[4] for r in rows), "seconds": seconds}}


def summary_text(result: dict) -> str:
    lines = [f"== lazyfast demo: lazy training (Chizat, Oyallon & Bach 2019), "
             f"{result.get('wall_seconds', float('nan')):.0f} s =="]
    w = max(len(c["quantity"]) for c in result["checks"])
    lines.append(f"{'experiment':<11} {'quantity':<{w}} {'value':>10}  {'paper':<26} ok")
    for c in result["checks"]:
        lines.append(f"{c['experiment']:<11} {c['quantity']:<{w}} {c['value']:>10.4g}  {c['claim']:<26} "
                     f"{'yes' if c['holds'] else 'NO'}")
    lines.append("time per part: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items()))
    return "\n".join(lines)
