"""Peak resident memory of one call, for the benchmarks (Linux: /proc/self/clear_refs resets VmHWM)."""
from __future__ import annotations

import gc
import time


def _vm(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def measure(fn):
    """Runs fn() once: (result, seconds, peak RSS bytes during the call, RSS before it)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS high-water mark
    except OSError:
        pass
    before = _vm("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    return out, dt, _vm("VmHWM"), before
