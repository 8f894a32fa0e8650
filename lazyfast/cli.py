"""The ``lazyfast`` command line: thin layer over library functions."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _cmd_info(args) -> int:
    import lazyfast

    info = lazyfast.backend_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def _cmd_demo(args) -> int:
    import torch

    import lazyfast
    from lazyfast.data import teacher_student

    print("== lazyfast backend ==")
    for k, v in lazyfast.backend_info().items():
        print(f"  {k}: {v}")
    data = teacher_student(args.n, args.n, args.d, seed=args.seed)
    torch.manual_seed(args.seed)
    model = lazyfast.TwoLayer(args.d, args.m, activation="relu", symmetric=True, dtype=torch.float64)
    x = data["x_train"]
    t0 = time.perf_counter()
    K = lazyfast.empirical_ntk(model, x)
    t1 = time.perf_counter()
    ev = torch.linalg.eigvalsh(K)
    print(f"\n== eNTK of TwoLayer(d={args.d}, m={args.m}, relu, symmetric) on {args.n} sphere points ==")
    print(f"  time: {t1 - t0:.3f} s   shape: {tuple(K.shape)}   symmetric: {bool(torch.allclose(K, K.T))}")
    print(f"  trace/n: {K.trace().item() / args.n:.4f}   eigenvalues: max {ev[-1].item():.4f}, "
          f"min {ev[0].item():.3e}, condition {ev[-1].item() / max(ev[0].item(), 1e-300):.3e}")
    # Kernel regression with the eNTK at init = the limit of lazy training (f(w0) = 0 here).
    y = data["y_train"][:, 0]
    alpha = torch.linalg.solve(K + 1e-8 * torch.eye(args.n, dtype=K.dtype), y)
    K_test = lazyfast.empirical_ntk(model, data["x_test"], x)
    pred = K_test @ alpha
    test_mse = torch.mean((pred - data["y_test"][:, 0]) ** 2).item()
    print(f"  kernel regression test MSE: {test_mse:.4e} (variance of targets {data['y_test'].var().item():.4e})")
    return 0


def _parse_set(items):
    """``--set key=value`` pairs → dict (values parsed as JSON when possible: 3, 0.5, [1,2], true)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise SystemExit(f"lazyfast reproduce: --set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _cmd_reproduce(args) -> int:
    from lazyfast.experiments import runner

    overrides = _parse_set(args.set)
    for key in ("seed", "device", "dtype", "data_dir"):
        val = getattr(args, key)
        if val is not None:
            overrides[key] = val
    out = args.out if args.out is not None else os.path.join("results", args.name, args.preset)
    try:
        result = runner.reproduce(args.name, args.preset, out, threads=args.threads, **overrides)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"lazyfast reproduce {args.name}: error: {e}", file=sys.stderr)
        return 2
    print(runner.summary_text(result))
    print(f"\nwrote {os.path.join(out, runner.RESULTS_FILE)}" +
          "".join(f"\nwrote {os.path.join(out, f)}" for f in result.get("files", [])))
    return 0


def _add_reproduce(sub) -> None:
    from lazyfast.experiments import EXPERIMENTS

    names = list(EXPERIMENTS)
    pr = sub.add_parser(
        "reproduce", help="reproduce an experiment of Chizat, Oyallon & Bach (2019)",
        description="Reproduce an experiment of the paper. Experiments: " + ", ".join(names) +
                    ". 'demo' runs the quick presets of cover, tau-sweep and rates and prints a table.")
    pr.add_argument("name", choices=names, help="experiment")
    pr.add_argument("--preset", choices=("quick", "paper"), default="quick", help="size preset (default quick)")
    pr.add_argument("--out", default=None, help="output directory (default results/NAME/PRESET); "
                                                "finished runs in OUT/runs.jsonl are skipped on rerun")
    pr.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    pr.add_argument("--device", choices=("cpu", "cuda"), default=None)
    pr.add_argument("--dtype", choices=("float32", "float64"), default=None)
    pr.add_argument("--data-dir", dest="data_dir", default=None,
                    help="cnn-alpha / kernel-spectrum: CIFAR-10 python-version batches (default: Fashion-MNIST "
                         "from /usr/share/datasets/fashion-mnist)")
    pr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for the two-layer experiments and the demo, "
                                                          "torch's default for the CNN ones)")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override any config option, e.g. --set ntrials=3 --set 'taus=[0.1,1]'")
    pr.set_defaults(func=_cmd_reproduce)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lazyfast", description="Fast eNTKs and lazy training for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="print what is compiled (backend_info)")
    pi.add_argument("--json", action="store_true", help="print JSON")
    pi.set_defaults(func=_cmd_info)
    pd = sub.add_parser("demo", help="a small eNTK + kernel regression on synthetic teacher-student data")
    pd.add_argument("--n", type=int, default=200, help="samples")
    pd.add_argument("--d", type=int, default=10, help="input dimension")
    pd.add_argument("--m", type=int, default=512, help="width")
    pd.add_argument("--seed", type=int, default=0)
    pd.set_defaults(func=_cmd_demo)
    _add_reproduce(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
