"""Issue 14's table: eNTK of the models users bring, lazyfast against the torch.func tutorial
and the PyTorch peers, every method by one protocol, with agreement against float64.

Run (one line; the peers' venv is optional, see docs/benchmarks-models.md):

    python benchmarks/bench_models.py --peers-python /work/peers-venv/bin/python [--rounds 5] [--rows a,b]

Protocol, identical for every method: per row, each method runs in its own child process, kept
for the whole row (so its peak memory is its own, and the peers run in their own venv), that builds
the model and inputs from fixed seeds (:mod:`lazyfast.zoo`; bit-identical in every process) and makes
one warm-up call (its peak resident memory is measured with benchmarks/_memory.py); then the parent
times every method of the row in ``--rounds`` interleaved rounds (A B C A B C ...: each round asks
each child, in the same order, for one timed call, which the child times itself; before the next
call the parent waits until the last child's threads are idle: OpenMP workers spin on for tens of ms
after a call and would take a core from the next method, see :func:`settle`). A method's time is
its median over the rounds; its ratio to ``lazyfast auto`` is the median of the per-round ratios
(its time over auto's in the same round), with their min–max; every round's times and ratios are
kept in the JSON (:func:`lazyfast.bench.protocol.interleaved_rounds`, ``ratio_summary``). A row may
set ``rounds=0``: its one warm-up call is the measurement (calls of minutes). A child whose warm-up
or timed call exceeds ``--timeout`` is recorded as timed out (its earlier rounds kept). The kernel
of every method is compared with the float64 kernel of the same model (a float64 copy) on the same
inputs, computed by the tutorial's method; for the large CNNs on an evenly spread subset of the
samples (the subset's block of the n×n kernel; recorded). A method whose relative error exceeds
``WRONG_TOL`` is marked wrong and never counts as the best peer. Peers (nngeometry, Opacus,
BackPACK) run in ``--peers-python`` (same torch version; lazyfast is imported from this checkout
through PYTHONPATH); a missing package is recorded as "not installed", a peer that raises as
"failed: <message>".

Outputs benchmarks/results/models_cpu.json and .md (or ``--out``), stamped with the machine,
CPU count, load average before/after, date, git commit, torch version and thread count.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WRONG_TOL = 1e-3  # relative error vs float64 above which a method is "wrong" (float32 noise is ~1e-6)
F32_TARGET = 1e-5  # issue 14: float32 kernels within 1e-5 of the float64 kernel
MIN_PUBLISHED_ROUNDS = 5  # results written under benchmarks/results/ need at least this many rounds

LAZYFAST = ("lazyfast auto", "lazyfast structured", "layerwise_ntk")
TUTORIAL = "torch.func tutorial (J once)"
PEERS = ("nngeometry GramMatrix", "Opacus GradSampleModule + GEMM", "BackPACK BatchGrad + GEMM")
ALL_METHODS = LAZYFAST + (TUTORIAL,) + PEERS
# Not a kernel: the cost of one forward + one backward (all parameter gradients) plus one GEMM
# J·Jᵀ of a random J the size of the Jacobian; a lower bound for any method that forms per-example
# gradients and contracts them (the tutorial's, Opacus', BackPACK's, and lazyfast's jacobian order).
FLOOR = "floor: forward + backward + J·Jᵀ GEMM (not a kernel)"
# lazyfast auto on the same network built as a lazyfast.MLP (weights copied), in the nn.Sequential MLP's
# row: the target "auto within 1.2× of lazyfast.MLP" from per-round ratios (the mlp_as_lazyfast row
# measures the same network alone, in its own rounds)
TWIN_MLP = "lazyfast auto on lazyfast.MLP (weights copied)"
TWIN_MODEL = {"mlp1024": "lazyfast_mlp1024"}
PEER_PKG = {"nngeometry GramMatrix": "nngeometry", "Opacus GradSampleModule + GEMM": "opacus",
            "BackPACK BatchGrad + GEMM": "backpack"}


def R(id, model, n, mode, methods=ALL_METHODS, check_n=None, note="", rounds=None):
    """A row; ``rounds=0``: the one warm-up call is the measurement (for calls of minutes, where
    warm-up effects are negligible; no rounds, no ratios)."""
    return dict(id=id, model=model, n=n, mode=mode, methods=list(methods), check_n=check_n, note=note,
                rounds=rounds)


ROWS_FULL = [
    R("mlp", "mlp1024", 256, "trace", ALL_METHODS + (TWIN_MLP,), check_n=32,
      note="nn.Sequential MLP 100→1024³→1"),
    R("mlp_as_lazyfast", "lazyfast_mlp1024", 256, "trace", ("lazyfast auto",), check_n=32,
      note="the same network as lazyfast.MLP (weights copied)"),
    R("mlp_k10_full", "mlp1024_k10", 32, "full", note="same MLP, 10 outputs"),
    R("shared", "shared_linear", 256, "trace", check_n=64, note="one Linear(512, 512) applied twice + head"),
    R("vgg11_16_trace", "vgg11", 16, "trace", check_n=8, note="lazyfast.vgg11(), 10 outputs"),
    R("vgg11_16_full", "vgg11", 16, "full", check_n=8, note="lazyfast.vgg11(), 10 outputs"),
    # peers are not run at n=64: at n=16 nngeometry takes 119 s a call (≈ 16× that at n=64) and
    # Opacus peaks at 17.5 GB (≈ 4× that at n=64, beyond this machine)
    R("vgg11_64_trace", "vgg11", 64, "trace", LAZYFAST + (TUTORIAL,), check_n=8,
      note="lazyfast.vgg11(), 10 outputs (peers not run: minutes / > 24 GB)"),
    R("vgg11_64_full", "vgg11", 64, "full", LAZYFAST + (TUTORIAL,), check_n=8,
      note="lazyfast.vgg11(), 10 outputs (peers not run: minutes / > 24 GB)"),
    R("resnet18", "resnet18", 8, "trace", check_n=8, note="lazyfast.resnet18() (BN-free), 10 outputs"),
    R("tv_resnet18", "tv_resnet18", 8, "trace", check_n=8,
      note="torchvision-architecture resnet18(num_classes=10), BatchNorm, eval"),
    R("transformer", "transformer", 64, "trace", ALL_METHODS + (FLOOR,),
      note="2-layer nn.TransformerEncoder d=128 + head, seq 16"),
    R("token_transformer", "token_transformer", 64, "trace", ALL_METHODS + (FLOOR,),
      note="Embedding(1000, 128) on token ids + the same"),
    R("vgg11_1000_trace", "vgg11", 1000, "trace", ("lazyfast auto",), check_n=16, rounds=0,
      note="VGG-11 n=1000: time and peak memory (target ≤ 4 GB); one call"),
]
ROWS_QUICK = [
    R("mlp", "tiny_mlp", 64, "trace"),
    R("mlp_k3_full", "tiny_mlp_k3", 16, "full"),
    R("shared", "tiny_shared", 64, "trace"),
    R("cnn_full", "tiny_cnn", 16, "full"),
    R("transformer", "tiny_transformer", 16, "trace"),
    R("token_transformer", "tiny_tokens", 16, "trace"),
]


# ----------------------------------------------------------------------------- methods (child side)
def tutorial_ntk(model, x, mode, budget_bytes, info=None):
    """The torch.func NTK tutorial's method: per-sample Jacobians by vmap(jacrev) for the whole
    batch, built once (x2 = x1), contracted per parameter tensor with the tutorial's einsum.
    Only when the Jacobian does not fit in ``budget_bytes``: blocks of c samples, upper block
    triangle only (each block's Jacobian recomputed as the outer loop needs it)."""
    import torch
    from lazyfast import reference

    f, params = reference.functional_model(model)
    with torch.no_grad():
        k = f(params, x[:1]).shape[1]
    P = sum(p.numel() for p in params.values())
    item = next(iter(params.values())).element_size()
    n = x.shape[0]

    def contract(j1, j2):
        out = None
        for name, a in j1.items():
            b = j2[name]
            a = a.reshape(a.shape[0], a.shape[1], -1)
            b = b.reshape(b.shape[0], b.shape[1], -1)
            t = torch.einsum("Naf,Mbf->NMab", a, b) if mode == "full" else torch.einsum("Naf,Maf->NM", a, b) / k
            out = t if out is None else out + t
        return out

    if n * k * P * item <= budget_bytes:
        if info is not None:
            info["tutorial"] = "whole batch"
        j = reference.jacobian(model, x)
        return contract(j, j)
    c = max(1, int(budget_bytes // (2 * k * P * item)))
    if info is not None:
        info["tutorial"] = f"chunked: Jacobian of {n} samples ({n * k * P * item / 2**30:.1f} GiB) exceeds " \
                           f"the {budget_bytes / 2**30:.0f} GiB budget; blocks of {c} samples, upper triangle"
    shape = (n, n) if mode == "trace" else (n, n, k, k)
    out = torch.zeros(shape, dtype=next(iter(params.values())).dtype)
    starts = list(range(0, n, c))
    for s1 in starts:
        e1 = min(s1 + c, n)
        j1 = reference.jacobian(model, x[s1:e1])
        out[s1:e1, s1:e1] = contract(j1, j1)
        for s2 in starts:
            if s2 <= s1:
                continue
            e2 = min(s2 + c, n)
            blk = contract(j1, reference.jacobian(model, x[s2:e2]))
            out[s1:e1, s2:e2] = blk
            out[s2:e2, s1:e1] = blk.transpose(0, 1) if mode == "trace" else blk.permute(1, 0, 3, 2)
    return out


def _from_jacobians(jac_list, mode):
    """(k per-output (n, P) Jacobians) → kernel with one GEMM."""
    import torch

    J = torch.stack(jac_list)  # (k, n, P)
    k, n, P = J.shape
    if mode == "trace":
        Jt = J.permute(1, 0, 2).reshape(n, k * P)
        return (Jt @ Jt.T) / k
    Jf = J.reshape(k * n, P)
    return (Jf @ Jf.T).reshape(k, n, k, n).permute(1, 3, 0, 2).contiguous()


def nngeometry_ntk(model, x, mode, info=None):
    """nngeometry's Gram matrix as its docs use it: GramMatrix(model, loader) → FMatDense (k, n, k, n),
    one loader batch holding all samples (the fewest outer loops)."""
    import torch
    from nngeometry import GramMatrix
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x), batch_size=x.shape[0])
    G = GramMatrix(model, loader).data  # (k, n, k, n)
    full = G.permute(1, 3, 0, 2)
    return full.contiguous() if mode == "full" else torch.diagonal(full, dim1=2, dim2=3).mean(-1)


def _k_of(model, x):
    import torch

    with torch.no_grad():
        return model(x[:1]).reshape(1, -1).shape[1]


def opacus_prepare(model, info=None):
    """GradSampleModule(model, loss_reduction='sum'); if Opacus refuses the model, its documented
    fix (ModuleValidator.fix, e.g. DPMultiheadAttention for nn.MultiheadAttention) first."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    m = copy.deepcopy(model)
    errors = ModuleValidator.validate(m, strict=False)
    if errors:
        m = ModuleValidator.fix(m)
        if info is not None:
            info["opacus"] = ("ModuleValidator.fix applied (" + "; ".join(sorted({type(e).__name__ + ": " + str(e)[:60]
                                                                                 for e in errors})) + ")")
    if not model.training and info is not None:
        info["opacus_mode"] = "run in train mode (Opacus captures activations only in training mode)"
    return GradSampleModule(m.train(), loss_reduction="sum")


def opacus_ntk(gsm, x, mode):
    """Per-sample gradients (p.grad_sample) of each output: one forward + backward per output
    (Opacus consumes the captured activations in the backward), then one GEMM."""
    import torch

    k = None
    jacs = []
    a = 0
    while k is None or a < k:
        gsm.zero_grad(set_to_none=True)
        out = gsm(x).reshape(x.shape[0], -1)
        k = out.shape[1]
        out[:, a].sum().backward()
        jacs.append(torch.cat([p.grad_sample.reshape(x.shape[0], -1) for p in gsm.parameters()
                               if p.requires_grad], 1))
        a += 1
    gsm.zero_grad(set_to_none=True)
    return _from_jacobians(jacs, mode)


def backpack_prepare(model):
    from backpack import extend
    from torch import nn

    m = copy.deepcopy(model)
    return extend(m, use_converter=not isinstance(model, nn.Sequential))


def backpack_ntk(m, x, mode):
    """BackPACK BatchGrad (p.grad_batch): one forward, one backward per output (retain_graph), then one GEMM."""
    import torch
    from backpack import backpack
    from backpack.extensions import BatchGrad

    out = m(x).reshape(x.shape[0], -1)
    k = out.shape[1]
    jacs = []
    params = [p for p in m.parameters() if p.requires_grad]
    for a in range(k):
        for p in params:
            p.grad = None
        keep = a < k - 1
        with backpack(BatchGrad(), retain_graph=keep):
            out[:, a].sum().backward(retain_graph=keep)
        missing = [name for name, p in m.named_parameters() if p.requires_grad and getattr(p, "grad_batch", None) is None]
        if missing:
            raise NotImplementedError(f"BackPACK computed no grad_batch for {missing[:3]}")
        jacs.append(torch.cat([p.grad_batch.reshape(x.shape[0], -1) for p in params], 1))
    return _from_jacobians(jacs, mode)


def make_method(method, model, x, mode, budget, info, model_name=None):
    """A zero-argument callable computing the (n, n) / (n, n, k, k) kernel (``model_name``: the
    row's :mod:`lazyfast.zoo` name, for the methods that build a twin of the model)."""
    import lazyfast

    if method == "lazyfast auto":
        return lambda: lazyfast.empirical_ntk(model, x, None, mode=mode)
    if method == "lazyfast structured":
        return lambda: lazyfast.empirical_ntk(model, x, None, mode=mode, implementation="structured")
    if method == "layerwise_ntk":
        return lambda: lazyfast.kernels.layerwise_ntk(model, x, None, mode=mode)
    if method == TUTORIAL:
        return lambda: tutorial_ntk(model, x, mode, budget, info)
    if method == TWIN_MLP:
        from lazyfast import zoo

        if model_name not in TWIN_MODEL:
            raise ValueError(f"{method!r} is defined for the models {sorted(TWIN_MODEL)} only")
        twin = zoo.build(TWIN_MODEL[model_name])
        return lambda: lazyfast.empirical_ntk(twin, x, None, mode=mode)
    if method == FLOOR:
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        k = _k_of(model, x)
        J = torch.randn(x.shape[0] * k, sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))

        def floor():
            torch.autograd.grad(model(x).sum(), params)
            return J @ J.T

        return floor
    if method == "nngeometry GramMatrix":
        return lambda: nngeometry_ntk(model, x, mode, info)
    if method == "Opacus GradSampleModule + GEMM":
        gsm = opacus_prepare(model, info)
        return lambda: opacus_ntk(gsm, x, mode)
    if method == "BackPACK BatchGrad + GEMM":
        m = backpack_prepare(model)
        return lambda: backpack_ntk(m, x, mode)
    raise ValueError(f"unknown method {method!r}")


def check_index(n, check_n):
    """Evenly spread sample indices (both ends included) for the float64 agreement check."""
    import torch

    if not check_n or check_n >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, check_n).round().long().unique()


