"""Run one experiment by name: config from a preset + overrides, resumable run store, results.json
and the figure in an output directory. The CLI's ``reproduce`` command is a thin layer over this."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, Optional

import torch

from lazyfast._store import atomic_write
from lazyfast.experiments import common, get, plots
from lazyfast.experiments.image_data import FASHION_MNIST_DIR

RUNS_FILE = "runs.jsonl"
RESULTS_FILE = "results.json"


def build_config(name: str, preset: str = "quick", **overrides):
    """The ``preset`` config of experiment ``name`` with ``overrides`` (None values ignored)."""
    return common.make_config(get(name).Config, preset, **overrides)


def reproduce(name: str, preset: str = "quick", out: Optional[str] = None, *, plot: bool = True,
              threads: Optional[int] = None, **overrides) -> Dict[str, Any]:
    """Runs (or resumes) experiment ``name`` and returns its result dict.

    ``threads``: torch CPU threads; None uses the experiment's ``DEFAULT_THREADS`` (1 for the small
    two-layer experiments and the demo) or else leaves torch's setting.

    With ``out``, finished runs are appended to ``out/runs.jsonl`` (a rerun skips them), the
    result is written to ``out/results.json`` and the figure(s) to ``out/<name>.png``; the paths
    are listed under ``result["files"]``.
    """
    module = get(name)
    if threads is None:
        # small problems: one thread (more only adds OpenMP contention, badly so on a busy CPU)
        threads = getattr(module, "DEFAULT_THREADS", None)
    if threads is not None:
        common.check_positive(threads, "threads", integer=True)
        torch.set_num_threads(threads)
    cfg = common.make_config(module.Config, preset, **overrides)
    store = common.RunStore(os.path.join(out, RUNS_FILE) if out else None,
                            fingerprint=data_fingerprint(name, cfg) if out else None)
    t0 = time.perf_counter()
    result = module.run(cfg, store)
    result["preset"] = preset
    # wall time of this process; a resumed run also reports the compute time of every run it
    # reused (recorded when that run was computed), so a 45-minute sweep resumed in 1 s says so
    result["wall_seconds"] = time.perf_counter() - t0
    result.update(store.timing())
    if out:
        os.makedirs(out, exist_ok=True)
        files = []
        if plot:
            files = plots.plot(result, out)
        result["files"] = [os.path.relpath(p, out) for p in files]
        text = json.dumps(common.json_safe(result), indent=1, allow_nan=False)
        atomic_write(os.path.join(out, RESULTS_FILE), text.encode("utf-8"))
    return result


def data_fingerprint(name: str, cfg) -> str:
    """The problem fingerprint of experiment ``name``'s stored runs: the experiment's name and
    a digest of the data files it reads (CIFAR-10 / Fashion-MNIST under ``data_dir``), so runs
    on other data are never reused. Experiments that generate their data from the config's
    seed read no file: their keys (config fingerprints) already determine the data."""
    files = []
    source = getattr(cfg, "data", "auto")
    if hasattr(cfg, "data_dir") and source != "synthetic":
        d = cfg.data_dir or (FASHION_MNIST_DIR if source in ("auto", "fashion-mnist") else None)
        if d and os.path.isdir(d):
            files = [os.path.join(d, f) for f in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, f))]
    digest = common.file_digest(files) if files else "generated"
    return f"{name}:{digest[:16]}"


def config_fields(name: str):
    """Names of the config options of experiment ``name`` (for ``--set``)."""
    return [f.name for f in dataclasses.fields(get(name).Config)]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) <= 8:
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, list):
        return f"[{len(v)} values]"
    return str(v)


def summary_text(result: Dict[str, Any]) -> str:
    """A short human-readable summary: the module's own ``summary_text`` if it has one, else the
    summary's entries."""
    module = get(result["experiment"])
    if hasattr(module, "summary_text"):
        return module.summary_text(result)
    lines = [f"== {result['experiment']} ({result.get('preset', '?')} preset, "
             f"{result.get('wall_seconds', float('nan')):.1f} s) =="]
    for k, v in result.get("summary", {}).items():
        if isinstance(v, dict):
            lines.append(f"  {k}: " + ", ".join(f"{kk}={_fmt(vv)}" for kk, vv in v.items()))
        else:
            lines.append(f"  {k}: {_fmt(v)}")
    return "\n".join(lines)
