"""The ``lazyfast`` command line: thin layer over library functions."""
from __future__ import annotations

import argparse
import json
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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