# A child's answers are single lines on stdout starting with MSG (anything a library prints is ignored);
# it reads one command a line on stdin: "time" (one timed call → {"seconds": s}) or "quit".
MSG = "@@bench_models "


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def prepare(spec: dict):
    """Builds one (row, method) in this process and makes its warm-up call (peak RSS measured):
    (record, the timed call or None, finish() → the final record's fields). Saves the checked block
    of the kernel to ``spec["kernel_path"]``."""
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, HERE)
    import _memory
    from lazyfast import zoo

    row, method = spec["row"], spec["method"]
    rec = dict(row=row["id"], method=method, status="ok")
    pkg = PEER_PKG.get(method)
    if pkg is not None:
        import importlib.util

        if importlib.util.find_spec(pkg) is None:
            rec["status"] = f"not installed ({pkg} not importable by {sys.executable})"
            return rec, None, None
    info: dict = {}
    try:
        if method == "float64 reference":
            model = zoo.double(zoo.build(row["model"]))
            x = zoo.inputs(row["model"], row["n"], dtype=torch.float64)
            idx = check_index(row["n"], row["check_n"])
            t0 = time.perf_counter()
            K = tutorial_ntk(model, x[idx], row["mode"], spec["budget"], info)
            rec.update(seconds=time.perf_counter() - t0, check_index=idx.tolist(), info=info)
            torch.save(K, spec["kernel_path"])
            return rec, None, None
        model = zoo.build(row["model"])
        x = zoo.inputs(row["model"], row["n"])
        state = copy.deepcopy(model.state_dict())
        fn = make_method(method, model, x, row["mode"], spec["budget"], info, model_name=row["model"])
        K, t_warm, peak, before = _memory.measure(fn)
        rec.update(warmup_seconds=t_warm, peak_rss_mb=peak / 2**20, extra_peak_mb=(peak - before) / 2**20)
        idx = check_index(row["n"], row["check_n"])
        K = K.detach()
        torch.save(K[idx][:, idx].double().clone(), spec["kernel_path"])
        rec["kernel_shape"] = list(K.shape)
        del K
        import gc

        gc.collect()
        rec["idle_rss_mb"] = _memory._vm("VmRSS") / 2**20  # what it holds while the others are timed
        rec["info"] = info

        def finish():
            after = model.state_dict()
            return dict(state_unchanged=all(torch.equal(state[k], after[k]) for k in state), info=info)

        return rec, fn, finish
    except Exception as e:  # noqa: BLE001 - every failure is recorded, never dropped
        rec["status"] = f"failed: {_err(e)}"
        return rec, None, None


