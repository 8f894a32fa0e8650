"""Shared test helpers: dtype/device lists and tolerance-aware comparison."""
from __future__ import annotations

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
