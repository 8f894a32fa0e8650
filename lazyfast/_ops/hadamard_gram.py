"""The fused op ``hadamard_gram_sum``: wrapper, fake kernel and autograd (docs/engine.md).

For a 2-D linear layer the per-example gradient w.r.t. W_l is mult_l·δ_l h_{l−1}ᵀ, so

    Θ(x, x')_ab = Σ_l ⟨δ_l,a(x), δ_l,b(x')⟩ · (mult_l² ⟨h_{l−1}(x), h_{l−1}(x')⟩ + 1_bias).

The structured engine (:mod:`lazyfast._engine.structured`) captures δ_l for all k outputs in one
batched backward and h_{l−1} in the forward, then calls the fused op, which tiles the output
and never holds a full per-layer Gram: O(n²·Σ_l width_l) instead of O(n²·P).
:func:`lazyfast._engine.mlp.mlp_ntk` is that engine applied to a :class:`lazyfast.models.MLP`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lazyfast import _ext
from lazyfast._ops import dense

_KERNEL_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- the fused op
def _check_factor_lists(d, h, nd, nh):
    if not isinstance(d, (list, tuple)) or not isinstance(h, (list, tuple)):
        raise TypeError(f"{nd} and {nh} must be lists of tensors")
    if len(d) == 0:
        raise ValueError(f"{nd} must hold at least one layer")
    if len(d) != len(h):
        raise ValueError(f"{nd} has {len(d)} layers but {nh} has {len(h)}")
    for l, (dl, hl) in enumerate(zip(d, h)):
        if not isinstance(dl, torch.Tensor) or dl.dim() != 3:
            raise ValueError(f"{nd}[{l}] must be a 3-D tensor (k, n, w), got "
                             f"{tuple(dl.shape) if isinstance(dl, torch.Tensor) else type(dl).__name__}")
        if not isinstance(hl, torch.Tensor) or hl.dim() != 2:
            raise ValueError(f"{nh}[{l}] must be a 2-D tensor (n, v), got "
                             f"{tuple(hl.shape) if isinstance(hl, torch.Tensor) else type(hl).__name__}")
        if dl.shape[1] != hl.shape[0]:
            raise ValueError(f"{nd}[{l}] has {dl.shape[1]} samples but {nh}[{l}] has {hl.shape[0]}")
        if dl.shape[0] != d[0].shape[0] or dl.shape[1] != d[0].shape[1]:
            raise ValueError(f"{nd}[{l}] has shape {tuple(dl.shape)}; every layer needs (k, n) = {tuple(d[0].shape[:2])}")
        for t, name in ((dl, f"{nd}[{l}]"), (hl, f"{nh}[{l}]")):
            if not t.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
            if t.dtype != d[0].dtype or t.device != d[0].device:
                raise TypeError(f"{name} is {t.dtype} on {t.device} but {nd}[0] is {d[0].dtype} on {d[0].device}")


def _check_scalars(vals, L, name):
    if vals is None:
        return None
    vals = [float(v) for v in vals]
    if len(vals) != L:
        raise ValueError(f"{name} must have one entry per layer ({L}), got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be finite, got {vals}")
    return vals


def hadamard_gram_sum(d1: Sequence[torch.Tensor], h1: Sequence[torch.Tensor],
                      d2: Optional[Sequence[torch.Tensor]] = None, h2: Optional[Sequence[torch.Tensor]] = None, *,
                      h_scale: Optional[Sequence[float]] = None, beta: Optional[Sequence[float]] = None,
                      mode: str = "trace") -> torch.Tensor:
    """Σ_l (D1_l D2_lᵀ) ⊙ (γ_l H1_l H2_lᵀ + β_l) in one tiled pass.

    Args:
        d1: per layer (k, n1, w_l): the D factors with an output axis (δ's of an MLP).
        h1: per layer (n1, v_l): the H factors (layer inputs of an MLP).
        d2, h2: same for the second batch (n2 samples), or both None for d1, h1: the
            symmetric case, where only the upper triangle of tiles is computed.
        h_scale: γ_l per layer (default 1).
        beta: β_l per layer (default 0).
        mode: ``"full"`` → (n1, n2, k, k), out[i, j, a, b] pairs D1[a] with D2[b];
            ``"trace"`` → (n1, n2) = (1/k)·Σ_a out[:, :, a, a].

    Returns:
        The kernel in the factors' dtype. Differentiable in d1, h1, d2, h2.
    """
    if mode not in ("trace", "full"):
        raise ValueError(f"mode must be 'trace' or 'full', got {mode!r}")
    _check_factor_lists(d1, h1, "d1", "h1")
    L = len(d1)
    if (d2 is None) != (h2 is None):
        raise ValueError("d2 and h2 must both be given or both be None")
    if d2 is not None:
        _check_factor_lists(d2, h2, "d2", "h2")
        if len(d2) != L:
            raise ValueError(f"d2 has {len(d2)} layers but d1 has {L}")
        for l in range(L):
            if d2[l].shape[0] != d1[l].shape[0] or d2[l].shape[2] != d1[l].shape[2]:
                raise ValueError(f"d2[{l}] has shape {tuple(d2[l].shape)}, incompatible with d1[{l}] {tuple(d1[l].shape)}")
            if h2[l].shape[1] != h1[l].shape[1]:
                raise ValueError(f"h2[{l}] has {h2[l].shape[1]} features but h1[{l}] has {h1[l].shape[1]}")
            if d2[l].dtype != d1[0].dtype or d2[l].device != d1[0].device:
                raise TypeError(f"d2[{l}] is {d2[l].dtype} on {d2[l].device} but d1 is {d1[0].dtype} on {d1[0].device}")
    h_scale = _check_scalars(h_scale, L, "h_scale") or [1.0] * L
    beta = _check_scalars(beta, L, "beta") or [0.0] * L
    dev, dt = d1[0].device, d1[0].dtype
    if dt in _KERNEL_DTYPES and _ext.kernels_for(dev):
        return torch.ops.lazyfast.hadamard_gram_sum(list(d1), list(h1), list(d2 or []), list(h2 or []),
                                                    h_scale, beta, mode == "full")
    return dense.hadamard_gram_sum(list(d1), list(h1), d2, h2, h_scale, beta, mode=mode)


def _op_dense_backward(d1, h1, d2, h2, h_scale, beta, full, grad):
    """Gradients of the op w.r.t. its factor lists (dense; n1×n2 per layer).
    Symmetric case (d2 = []): both argument slots are the same tensors, so their
    contributions add up."""
    sym = len(d2) == 0
    d2e, h2e = (d1, h1) if sym else (d2, h2)
    k = d1[0].shape[0]
    gd1, gh1, gd2, gh2 = [], [], [], []
    for l in range(len(d1)):
        mh = h_scale[l] * (h1[l] @ h2e[l].T) + beta[l]  # (n1, n2)
        if full:
            g = grad  # (n1, n2, k, k)
            gm = g * mh[:, :, None, None]
            a1 = torch.einsum("ijab,bjw->aiw", gm, d2e[l])
            a2 = torch.einsum("ijab,aiw->bjw", gm, d1[l])
            gdd = torch.einsum("ijab,aiw,bjw->ij", g, d1[l], d2e[l])
        else:
            g = grad / k
            gm = g * mh
            a1 = torch.einsum("ij,ajw->aiw", gm, d2e[l])
            a2 = torch.einsum("ij,aiw->ajw", gm, d1[l])
            gdd = g * torch.einsum("aiw,ajw->ij", d1[l], d2e[l])
        b1 = h_scale[l] * (gdd @ h2e[l])
        b2 = h_scale[l] * (gdd.T @ h1[l])
        if sym:
            gd1.append(a1 + a2)
            gh1.append(b1 + b2)
        else:
            gd1.append(a1), gh1.append(b1), gd2.append(a2), gh2.append(b2)
    return gd1, gh1, gd2, gh2


if _ext._C is not None and hasattr(torch.ops.lazyfast, "hadamard_gram_sum"):

    @torch.library.register_fake("lazyfast::hadamard_gram_sum")
    def _hadamard_gram_sum_fake(d1, h1, d2, h2, h_scale, beta, full):
        """Device, dtype and layout checks of every factor (as csrc/checks.h does), shape checks
        (as csrc/hadamard_gram_args.h does), then the output."""
        torch._check(len(d1) >= 1, lambda: "hadamard_gram_sum: d1 must hold at least one layer")
        _ext.check_op_tensors("hadamard_gram_sum", ("d1", d1), ("h1", h1), ("d2", d2), ("h2", h2))

        def layers(d, h, nd, nh):
            torch._check(len(d) == len(h), lambda: f"hadamard_gram_sum: {nd} has {len(d)} layers but {nh} has {len(h)}")
            for l, (dl, hl) in enumerate(zip(d, h)):
                torch._check(dl.dim() == 3, lambda: f"hadamard_gram_sum: {nd}[{l}] must be 3-D (k, n, w), got {tuple(dl.shape)}")
                torch._check(hl.dim() == 2, lambda: f"hadamard_gram_sum: {nh}[{l}] must be 2-D (n, v), got {tuple(hl.shape)}")
                torch._check(dl.dtype == d1[0].dtype and hl.dtype == d1[0].dtype,
                             lambda: f"hadamard_gram_sum: {nd}[{l}] and {nh}[{l}] must have d1[0]'s dtype {d1[0].dtype}")
                torch._check(dl.shape[0] == d[0].shape[0] and dl.shape[1] == d[0].shape[1],
                             lambda: f"hadamard_gram_sum: {nd}[{l}] must be (k, n, w) with the k and n of {nd}[0]")
                torch._check(hl.shape[0] == dl.shape[1],
                             lambda: f"hadamard_gram_sum: {nh}[{l}] has {hl.shape[0]} rows but {nd}[{l}] has n = {dl.shape[1]}")

        layers(d1, h1, "d1", "h1")
        L = len(d1)
        torch._check(len(h_scale) == L and len(beta) == L,
                     lambda: f"hadamard_gram_sum: h_scale and beta need {L} entries (one per layer)")
        torch._check(len(d2) == len(h2) and len(d2) in (0, L),
                     lambda: f"hadamard_gram_sum: d2 and h2 must both be empty (symmetric case) or both hold {L} layers")
        if len(d2):
            layers(d2, h2, "d2", "h2")
            for l in range(L):
                torch._check(d2[l].shape[0] == d1[l].shape[0] and d2[l].shape[2] == d1[l].shape[2],
                             lambda: f"hadamard_gram_sum: d2[{l}] must have the k and w of d1[{l}]")
                torch._check(h2[l].shape[1] == h1[l].shape[1],
                             lambda: f"hadamard_gram_sum: h2[{l}] has {h2[l].shape[1]} columns but h1[{l}] has {h1[l].shape[1]}")
        n1 = d1[0].shape[1]
        n2 = d2[0].shape[1] if len(d2) else n1
        k = d1[0].shape[0]
        return d1[0].new_empty((n1, n2, k, k) if full else (n1, n2))

    def _hgs_setup_context(ctx, inputs, output):
        d1, h1, d2, h2, h_scale, beta, full = inputs
        ctx.save_for_backward(*d1, *h1, *d2, *h2)
        ctx.meta = (len(d1), len(d2), list(h_scale), list(beta), bool(full))

    def _hgs_backward(ctx, grad):
        L, L2, h_scale, beta, full = ctx.meta
        saved = ctx.saved_tensors
        d1, h1 = list(saved[:L]), list(saved[L:2 * L])
        d2, h2 = list(saved[2 * L:2 * L + L2]), list(saved[2 * L + L2:])
        gd1, gh1, gd2, gh2 = _op_dense_backward(d1, h1, d2, h2, h_scale, beta, full, grad)
        return gd1, gh1, gd2, gh2, None, None, None  # empty lists in the symmetric case

    torch.library.register_autograd("lazyfast::hadamard_gram_sum", _hgs_backward, setup_context=_hgs_setup_context)
