"""Thin Python wrappers over the compiled ops, with their fake kernels (for
``torch.compile``) and autograd formulas. Each wrapper routes to
:mod:`lazyfast._ops.dense` when no compiled kernel serves the input's device."""
from __future__ import annotations

from typing import Optional

import torch

from lazyfast import _ext
from lazyfast._ops import dense

_KERNEL_DTYPES = (torch.float32, torch.float64)


def _check_matrix(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, P), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def gram(j1: torch.Tensor, j2: Optional[torch.Tensor] = None, *, accumulate_f64: bool = False) -> torch.Tensor:
    """Gram matrix of flattened Jacobians, ``J1 @ J2.T``.

    Compiled as ATen GEMM blocks (MKL/oneDNN on the CPU, cuBLAS on CUDA; csrc/gram_aten.h).
    With ``j2`` None (or ``j1`` itself) only the block upper triangle is multiplied and mirrored:
    the result is exactly symmetric, at about 5/8 of the flops once the blocks are large enough
    for the BLAS (float32 needs n >= 1024, float64 n >= 256). On CUDA the float32 GEMMs are IEEE
    float32 unless :mod:`lazyfast.precision` selects ``"tf32"``.
    benchmarks/results/gram_cpu.md compares it with ``j1 @ j2.T``.

    Args:
        j1: (n1, P) rows are per-sample (per-output) Jacobians.
        j2: (n2, P), or None for ``j1`` itself.
        accumulate_f64: accumulate float32 inputs in float64 (float64 slabs of P through DGEMM,
            one rounding at the end; about the cost of ``(j1.double() @ j2.double().T).float()``).

    Returns:
        (n1, n2) in the inputs' dtype. Differentiable in both arguments.
    """
    _check_matrix(j1, "j1")
    if j2 is None:
        j2 = j1
    else:
        _check_matrix(j2, "j2")
        if j2.dtype != j1.dtype:
            raise TypeError(f"j2 has dtype {j2.dtype} but j1 has dtype {j1.dtype}")
        if j2.device != j1.device:
            raise ValueError(f"j2 is on {j2.device} but j1 is on {j1.device}")
        if j2.shape[1] != j1.shape[1]:
            raise ValueError(f"j2 has {j2.shape[1]} columns but j1 has {j1.shape[1]}")
    if j1.dtype in _KERNEL_DTYPES and _ext.kernels_for(j1.device):
        return torch.ops.lazyfast.gram(j1, j2, bool(accumulate_f64))
    return dense.gram(j1, j2, accumulate_f64=accumulate_f64)


if _ext._C is not None:

    @torch.library.register_fake("lazyfast::gram")
    def _gram_fake(j1, j2, accumulate_f64=False):
        _ext.check_op_tensors("gram", ("j1", j1), ("j2", j2))
        torch._check(j1.dim() == 2 and j2.dim() == 2, lambda: "gram: j1 and j2 must be 2-D")
        torch._check(j1.shape[1] == j2.shape[1], lambda: "gram: j1 and j2 must have the same number of columns")
        return j1.new_empty((j1.shape[0], j2.shape[0]))

    def _gram_setup_context(ctx, inputs, output):
        j1, j2, _ = inputs
        ctx.save_for_backward(j1, j2)

    def _gram_backward(ctx, grad):
        j1, j2 = ctx.saved_tensors
        g1 = grad @ j2 if ctx.needs_input_grad[0] else None
        g2 = grad.transpose(0, 1) @ j1 if ctx.needs_input_grad[1] else None
        return g1, g2, None

    torch.library.register_autograd("lazyfast::gram", _gram_backward, setup_context=_gram_setup_context)
