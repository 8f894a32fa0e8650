"""Matmul precision of lazyfast's compiled ops (see docs/gpu.md, "Precision modes").

Two modes, process-wide:

* ``"highest"`` (default): float32 results within float32 accuracy. On CUDA every lazyfast op
  turns cuBLAS TF32 off for its own duration (and restores torch's setting afterwards, also on
  error), whatever ``torch.backends.cuda.matmul.allow_tf32`` says. float64 always runs DGEMM.
* ``"tf32"`` (opt-in fast mode): CUDA float32 GEMMs inside lazyfast ops may use the TF32 tensor
  cores. Its error on the two-layer Gram is not measured on a GPU yet: ``scripts/gpu_check.sh``
  measures it and records it in its results. Plain TF32 products typically land near 1e-3..1e-4
  relative error, far above float32's 1e-7.

The CPU GEMMs are IEEE float32 in both modes. The pure-PyTorch fallbacks (no compiled kernels)
follow torch's own settings.

    import lazyfast.precision as P
    with P.matmul_precision("tf32"):
        K = lazyfast.two_layer_ntk(x, A=A, B=B)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from lazyfast import _ext

MODES = ("highest", "tf32")
_CODES = {"highest": 0, "tf32": 1}
_fallback_mode = "highest"  # used when the compiled extension (or its mode op) is absent


def _op(name):
    if _ext._C is None:
        return None
    try:
        return getattr(torch.ops.lazyfast, name)
    except (AttributeError, RuntimeError):
        return None


def _check(mode) -> str:
    if not isinstance(mode, str):
        raise TypeError(f"matmul precision must be a str, one of {MODES}, got {type(mode).__name__}")
    if mode not in _CODES:
        raise ValueError(f"matmul precision must be one of {MODES}, got {mode!r}")
    return mode


def get_matmul_precision() -> str:
    """The current mode, ``"highest"`` or ``"tf32"``."""
    op = _op("matmul_mode")
    if op is None:
        return _fallback_mode
    return MODES[int(op())]


def set_matmul_precision(mode: str) -> str:
    """Sets the process-wide mode; returns the previous one."""
    global _fallback_mode
    mode = _check(mode)
    op = _op("set_matmul_mode")
    if op is None:
        prev, _fallback_mode = _fallback_mode, mode
        return prev
    return MODES[int(op(_CODES[mode]))]


@contextlib.contextmanager
def matmul_precision(mode: str) -> Iterator[None]:
    """Context manager: ``mode`` inside the block, the previous mode after it (also on error)."""
    prev = set_matmul_precision(mode)
    try:
        yield
    finally:
        set_matmul_precision(prev)
