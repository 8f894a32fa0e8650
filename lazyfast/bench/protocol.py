"""The timing protocol every lazyfast benchmark shares: result stamps (machine, load, date, commit),
the workload and row records, the warm best-of-N timer, and interleaved rounds (every method once
per round, A B C A B C ...) with the per-round ratios' median and min–max."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def git_commit() -> Optional[str]:
    """The commit the results were measured at (``+dirty`` when tracked code differs from it);
    ``LAZYFAST_SOURCE_COMMIT`` names it for a source tree that is not a git checkout."""
    if os.environ.get("LAZYFAST_SOURCE_COMMIT"):
        return os.environ["LAZYFAST_SOURCE_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        # "+dirty": tracked code differs from the commit (results files being rewritten do not count)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results", ":(exclude)README.md",
                                ":(exclude)docs/benchmarks.md", ":(exclude)docs/REPRODUCTION.md"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip()[:12] + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def loadavg() -> Optional[str]:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def stamp(command: Optional[str] = None) -> dict:
    """Where and when a result was measured: every results file carries this (machine, load, date, commit)."""
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg": loadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": git_commit(), "command": command or " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}


@dataclass
class Case:
    """One workload: implementations (name → zero-argument callable), the first baseline is
    the agreement reference; ``flops`` of one call (None: not a FLOP workload);
    ``tol`` overrides the agreement tolerance."""
    impls: Dict[str, Callable[[], object]]
    flops: Optional[float] = None
    tol: Optional[float] = None
    note: str = ""


@dataclass
class Row:
    workload: str
    implementation: str
    seconds: float
    gflops: Optional[float] = None
    gemm_fraction: Optional[float] = None
    peak_mb: Optional[float] = None
    rel_err: Optional[float] = None
    agrees: bool = True
    speedup: Dict[str, float] = field(default_factory=dict)  # lazyfast rows: baseline → time ratio


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, repeats: int) -> float:
    """One warm-up call (also the compared output), then the best of ``repeats`` timed calls."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_gflops(shape, dtype, device, repeats=3) -> float:
    m, k, n = shape
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    t = time_call(lambda: a @ b, device, repeats)
    return 2.0 * m * k * n / t / 1e9


def cuda_time(fn, reps: int = 3) -> float:
    """One warm-up call, then the best of ``reps`` calls timed by CUDA events (the GPU benchmarks' timer)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def sgd_step(module, x, y, lr: float, loss_fn, momentum: float = 0.0):
    """The training step every step benchmark times: zero grads, loss of ``module(x)`` against ``y``,
    backward, one SGD update (``momentum``) of the module's trainable parameters; returns the step
    (→ loss). ``step()`` uses the bound batch; ``step(x, y)`` a new one (x, y may then be None here)."""
    opt = torch.optim.SGD([q for q in module.parameters() if q.requires_grad], lr=lr, momentum=momentum)

    def step(xb=None, yb=None):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(module(x if xb is None else xb), y if yb is None else yb)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def interleaved_rounds(timers: Dict[str, Callable[[], float]], rounds: int, on_round=None,
                       drop_failing: bool = False) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """``rounds`` rounds, each calling every timer once in the same order (A B C A B C ...); a timer
    returns the seconds of one call (it times itself: in this process, or in a child process).
    Returns (name → its per-round seconds, name → error). With ``drop_failing`` a timer that raises
    is recorded and left out of the later rounds (its earlier rounds kept); otherwise it propagates.
    ``on_round(r, times)`` after each round."""
    times: Dict[str, List[float]] = {name: [] for name in timers}
    errors: Dict[str, str] = {}
    for r in range(rounds):
        for name, timer in timers.items():
            if name in errors:
                continue
            try:
                times[name].append(float(timer()))
            except Exception as exc:  # noqa: BLE001 - recorded, the other methods go on
                if not drop_failing:
                    raise
                errors[name] = f"round {r + 1}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if on_round is not None:
            on_round(r, times)
    return times, errors


def timed(fn: Callable[[], object], device="cpu") -> float:
    """Seconds of one call of ``fn`` (an :func:`interleaved_rounds` timer of an in-process method)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def per_round_ratios(num: Sequence[float], den: Sequence[float]) -> List[float]:
    """num[r] / den[r] for the rounds both have (two methods' times from the same rounds)."""
    return [a / b for a, b in zip(num, den)]


def ratio_summary(values: Sequence[float]) -> Optional[dict]:
    """The per-round ratios' median, min and max, and the ratios themselves (None when no round)."""
    v = list(values)
    return dict(median=statistics.median(v), min=min(v), max=max(v), rounds=v) if v else None


def format_ratio(summary: Optional[dict], fmt: Callable[[float], str] = "{:.2f}".format) -> str:
    """``median× [min–max]`` of a :func:`ratio_summary` ("" for None); ``fmt`` writes one number."""
    if not summary:
        return ""
    return f"{fmt(summary['median'])}× [{fmt(summary['min'])}–{fmt(summary['max'])}]"