def serve(spec: dict) -> None:
    """The child: prepare, answer its record, then one timed call per "time" command until "quit"
    (or the end of stdin), then the final record."""
    from lazyfast.bench.protocol import timed

    def say(obj):
        sys.stdout.write(MSG + json.dumps(obj) + "\n")
        sys.stdout.flush()

    rec, fn, finish = prepare(spec)
    say(rec)
    if fn is None:
        return
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "time":
            try:
                say({"seconds": timed(fn)})
            except Exception as e:  # noqa: BLE001
                say({"error": _err(e)})
        elif cmd == "quit":
            break
    say(finish())


def _cpu_ns(pid: int) -> Optional[int]:
    """CPU time (ns) used so far by every thread of process ``pid`` (Linux schedstat; None elsewhere)."""
    try:
        total = 0
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        return total
    except (OSError, ValueError, IndexError):
        return None


def settle(pid: int, window: float = 0.005, cap: float = 2.0) -> float:
    """Waits until process ``pid`` has used (almost) no CPU for ``window`` seconds, at most ``cap``;
    returns the seconds waited. After a call a child's OpenMP workers spin on (libgomp's default: tens
    of ms) and would take a core from the next method of the round; without schedstat: ``4 * window``."""
    t0 = time.perf_counter()
    prev = _cpu_ns(pid)
    if prev is None:
        time.sleep(4 * window)
        return time.perf_counter() - t0
    while time.perf_counter() - t0 < cap:
        time.sleep(window)
        cur = _cpu_ns(pid)
        if cur is None or cur - prev < 0.1 * window * 1e9:  # under 10 % of one core: idle
            break
        prev = cur
    return time.perf_counter() - t0


