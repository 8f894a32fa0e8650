"""The ``lazyfast`` command line: thin layer over library functions.

Every subcommand reports a bad argument or an unusable file the same way: one line
``lazyfast <command>: error: <message>`` on stderr and exit status 2 (argparse's own usage
errors also exit 2); no traceback.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import torch

import lazyfast
from lazyfast import bench, models
from lazyfast._store import IntegrityError, atomic_write, check_writable
from lazyfast.data import sphere, teacher_student
from lazyfast.distributed import distributed_ntk, init_from_env, rank_and_world, shutdown
from lazyfast.experiments import EXPERIMENTS, common, runner


class CLIError(Exception):
    """A bad argument or input file: printed as ``lazyfast <cmd>: error: ...``, exit 2."""


def _int_arg(minimum):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    parse.__name__ = "positive int" if minimum == 1 else f"int >= {minimum}"
    return parse


def _widths_arg(text):
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints (e.g. 512,512), got {text!r}")
    out = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, {p!r} is not an int") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"widths must be positive, got {v}")
        out.append(v)
    return out


_POS = _int_arg(1)
_NONNEG = _int_arg(0)


def _cmd_info(args) -> int:
    info = lazyfast.backend_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def _cmd_example(args) -> int:
    if args.n < 2:
        raise CLIError(f"--n must be >= 2 (train and test points for the kernel regression), got {args.n}")
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


def _build_model(args):
    torch.manual_seed(args.seed)  # every rank builds the same parameters
    if args.model.endswith((".pt", ".pth")):
        if not os.path.isfile(args.model):
            raise CLIError(f"--model {args.model}: no such file")
        try:
            # weights_only=False: the file holds a whole pickled module (torch.save(model, path)),
            # which the safe weights-only unpickler refuses; a .pt given here is trusted code.
            model = torch.load(args.model, map_location="cpu", weights_only=False)
        except (AttributeError, ModuleNotFoundError, ImportError) as e:
            raise CLIError(f"--model {args.model}: cannot load it ({type(e).__name__}: {e}); a pickled module "
                           "loads only where its class can be imported: define it in a module on the Python "
                           "path, not in the __main__ script that saved it") from None
        except Exception as e:
            raise CLIError(f"--model {args.model}: cannot load it ({type(e).__name__}: {e})") from None
        if not isinstance(model, torch.nn.Module):
            raise CLIError(f"--model {args.model}: the file does not hold a pickled torch.nn.Module")
        return model
    if args.model == "twolayer":
        return models.TwoLayer(args.d, args.m, args.k, activation=args.activation, bias=args.bias)
    if args.model == "mlp":
        return models.MLP(args.d, args.widths, args.k, activation=args.activation, bias=args.bias)
    if args.model in ("vgg11", "resnet18"):
        return getattr(models, args.model)(num_classes=args.k, in_channels=args.channels)
    raise CLIError(f"--model must be twolayer, mlp, vgg11, resnet18 or a .pt file, got {args.model!r}")


def _load_inputs(args, model):
    if args.data and args.synthetic:
        raise CLIError("give --data FILE.pt or --synthetic N, not both")
    if args.data:
        if not os.path.isfile(args.data):
            raise CLIError(f"--data {args.data}: no such file")
        try:
            obj = torch.load(args.data, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CLIError(f"--data {args.data}: cannot load it ({type(e).__name__}: {e})") from None
        x2 = None
        if isinstance(obj, dict) and "x1" in obj:
            obj, x2 = obj["x1"], obj.get("x2")
        if not isinstance(obj, torch.Tensor) or not (x2 is None or isinstance(x2, torch.Tensor)):
            raise CLIError(f"--data {args.data}: expected a tensor or a dict with 'x1' (and optional 'x2') tensors")
        for name, t in (("x1", obj), ("x2", x2)):
            # integer inputs (token ids) go to the model as they are, as lazyfast.empirical_ntk takes them
            if t is not None and (t.dtype == torch.bool or t.is_complex()):
                raise CLIError(f"--data {args.data}: {name} must be a floating-point tensor, or an integer one "
                               f"(token ids) for a model that takes them; got dtype {t.dtype}")
        return obj, x2
    if not args.synthetic:
        raise CLIError("give --data FILE.pt or --synthetic N")
    g = torch.Generator().manual_seed(args.seed + 1)
    if args.model in ("vgg11", "resnet18"):
        return torch.randn(args.synthetic, args.channels, 32, 32, generator=g), None

    return sphere(args.synthetic, args.d, generator=g, dtype=torch.float32), None


def _cmd_ntk(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if args.in_memory and args.no_gather:
        raise CLIError("--in-memory with --no-gather would compute the kernel and keep nothing")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out}: exists and is not a directory")
    created = init_from_env(args.backend)
    try:
        dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
        model = _build_model(args).to(dtype)
        x1, x2 = _load_inputs(args, model)
        # --dtype casts real inputs only: integer inputs (token ids for an nn.Embedding) stay integers
        x1 = x1.to(dtype) if x1.is_floating_point() else x1
        x2 = x2.to(dtype) if x2 is not None and x2.is_floating_point() else x2
        if args.device == "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
            model, x1 = model.to(dev), x1.to(dev)
            x2 = None if x2 is None else x2.to(dev)
        t0 = time.perf_counter()
        res = distributed_ntk(model, x1, x2, mode=args.mode, implementation=args.implementation,
                              block_size=args.block_size, out_dir=None if args.in_memory else args.out,
                              gather=not args.no_gather, overwrite=args.overwrite,
                              progress=not args.quiet)
        rank, world = rank_and_world()
        # One write per report, so lines of different ranks do not interleave mid-line.
        sys.stdout.write(f"rank {rank}/{world}: computed blocks {res.computed_blocks}, skipped (already on disk) "
                         f"{res.skipped_blocks}, of {res.n_blocks}, in {time.perf_counter() - t0:.2f} s\n")
        sys.stdout.flush()
        if res.kernel is not None:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, "kernel.pt")

            buf = io.BytesIO()
            torch.save(res.kernel, buf)
            atomic_write(path, buf.getvalue())
            print(f"kernel {tuple(res.kernel.shape)} {res.kernel.dtype} -> {path}")
    finally:
        if created:
            shutdown()
    return 0


def _parse_set(items):
    """``--set key=value`` pairs → dict (values parsed as JSON when possible: 3, 0.5, [1,2], true)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise CLIError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _cmd_reproduce(args) -> int:
    overrides = _parse_set(args.set)
    for key in ("seed", "device", "dtype", "data_dir"):
        val = getattr(args, key)
        if val is not None:
            overrides[key] = val
    out = args.out if args.out is not None else os.path.join("results", args.name, args.preset)
    result = runner.reproduce(args.name, args.preset, out, threads=args.threads, **overrides)
    print(runner.summary_text(result))
    print(f"\nwrote {os.path.join(out, runner.RESULTS_FILE)}" +
          "".join(f"\nwrote {os.path.join(out, f)}" for f in result.get("files", [])))
    return 0


