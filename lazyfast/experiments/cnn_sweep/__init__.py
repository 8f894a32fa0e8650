"""Running the CNN sweep: :func:`run` (one process, resumable), :func:`reproduce` (worker processes,
results.json, figure) and :func:`main` (``python -m lazyfast.experiments.cnn_sweep``).

The experiment is the paper's CNN claim with error bars: VGG-11 and ResNet-18 (BN-free) trained at
scale α, several seeds, η0 chosen on a held-out validation split, and the lazy limit computed three ways.

Protocol (the authors' ``cnn/train.py`` unless said): the network is centred,
h(w) = f(w, x) − f(w0, x) with a frozen copy of the initial network (:class:`lazyfast.LazyModel`),
trained on MSE(α·h, onehot)/α² (PyTorch's mean over batch × classes, no ½) by SGD with momentum
0.9, batch 128, η_e = η0/(1 + β·e) per epoch (β = 1/3), Xavier-normal weights, zero biases. Ours:

* **validation split.** ``n_val`` images held out of the *training* set; per (architecture, α) the
  η0 with the best mean final validation accuracy over the seeds is selected, and its test accuracy
  (mean ± std over seeds) is what is reported. The test set is used for nothing else.
* **seeds.** Each seed draws its own w0 and its own batch order (shared by every α and η0 of that
  seed: the runs of one seed differ only in α and η0). The data split is fixed (``data_seed``).
* **the lazy limit three ways**: the network at large α; the true linearized model
  h̄(w) = J(w0)(w − w0) (:class:`lazyfast.Linearized`) trained with the same protocol (with the
  scaled objective its predictor dynamics do not depend on α, so one run per (seed, η0) serves every
  α); and the authors' frozen-pattern surrogate (ReLU and max-pool patterns of the initial network
  with the current weights; :class:`lazyfast.FrozenPatternNet` for VGG, the same construction for the
  ResNet here), evaluated at the end of every network run.
* **precision.** ``dtype`` for every run, except the network runs with α ≥ ``float64_from_alpha``,
  which use float64: the centred output α·(f(w) − f(w0)) cancels two O(1) numbers whose difference is
  O(1/α), so float32 loses about log10(α) of its 7 digits (measured: ``scripts/size_cnn_cpu.py``).
* **divergence.** A run whose loss becomes non-finite stops at once and is marked ``diverged``
  (never selected while a finite η0 exists).

The criterion of the claim is fixed in :func:`verdict` *before* any run; it is computed from the
results, never typed. One run = one (architecture, seed, α, η0), or the linearized model for one
(architecture, seed, η0); finished runs are kept in the resumable run store, so a killed sweep
loses at most the runs in progress. ``python -m lazyfast.experiments.cnn_sweep --preset cpu --out
DIR`` runs a preset (also ``cpu``, which ``lazyfast reproduce`` does not list yet) with optional
parallel worker processes.

One module a concern; every name that other code uses is re-exported here (``cnn_sweep.X``):

* :mod:`~lazyfast.experiments.cnn_sweep.config`: :class:`Config`, the presets, :func:`make_config`,
  :func:`fingerprint` and :func:`run_keys` (the names of the runs in the run store);
* :mod:`~lazyfast.experiments.cnn_sweep.training`: the networks (``lazyfast.vgg11`` /
  ``lazyfast.resnet18`` with divided widths), :func:`load_data`, :func:`pattern_forward`,
  :func:`train_run`, :func:`run_dtype`, :func:`estimate_seconds`;
* :mod:`~lazyfast.experiments.cnn_sweep.summary`: :func:`summarize`, :data:`CRITERION`, :func:`verdict`;
* :mod:`~lazyfast.experiments.cnn_sweep.report`: :func:`table_rows`, :func:`report_markdown`,
  :func:`summary_text`, :func:`gpu_sizing_table`.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time
from typing import List, Optional, Tuple

import torch

from lazyfast.experiments import common
from lazyfast.experiments.cnn_sweep.config import (ARCHS, CPU_PRESET, CPU_RESNET, CPU_VGG, GPU_PRESET, NAME, PRESETS,
                                                   RUN_KINDS, Config, fingerprint, make_config, run_keys)
from lazyfast.experiments.cnn_sweep.report import (gpu_sizing_table, per_alpha_table, report_markdown, summary_text,
                                                   table_rows)
from lazyfast.experiments.cnn_sweep.summary import CRITERION, summarize, verdict
# run looks train_run up here, in this module, at call time: cnn_sweep.train_run can be replaced (a test does);
# _final_network_eval and _mse are used by the tests and scripts/size_cnn_cpu.py
from lazyfast.experiments.cnn_sweep.training import (_final_network_eval, _mse, estimate_seconds,  # noqa: F401
                                                     initial_network, load_data, make_model, pattern_forward,
                                                     pattern_names, run_dtype, train_run)

__all__ = [
    "NAME", "ARCHS", "PRESETS", "RUN_KINDS", "Config", "CPU_PRESET", "CPU_VGG", "CPU_RESNET", "GPU_PRESET",
    "make_config", "fingerprint", "run_keys",
    "make_model", "pattern_forward", "pattern_names", "load_data", "run_dtype", "initial_network", "train_run",
    "estimate_seconds",
    "summarize", "CRITERION", "verdict",
    "table_rows", "per_alpha_table", "gpu_sizing_table", "report_markdown", "summary_text",
    "run", "reproduce", "main",
]


# ----------------------------------------------------------------------------- the sweep
def run(cfg: Optional[Config] = None, store: Optional[common.RunStore] = None, *, shard: Tuple[int, int] = (0, 1),
        extra_stores: Tuple[common.RunStore, ...] = ()) -> dict:
    """Runs (or resumes) the sweep and returns its result dict. ``shard=(k, n)`` computes only every
    n-th run from the k-th (a worker process); runs found in ``store`` or ``extra_stores`` (other
    workers' stores) are reused, never recomputed."""
    cfg = cfg or Config.quick()
    cfg.validate()
    k, nshard = shard
    if not (isinstance(nshard, int) and nshard >= 1 and isinstance(k, int) and 0 <= k < nshard):
        raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard!r}")
    store = common.RunStore() if store is None else store
    if cfg.device == "cuda":
        # α·(f(w) − f(w0)) cancels O(1) numbers to O(1/α): TF32's 10-bit mantissa would round the lazy
        # updates away (this process runs the sweep only, so the process-wide switch is what is meant)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    data = load_data(cfg)  # fails early, with how-to, when the dataset is missing
    keys = run_keys(cfg)
    runs = {}
    todo = [(i, key, spec) for i, (key, spec) in enumerate(keys) if i % nshard == k]
    for i, key, spec in common.progress(todo, desc=f"{NAME} runs", enabled=cfg.show_progress):
        found = next((s for s in (store,) + tuple(extra_stores) if key in s), None)
        if found is not None:
            runs[key] = found.get(key)
            continue
        ai, seed, kind, alpha, lr = spec
        runs[key] = store.run(key, lambda: train_run(cfg, ai, seed, kind, alpha, lr, data))
    result = {"experiment": NAME, "config": common.config_dict(cfg), "dataset": data["name"],
              "n_train": int(data["x_train"].shape[0]), "n_val": int(data["x_val"].shape[0]),
              "n_test": int(data["x_test"].shape[0])}
    if nshard > 1:
        result["shard"] = [k, nshard]
        result["runs"] = list(runs.values())
        return result
    result["runs"] = [runs[key] for key, _ in keys]
    result["summary"] = summarize(cfg, result["runs"], result["n_test"])
    result["verdict"] = verdict(cfg, result["summary"])
    return result


