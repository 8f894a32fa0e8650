"""Shared test helpers: dtype/device lists, tolerance-aware comparison and the runtime knobs."""
from __future__ import annotations

import contextlib
import os

import torch

from lazyfast import _ext

DTYPES = (torch.float32, torch.float64)
# Relative tolerances used across the test suite (max-abs error / max-abs of the reference).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def devices():
    """Devices with compiled kernels and hardware: CPU always, CUDA when present."""
    out = ["cpu"]
    if torch.cuda.is_available() and _ext.HAS_CUDA_KERNELS:
        out.append("cuda")
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max(max|b|, tiny), computed in float64."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


def assert_close_rel(a, b, dtype=None, rtol=None, what=""):
    rtol = rtol if rtol is not None else RTOL[dtype or b.dtype]
    err = rel_err(a, b)
    assert err <= rtol, f"{what} relative error {err:.3e} > {rtol:.1e}"


@contextlib.contextmanager
def knobs(**env):
    """Runs a block with the ``LAZYFAST_*`` runtime knobs ``env`` (docs/knobs.md), e.g.
    ``with knobs(LAZYFAST_TWO_LAYER_WORKSPACE_BYTES="65536"): ...``.

    Sets each variable (``str(value)``; ``None`` unsets it) and makes the compiled extension
    re-read them (it reads them once, not on every call: ``_ext.reload_knobs()``); on exit,
    also on an exception, restores the previous environment and reloads again. Yields the
    knobs now in effect (``_ext.knobs()``).
    """
    for name in env:
        if not name.startswith("LAZYFAST_"):
            raise ValueError(f"knobs: {name!r} is not a LAZYFAST_* variable")
    saved = {name: os.environ.get(name) for name in env}

    def put(values):
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = str(value)

    try:
        put(env)
        yield _ext.reload_knobs()
    finally:
        put(saved)
        _ext.reload_knobs()