def _add_reproduce(sub) -> None:
    names = list(EXPERIMENTS)
    pr = sub.add_parser(
        "reproduce", help="reproduce an experiment of Chizat, Oyallon & Bach (2019)",
        description="Reproduce an experiment of the paper. Experiments: " + ", ".join(names) +
                    ". 'demo' runs the quick presets of cover, tau-sweep and rates and prints a table.")
    pr.add_argument("name", choices=names, help="experiment")
    pr.add_argument("--preset", choices=common.PRESETS, default="quick",
                    help="size preset (default quick; cpu, cpu-vgg, cpu-resnet: cnn-sweep only)")
    pr.add_argument("--out", default=None, help="output directory (default results/NAME/PRESET); "
                                                "finished runs in OUT/runs.jsonl are skipped on rerun")
    pr.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    pr.add_argument("--device", choices=("cpu", "cuda"), default=None)
    pr.add_argument("--dtype", choices=("float32", "float64"), default=None)
    pr.add_argument("--data-dir", dest="data_dir", default=None,
                    help="cnn-alpha / kernel-spectrum: CIFAR-10 python-version batches (default: Fashion-MNIST "
                         "from /usr/share/datasets/fashion-mnist)")
    pr.add_argument("--threads", type=_POS, default=None, help="torch CPU threads (default: 1 for the two-layer experiments and the demo, "
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
    pd = sub.add_parser("example", help="a small eNTK + kernel regression on synthetic teacher-student data "
                                        "(the paper's experiments: `lazyfast reproduce`)")
    pd.add_argument("--n", type=_POS, default=200, help="samples")
    pd.add_argument("--d", type=_POS, default=10, help="input dimension")
    pd.add_argument("--m", type=_POS, default=512, help="width")
    pd.add_argument("--seed", type=int, default=0)
    pd.set_defaults(func=_cmd_example)
    pn = sub.add_parser("ntk", help="block-partitioned eNTK, one file per block (run under torchrun to distribute)",
                        description="Computes Θ(x1, x2) in row blocks; under torchrun each rank takes every "
                                    "WORLD_SIZE-th block. Finished blocks in --out are skipped on restart. "
                                    "(Option names avoid prefixes of torchrun's own options.)")
    pn.add_argument("--model", default="twolayer",
                    help="twolayer | mlp | vgg11 | resnet18 | a .pt file of a whole module (torch.save(model, path); "
                         "its class must be importable)")
    pn.add_argument("--input-dim", dest="d", type=_POS, default=100, help="input dimension (twolayer/mlp)")
    pn.add_argument("--width", dest="m", type=_POS, default=1024, help="width (twolayer)")
    pn.add_argument("--widths", type=_widths_arg, default=[512, 512], help="comma-separated hidden widths (mlp)")
    pn.add_argument("--outputs", dest="k", type=_POS, default=1, help="outputs (classes for CNNs)")
    pn.add_argument("--channels", type=_POS, default=3, help="input channels (CNNs)")
    pn.add_argument("--activation", default="relu", choices=["identity", "relu", "tanh", "gelu", "softplus"])
    pn.add_argument("--bias", action="store_true")
    pn.add_argument("--data", help="a .pt file holding x1, or a dict with x1 and optional x2 (floating-point "
                                   "tensors, cast to --dtype, or integer ones such as token ids, kept as they are)")
    pn.add_argument("--synthetic", type=_NONNEG, default=0, help="use N synthetic inputs instead of --data")
    pn.add_argument("--mode", default="trace", choices=["trace", "full"])
    pn.add_argument("--implementation", default="auto", choices=["auto", "fused", "structured", "jacobian", "ntk_vp"])
    pn.add_argument("--block-size", type=_POS, default=256)
    pn.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    pn.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    pn.add_argument("--backend", default=None, choices=[None, "gloo", "nccl"], help="process-group backend")
    pn.add_argument("--seed", type=int, default=0)
    pn.add_argument("--out", required=True, help="output directory (shards, manifest.json, kernel.pt)")
    pn.add_argument("--no-gather", action="store_true", help="only write the shards")
    pn.add_argument("--in-memory", action="store_true",
                    help="no shard files: gather the blocks to rank 0 (not resumable)")
    pn.add_argument("--overwrite", action="store_true", help="replace shards of a different problem in --out")
    pn.add_argument("--quiet", action="store_true", help="no progress line per block (on stderr)")
    pn.set_defaults(func=_cmd_ntk)
    sub.add_parser("bench", help="benchmark lazyfast against its pure-PyTorch baselines (lazyfast bench --help)",
                   add_help=False)
    _add_reproduce(sub)
    return p


def _bench(argv) -> int:
    for flag in ("--json", "--markdown"):  # output paths checked before minutes of benchmarking
        for i, a in enumerate(argv):
            path = argv[i + 1] if a == flag and i + 1 < len(argv) else a[len(flag) + 1:] if a.startswith(flag + "=") else None
            if path:
                try:
                    check_writable(path, flag)
                except ValueError as e:
                    raise CLIError(str(e)) from None
    return bench.main(argv)


def _guarded(command: str, fn, *a) -> int:
    """Runs a subcommand; bad arguments and unusable files become one ``error:`` line, exit 2."""

    try:
        return int(fn(*a) or 0)
    except CLIError as e:
        msg = str(e)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        msg = str(e.code)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, IntegrityError) as e:
        msg = str(e)
    except RuntimeError as e:  # e.g. device='cuda' requested without CUDA, a missing data set
        msg = str(e)
    print(f"lazyfast {command}: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser (lazyfast.bench), so `lazyfast bench --help` is complete
        return _guarded("bench", _bench, argv[1:])
    args = build_parser().parse_args(argv)
    name = args.command + (f" {args.name}" if args.command == "reproduce" else "")
    return _guarded(name, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
