"""Launching small torchrun jobs from tests (2 gloo ranks on the CPU)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Start-up failures of the rendezvous on a loaded machine (not failures of the code under test).
_INFRA = re.compile(r"EADDRINUSE|address already in use|Connection (reset|refused)|rendezvous|timed out", re.I)


def run_job(args, nproc=None, timeout=300):
    """Runs ``python args...`` (nproc=None) or ``torchrun --standalone --nproc_per_node=nproc args...``
    from the repository root with one OpenMP thread per process; returns stdout. A launch that
    fails in the rendezvous is retried once."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    for attempt in range(2):
        r = subprocess.run(launcher + list(args), capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        if r.returncode == 0:
            return r.stdout
        if attempt == 0 and nproc and _INFRA.search(r.stderr):
            continue
        break
    raise AssertionError(f"job failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr[-4000:]}")