# ----------------------------------------------------------------------------- worker processes and command line
def _other_stores(out: str, mine: str) -> Tuple[common.RunStore, ...]:
    """Read-only views of every run store already in ``out`` other than ``mine`` (runs.jsonl and the
    shard stores of any earlier worker count), so no finished run is ever computed twice."""
    paths = sorted(glob.glob(os.path.join(out, "runs.jsonl")) + glob.glob(os.path.join(out, "runs.shard*of*.jsonl")))
    return tuple(common.RunStore(p) for p in paths if os.path.abspath(p) != os.path.abspath(mine))


def _store_paths(out: str, nshard: int) -> List[str]:
    return [os.path.join(out, "runs.jsonl")] + [os.path.join(out, f"runs.shard{k}of{nshard}.jsonl")
                                                 for k in range(nshard) if nshard > 1]


def reproduce(preset: str = "cpu", out: Optional[str] = None, *, workers: int = 1, threads: int = 1,
              plot: bool = True, **overrides) -> dict:
    """Runs (or resumes) a preset into ``out``: ``workers`` processes of ``threads`` torch threads
    each compute every ``workers``-th run into their own store ``out/runs.shardKofN.jsonl``; then this
    process collects every store (computing in ``out/runs.jsonl`` whatever is still missing) and writes
    ``results.json`` and the figures. Rerunning the same command resumes."""
    cfg = make_config(preset, **overrides)
    common.check_positive(workers, "workers", integer=True)
    common.check_positive(threads, "threads", integer=True)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    extra = ()
    if out and workers > 1:
        os.makedirs(out, exist_ok=True)
        procs = []
        for k in range(workers):
            args = [sys.executable, "-m", "lazyfast.experiments.cnn_sweep", "--preset", preset, "--out", out,
                    "--shard", f"{k}/{workers}", "--threads", str(threads)]
            for key, val in overrides.items():
                if val is not None:
                    args += ["--set", f"{key}={json.dumps(val)}"]
            log = open(os.path.join(out, f"worker{k}.log"), "a", encoding="utf-8")
            procs.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), log))
        codes = []
        for p, log in procs:
            codes.append(p.wait())
            log.close()
        if any(codes):
            raise RuntimeError(f"{NAME}: worker exit codes {codes}; see {out}/worker*.log (rerun to resume)")
    if out:
        extra = _other_stores(out, os.path.join(out, "runs.jsonl"))
    store = common.RunStore(os.path.join(out, "runs.jsonl") if out else None)
    result = run(cfg, store, extra_stores=extra)
    result["preset"] = preset
    result["wall_seconds"] = time.perf_counter() - t0
    result["machine"] = _machine()
    if out:
        os.makedirs(out, exist_ok=True)
        files = []
        if plot:
            from lazyfast.experiments import plots  # here, not at the top: it needs matplotlib (optional)

            files = [plots.plot_cnn_sweep(result, os.path.join(out, f"{NAME}.png"))]
        result["files"] = [os.path.relpath(p, out) for p in files]
        tmp = os.path.join(out, "results.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(common.json_safe(result), f, indent=1, allow_nan=False)
        os.replace(tmp, os.path.join(out, "results.json"))
    return result


def _machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg_at_end": load,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lazyfast.experiments.cnn_sweep",
                                description="VGG-11 / ResNet-18 at scale α with seeds, validation-selected η0 "
                                            "and the lazy limit three ways (resumable; rerun to resume).")
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--out", default=None, help="output directory (run stores, results.json, figures)")
    p.add_argument("--report", default=None, metavar="RESULTS_JSON",
                   help="print the markdown of docs/REPRODUCTION.md for a results.json and exit")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # K/N: one worker (internal)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config option (JSON value)")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report, encoding="utf-8") as f:
            print(report_markdown(json.load(f)))
        return 0
    if not args.out:
        p.error("--out is required (or --report)")
    overrides = {}
    for item in args.set or ():
        if "=" not in item:
            p.error(f"--set expects key=value, got {item!r}")
        key, val = item.split("=", 1)
        try:
            overrides[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            overrides[key.strip()] = val
    try:
        if args.shard:
            k, n = (int(v) for v in args.shard.split("/"))
            cfg = make_config(args.preset, **overrides)
            torch.set_num_threads(args.threads)
            path = _store_paths(args.out, n)[1 + k]
            res = run(cfg, common.RunStore(path), shard=(k, n), extra_stores=_other_stores(args.out, path))
            print(f"shard {k}/{n}: {len(res['runs'])} runs done")
            return 0
        result = reproduce(args.preset, args.out, workers=args.workers, threads=args.threads, **overrides)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"{NAME}: error: {e}", file=sys.stderr)
        return 2
    print(summary_text(result))
    print(f"\nwrote {os.path.join(args.out, 'results.json')}" +
          "".join(f"\nwrote {os.path.join(args.out, f)}" for f in result.get("files", [])))
    return 0