class ChildFailed(RuntimeError):
    """A child that timed out, exited, or whose timed call raised (the message is the status)."""


class Child:
    """One (row, method) in its own process, kept for the row's rounds: :meth:`start` → its record
    after the warm-up and the checked block of its kernel; :meth:`time` → the seconds of one call
    (the child times it); :meth:`close` → the final record's fields."""

    def __init__(self, python: str, spec: dict, timeout: float, tmp: str, tag: str):
        self.timeout = timeout
        self.spec = dict(spec, kernel_path=os.path.join(tmp, f"K-{tag}.pt"))
        spath = os.path.join(tmp, f"spec-{tag}.json")
        with open(spath, "w") as f:
            json.dump(self.spec, f)
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.stderr = open(os.path.join(tmp, f"stderr-{tag}.txt"), "w+")
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--child", spath], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env, cwd=ROOT,
                                     bufsize=1)
        self.answers: "queue.Queue[Optional[dict]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(MSG):
                self.answers.put(json.loads(line[len(MSG):]))
        self.answers.put(None)  # the child's stdout closed: it exited

    def _tail(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        lines = [ln for ln in self.stderr.read().strip().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""

    def _answer(self, what: str) -> dict:
        try:
            msg = self.answers.get(timeout=self.timeout)
        except queue.Empty:
            self.kill()
            raise ChildFailed(f"timed out after {self.timeout:g} s ({what})") from None
        if msg is None:
            rc = self.proc.wait()
            raise ChildFailed(f"failed: child exited {rc} ({what}): {self._tail()}")
        return msg

    def _send(self, cmd: str):
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # it exited: _answer reports how

    def start(self):
        """(record, checked kernel block or None); a child that failed has exited."""
        try:
            rec = self._answer("warm-up")
        except ChildFailed as e:
            return dict(row=self.spec["row"]["id"], method=self.spec["method"], status=str(e)), None
        settle(self.proc.pid)
        K = None
        if rec["status"] == "ok" and os.path.exists(self.spec["kernel_path"]):
            import torch

            K = torch.load(self.spec["kernel_path"])
        return rec, K

    def time(self) -> float:
        self._send("time")
        msg = self._answer("a timed call")
        settle(self.proc.pid)  # before the next method's call: this one's threads have stopped spinning
        if "error" in msg:
            raise ChildFailed(f"failed: {msg['error']}")
        return msg["seconds"]

    def close(self) -> dict:
        if self.proc.poll() is not None:
            return {}
        self._send("quit")
        try:
            out = self._answer("closing")
        except ChildFailed:
            out = {}
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
        return out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __del__(self):
        try:
            self.stderr.close()
        except Exception:  # noqa: BLE001
            pass


def _rel_err(K, ref):
    if K is None or ref is None or tuple(K.shape) != tuple(ref.shape):
        return None
    return float((K - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _git_commit():
    from lazyfast.bench import git_commit

    return git_commit() or "unknown"


# ----------------------------------------------------------------------------- ratios (both formats)
def ratio_vs_auto(rec: dict) -> Optional[dict]:
    """A method's time over ``lazyfast auto``'s in the same row: for an interleaved-rounds run the
    per-round ratios' summary (median, min, max, rounds); for a run of the earlier protocol (best of
    N in a fresh process per method, ``ratio_vs_auto`` one number) that number as the median, with
    min = max = None. None when not measured."""
    r = rec.get("ratio_vs_auto")
    if isinstance(r, dict):
        return r
    if isinstance(r, (int, float)):
        return dict(median=float(r), min=None, max=None)
    return None


def is_rounds(res: dict) -> bool:
    """Whether a results file comes from the interleaved-rounds protocol (else: best of N per process)."""
    return "rounds" in res.get("protocol", {})


def _best_correct_peer(recs):
    ok = [r for r in recs if r["method"] in PEERS and r["status"] == "ok" and r.get("correct")]
    if not ok:
        return None
    return min(ok, key=lambda r: (ratio_vs_auto(r) or {}).get("median", r["seconds"]))


def targets(rows: List[dict]) -> List[dict]:
    """Issue 14's targets, computed from the measured times (never typed): a ratio within one row
    is the median of its per-round ratios (``range``: their min–max) when the row was measured by
    interleaved rounds."""
    from lazyfast.bench.protocol import ratio_summary

    by = {r["id"]: {m["method"]: m for m in r["results"]} for r in rows}
    out = []
    auto = "lazyfast auto"

    def t(rid, meth):
        m = by.get(rid, {}).get(meth)
        return m["seconds"] if m and m["status"] == "ok" else None

    def add(name, value, goal, cmp, unit="×"):
        rng = None
        if isinstance(value, dict):
            if value.get("min") is not None:
                rng = [value["min"], value["max"]]
            value = value["median"]
        met = None if value is None else (value >= goal if cmp == ">=" else value <= goal)
        d = dict(target=name, goal=f"{cmp} {goal:g}{unit}", measured=value, met=met)
        if rng is not None:
            d["range"] = rng
        out.append(d)

    def ratio(rid, base):
        """base's time / auto's in row rid (a summary dict, or None)."""
        m, a = by.get(rid, {}).get(base), by.get(rid, {}).get(auto)
        if not (m and a and m["status"] == "ok" and a["status"] == "ok"):
            return None
        return ratio_vs_auto(m) or dict(median=m["seconds"] / a["seconds"], min=None, max=None)

    if "mlp" in by:
        twin = ratio("mlp", TWIN_MLP)
        if twin is not None and twin.get("rounds"):  # same rounds: auto / lazyfast.MLP per round
            value = ratio_summary([1 / v for v in twin["rounds"]])
        else:  # two rows' times (the mlp_as_lazyfast row)
            a, m = t("mlp", auto), t("mlp_as_lazyfast", auto)
            value = a / m if a and m else None
        add("MLP n=256: auto time / lazyfast.MLP time", value, 1.2, "<=")
        add("MLP n=256: tutorial / auto", ratio("mlp", TUTORIAL), 100, ">=")
        ng = by["mlp"].get("nngeometry GramMatrix")
        add("MLP n=256: nngeometry / auto",
            ratio("mlp", "nngeometry GramMatrix") if ng and ng.get("correct") else None, 1.5, ">=")
    if "shared" in by:
        add("weight sharing: tutorial / auto", ratio("shared", TUTORIAL), 20, ">=")
    for rid in ("vgg11_16_trace", "vgg11_16_full", "vgg11_64_trace", "vgg11_64_full"):
        if rid in by:
            add(f"{rid}: tutorial / auto", ratio(rid, TUTORIAL), 10, ">=")
    if "tv_resnet18" in by:
        add("torchvision resnet18 (BN, eval): tutorial / auto", ratio("tv_resnet18", TUTORIAL), 4, ">=")
    if "transformer" in by:
        add("Transformer: tutorial / auto", ratio("transformer", TUTORIAL), 2, ">=")
    for rid in ("transformer", "token_transformer"):
        if rid in by:
            add(f"{rid} (generic remainder): tutorial / auto", ratio(rid, TUTORIAL), 1, ">=")
    for r in rows:
        recs = r["results"]
        a = by[r["id"]].get(auto)
        best = _best_correct_peer(recs)
        if best is not None:
            add(f"{r['id']}: best correct peer ({best['method'].split()[0]}) / auto",
                ratio(r["id"], best["method"]), 1.5, ">=")
        if a is not None:
            add(f"{r['id']}: auto float32 rel. err vs float64", a.get("rel_err"), F32_TARGET, "<=", unit="")
    if "vgg11_1000_trace" in by:
        a = by["vgg11_1000_trace"].get(auto)
        add("VGG-11 n=1000 trace: peak RSS (GB)",
            a["peak_rss_mb"] / 1024 if a and a["status"] == "ok" else None, 4, "<=", unit=" GB")
    return out


# ----------------------------------------------------------------------------- parent side
def _short(method: str) -> str:
    return {"lazyfast auto": "auto", "lazyfast structured": "structured", TUTORIAL: "tutorial", FLOOR: "floor",
            TWIN_MLP: "lazyfast.MLP"}.get(method, method.split()[0])


def run_row(row: dict, meths: List[str], *, python_main, python_peers, threads, rounds, timeout, budget,
            log=print) -> dict:
    """One row: the float64 reference, then one child per method (started and warmed up one after
    the other, all kept), then ``rounds`` interleaved rounds over the children; the row's record."""
    from lazyfast.bench.protocol import interleaved_rounds, per_round_ratios, ratio_summary

    base = dict(row=row, threads=threads, budget=budget)
    cold = row.get("rounds") == 0
    children: Dict[str, Child] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ref_child = Child(python_main, dict(base, method="float64 reference"), timeout, tmp, "ref")
            ref_rec, ref = ref_child.start()
            ref_child.close()
            log(f"[{row['id']}] float64 reference: {ref_rec['status']} {ref_rec.get('seconds', 0):.2f} s")
            recs = {}
            for i, meth in enumerate(meths):
                py = python_peers if meth in PEERS else python_main
                child = Child(py, dict(base, method=meth), timeout, tmp, str(i))
                rec, K = child.start()
                if rec["status"] == "ok":
                    if meth == FLOOR:
                        rec["rel_err"], rec["correct"] = None, None
                    else:
                        rec["rel_err"] = _rel_err(K, ref)
                        rec["correct"] = rec["rel_err"] is not None and rec["rel_err"] <= WRONG_TOL
                    children[meth] = child
                recs[meth] = rec
                log(f"[{row['id']}] {meth:34s} {rec['status'][:90]:12s} "
                    + (f"warm-up {rec['warmup_seconds']:.4f} s, peak {rec['peak_rss_mb']:.0f} MB, "
                       + (f"rel.err {rec['rel_err']:.1e}" if rec.get("rel_err") is not None else "")
                       if rec["status"] == "ok" else ""))
            if cold:
                times, errors = {m: [recs[m]["warmup_seconds"]] for m in children}, {}
            else:
                def on_round(r, ts):
                    log(f"[{row['id']}] round {r + 1}/{rounds}: "
                        + ", ".join(f"{_short(m)} {v[-1]:.4f} s" for m, v in ts.items() if len(v) == r + 1))

                times, errors = interleaved_rounds({m: c.time for m, c in children.items()}, rounds,
                                                   on_round=on_round, drop_failing=True)
            for meth, child in children.items():
                rec = recs[meth]
                rec.update(child.close())
                ts = times[meth]
                rec.update(times=ts, seconds=statistics.median(ts) if ts else None,
                           timed_runs="1 (cold)" if cold else f"{len(ts)} rounds")
                if meth in errors:
                    rec["status"] = f"stopped in {errors[meth]}"
        finally:
            for child in children.values():
                child.kill()
    auto = recs.get("lazyfast auto")
    if auto is not None and auto["status"] == "ok" and not cold:
        for meth, rec in recs.items():
            if meth != "lazyfast auto" and times.get(meth):
                rec["ratio_vs_auto"] = ratio_summary(per_round_ratios(times[meth], times["lazyfast auto"]))
        log(f"[{row['id']}] median time / auto [min–max over rounds]: " + ", ".join(
            f"{_short(m)} {r['ratio_vs_auto']['median']:.3g} [{r['ratio_vs_auto']['min']:.3g}–"
            f"{r['ratio_vs_auto']['max']:.3g}]" for m, r in recs.items() if r.get("ratio_vs_auto")))
    return dict(row, results=[recs[m] for m in meths], reference=ref_rec)


def run(rows: List[dict], *, python_main, python_peers, threads, rounds, timeout, budget,
        methods: Optional[List[str]] = None, log=print, on_row=None) -> dict:
    """Runs the rows; ``on_row(result so far)`` after each row (partial results, ``complete`` False)."""
    load_before = os.getloadavg()
    t_start = time.time()
    out_rows = []
    cfg = dict(threads=threads, python_main=python_main, python_peers=python_peers, rounds=rounds, timeout=timeout,
               budget=budget)
    for row in rows:
        meths = [m for m in row["methods"] if not methods or m in methods]
        out_rows.append(run_row(row, meths, log=log, **cfg))
        if on_row is not None:
            on_row(_result(out_rows, load_before, t_start, complete=len(out_rows) == len(rows), **cfg))
    return _result(out_rows, load_before, t_start, complete=True, **cfg)


def _result(out_rows, load_before, t_start, *, threads, python_main, python_peers, rounds, timeout, budget, complete):
    import torch

    import lazyfast

    machine = dict(complete=complete, platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cpu_count=os.cpu_count(), threads=threads, torch=torch.__version__,
                   lazyfast_backend=lazyfast.backend_info(), python_main=python_main, python_peers=python_peers,
                   load_before=list(load_before), load_after=list(os.getloadavg()),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=_git_commit(),
                   wall_seconds=time.time() - t_start)
    protocol = dict(order="interleaved rounds (A B C A B C ...), one persistent child process per method",
                    rounds=rounds, statistic="median over rounds; ratios: median of per-round ratios [min, max]",
                    timeout=timeout, tutorial_budget_bytes=budget, wrong_tol=WRONG_TOL, f32_target=F32_TARGET)
    return dict(machine=machine, protocol=protocol, rows=out_rows, targets=targets(out_rows))


def _fmt_s(s):
    return "" if s is None else (f"{s:.3f}" if s >= 0.1 else f"{s * 1e3:.1f} ms")


def _fmt_ratio(summary) -> str:
    """``median× [min–max]`` (3 significant digits; a ratio of the earlier protocol: its one number)."""
    from lazyfast.bench.protocol import format_ratio

    if not summary:
        return ""
    if summary.get("min") is None:
        return f"{summary['median']:.3g}×"
    return format_ratio(summary, fmt="{:.3g}".format)


def format_md(res: dict) -> str:
    m, p = res["machine"], res["protocol"]
    L = ["# eNTK of users' models: lazyfast vs the torch.func tutorial and the PyTorch peers", "",
         "Generated by `benchmarks/bench_models.py` (do not edit by hand)."
         + ("" if m.get("complete", True) else " **Partial: the run was interrupted; rows so far.**"), "",
         f"Command: `{m.get('command', '')}`", "",
         f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['threads']} threads, torch {m['torch']}; "
         f"{m['date']}; commit {m['commit']}; load average before {m['load_before'][0]:.2f}/"
         f"{m['load_before'][1]:.2f}/{m['load_before'][2]:.2f}, after {m['load_after'][0]:.2f}/"
         f"{m['load_after'][1]:.2f}/{m['load_after'][2]:.2f}; total wall {m['wall_seconds'] / 60:.1f} min.", "",
         f"Protocol: one process per method, kept for its row; one warm-up call (its peak RSS reported; idle RSS: "
         f"what the process holds while the others are timed), then all methods of the row in {p['rounds']} "
         f"interleaved rounds (A B C A B C ...); time = median over rounds; method time / auto = median of the "
         f"per-round ratios [min–max over rounds] (rows whose timed runs read \"1 (cold)\" report their one call, "
         f"for calls of minutes); float32, x2=None; relative error = max|K − K64| / max|K64| against the float64 "
         f"kernel (tutorial's method on a float64 copy); a method above {p['wrong_tol']:g} is marked **wrong** and "
         f"not counted as a peer. The tutorial builds J once for the whole batch when it fits in "
         f"{p['tutorial_budget_bytes'] / 2**30:.0f} GiB (otherwise chunked, noted).", "",
         "| row | model | n | mode | method | time (s, median) | timed runs | peak RSS MB | idle RSS MB | "
         "rel. err vs f64 | method time / auto | status |",
         "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        for x in r["results"]:
            ok = x["status"] == "ok"
            err = x.get("rel_err")
            st = (("lower bound" if x["method"] == FLOOR else "ok" if x.get("correct") else "**wrong**") if ok
                  else x["status"])
            notes = "; ".join(str(v) for v in (x.get("info") or {}).values())
            timed_ok = x.get("seconds") is not None
            cells = [r["id"], r["note"] or r["model"], str(r["n"]), r["mode"], x["method"],
                     _fmt_s(x.get("seconds")) if timed_ok else "", str(x.get("timed_runs", "")) if timed_ok else "",
                     f"{x['peak_rss_mb']:.0f}" if "peak_rss_mb" in x else "",
                     f"{x['idle_rss_mb']:.0f}" if "idle_rss_mb" in x else "",
                     (f"{err:.1e}" if err is not None else "—") if "rel_err" in x else "",
                     _fmt_ratio(ratio_vs_auto(x)), (st + (f" ({notes})" if notes else "")).replace("|", "/")]
            L.append("| " + " | ".join(cells) + " |")
    L += ["", "## Targets (issue 14), computed from the measurements above", "",
          "| target | goal | measured (median [min–max over rounds]) | met? |", "|---|---|---:|---|"]
    for t in res["targets"]:
        v = t["measured"]
        rng = f" [{t['range'][0]:.3g}–{t['range'][1]:.3g}]" if t.get("range") else ""
        L.append(f"| {t['target']} | {t['goal']} | {'' if v is None else f'{v:.3g}'}{rng} | "
                 f"{'not measured' if t['met'] is None else ('yes' if t['met'] else '**no**')} |")
    L += ["", "Float64 reference per row: " + "; ".join(
        f"{r['id']}: {r['reference']['status']}" + (f" on {len(r['reference'].get('check_index', []))} samples"
                                                     if r['reference'].get('check_index') else "")
        for r in res["rows"])]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models (smoke run, about a minute)")
    ap.add_argument("--rows", help="comma-separated row ids (default: all; see ROWS_FULL / ROWS_QUICK)")
    ap.add_argument("--methods", help="comma-separated method names (default: all)")
    ap.add_argument("--peers-python", default=os.environ.get("LAZYFAST_PEERS_PYTHON", sys.executable),
                    help="interpreter with nngeometry/opacus/backpack installed (default: this one)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--rounds", type=int, default=5,
                    help=f"interleaved rounds per row (>= {MIN_PUBLISHED_ROUNDS} for benchmarks/results/)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds a method's warm-up or timed call may take")
    ap.add_argument("--tutorial-budget-gb", type=float, default=8.0)
    ap.add_argument("--out", help="output stem (default benchmarks/results/models_cpu, quick: out/models_quick)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    if a.child:
        with open(a.child) as f:
            serve(json.load(f))
        return 0
    import torch

    rows = ROWS_QUICK if a.quick else ROWS_FULL
    if a.rows:
        want = [r for r in a.rows.split(",") if r]
        unknown = sorted(set(want) - {r["id"] for r in rows})
        if unknown:
            ap.error(f"unknown rows {unknown}; rows: {', '.join(r['id'] for r in rows)}")
        rows = [r for r in rows if r["id"] in want]
    methods = a.methods.split(",") if a.methods else None
    if methods:
        unknown = sorted(set(methods) - {m for r in ROWS_FULL + ROWS_QUICK for m in r["methods"]})
        if unknown:
            ap.error(f"unknown methods {unknown}")
    stem = a.out or (os.path.join(ROOT, "out", "models_quick") if a.quick
                     else os.path.join(ROOT, "benchmarks", "results", "models_cpu"))
    published = os.path.abspath(stem).startswith(os.path.join(ROOT, "benchmarks", "results") + os.sep)
    if a.rounds < 1 or (published and a.rounds < MIN_PUBLISHED_ROUNDS):
        ap.error(f"--rounds must be >= 1, and >= {MIN_PUBLISHED_ROUNDS} for results under benchmarks/results/")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    command = "python benchmarks/bench_models.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(res):  # after every row, so an interrupted run keeps what it measured
        from lazyfast._store import atomic_write

        res["machine"]["command"] = command
        atomic_write(stem + ".json", json.dumps(res, indent=1).encode())
        atomic_write(stem + ".md", format_md(res).encode())

    res = run(rows, python_main=sys.executable, python_peers=a.peers_python,
              threads=a.threads or torch.get_num_threads(), rounds=a.rounds, timeout=a.timeout,
              budget=int(a.tutorial_budget_gb * 2**30), methods=methods, on_row=write)
    write(res)
    print(format_md(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
