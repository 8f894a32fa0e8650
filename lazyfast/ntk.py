"""Public eNTK / JVP / VJP / NTK·v API with an ``implementation=`` switch.

``implementation``:
  * ``"jacobian"`` — per-sample Jacobians (``vmap(jacrev)``), contracted; chunked over
    samples. Wins for small P·k and many samples.
  * ``"ntk_vp"`` — one VJP + one JVP per kernel column (never holds a Jacobian).
    Wins when P is huge and n2·k is small.
  * ``"fused"`` — the compiled two-layer kernels (:mod:`lazyfast.two_layer`): only for
    :class:`~lazyfast.models.TwoLayer` models with all parameters trainable. Never holds
    a Jacobian or an (n, m) feature matrix; O(n1·n2·m) for the Gram, O(n·m·d) for JVP/VJP/NTK·v.
  * ``"structured"`` — :class:`lazyfast.models.MLP` only: layerwise factors (one forward,
    one k-wide backward) and the fused ``hadamard_gram_sum`` op, O(n²·Σ widths) instead of
    O(n²·P); chunked over samples within ``memory_budget``.
  * ``"auto"`` — the fastest correct path available for the model: ``"fused"`` for
    ``TwoLayer``, ``"structured"`` for ``MLP``; for generic modules, Jacobian contraction
    (chunked over samples and parameter blocks) or NTK-vector products, whichever a FLOP
    model with the measured forward cost says is cheaper, both within ``memory_budget``
    bytes (:mod:`lazyfast.generic`).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from lazyfast import reference, two_layer
from lazyfast._validation import (check_chunk_size, check_input, check_mode, check_module, model_param_info)

NTK_IMPLEMENTATIONS = ("auto", "fused", "structured", "jacobian", "ntk_vp")
PRODUCT_IMPLEMENTATIONS = ("auto", "fused", "reference")
DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes of Jacobians held at once by the generic path


def _check_impl(implementation, allowed):
    if implementation not in allowed:
        raise ValueError(f"implementation must be one of {allowed}, got {implementation!r}")
    return implementation


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _out_features(model: nn.Module, x: torch.Tensor) -> int:
    k = getattr(model, "out_features", None)
    if k is not None:
        return int(k)
    if x.shape[0] == 0:
        return 1
    with torch.no_grad():
        return model(x[:1]).reshape(1, -1).shape[1]


def auto_chunk_size(model: nn.Module, x: torch.Tensor, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Samples per Jacobian chunk so two chunks (x1 and x2) fit in ``memory_budget`` bytes."""
    _, dtype = model_param_info(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_sample = _out_features(model, x) * _n_params(model) * itemsize
    return max(1, int(memory_budget // (2 * max(per_sample, 1))))


def _use_fused(model, implementation) -> bool:
    """``"fused"`` (TwoLayer required) or ``"auto"`` on a TwoLayer selects lazyfast.two_layer."""
    if implementation == "fused":
        if not two_layer.fused_applicable(model):
            raise ValueError("implementation='fused' needs a lazyfast.models.TwoLayer with all parameters "
                             f"trainable, got {type(model).__name__}")
        return True
    return implementation == "auto" and two_layer.fused_applicable(model)


def _check_pair(model, x1, x2):
    check_module(model)
    check_input(x1, "x1", model)
    if x2 is not None:
        check_input(x2, "x2", model, like=x1)


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
                  implementation: str = "auto", chunk_size: Optional[int] = None,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """Empirical neural tangent kernel Θ(x1, x2) of ``model`` at its current parameters.

    Args:
        model: any ``nn.Module`` mapping (n, ...) → (n, k); derivatives are taken with
            respect to its trainable parameters.
        x1: (n1, ...) inputs.
        x2: (n2, ...) inputs, or None for x1 (neural-tangents convention).
        mode: ``"trace"`` → (n1, n2) = (1/k)·Σ_a Θ_aa; ``"full"`` → (n1, n2, k, k).
        implementation: see the module docstring.
        chunk_size: samples (``"jacobian"``) or kernel columns (``"ntk_vp"``) per chunk;
            None lets ``"auto"`` size it from ``memory_budget``.
        memory_budget: bytes of Jacobians the generic path may hold at once.

    Returns:
        The kernel in the model's dtype, on the model's device.
    """
    _check_pair(model, x1, x2)
    check_mode(mode)
    chunk_size = check_chunk_size(chunk_size)
    _check_impl(implementation, NTK_IMPLEMENTATIONS)
    if _use_fused(model, implementation):
        return two_layer.model_ntk(model, x1, x2, mode=mode)
    from lazyfast.models import MLP  # structured (layerwise) route for deep MLPs

    if isinstance(model, MLP) and implementation in ("auto", "structured") and all(
            p.requires_grad for p in model.parameters()):
        from lazyfast.mlp import mlp_ntk

        return mlp_ntk(model, x1, x2, mode=mode, chunk_size=chunk_size, memory_budget=memory_budget)
    if implementation == "structured":
        raise ValueError("implementation='structured' needs a lazyfast.models.MLP with all parameters trainable, "
                         f"got {type(model).__name__}")
    from lazyfast.generic import generic_ntk  # memory-bounded generic path with a cost-model "auto"

    return generic_ntk(model, x1, x2, mode=mode, implementation=implementation, chunk_size=chunk_size,
                       memory_budget=memory_budget)


def jvp(model: nn.Module, x: torch.Tensor, tangents: Dict[str, torch.Tensor], *,
        implementation: str = "auto") -> torch.Tensor:
    """Batched Jacobian-vector products J(w, x)·V for T tangents at once.

    Args:
        model: the network; x: (n, ...) inputs.
        tangents: parameter name (from ``model.named_parameters()``) → (T, *param.shape);
            missing trainable parameters count as zero.

    Returns:
        (T, n, k).
    """
    check_module(model)
    check_input(x, "x", model)
    _check_impl(implementation, PRODUCT_IMPLEMENTATIONS)
    if _use_fused(model, implementation):
        return two_layer.model_jvp(model, x, tangents)
    return reference.jvp(model, x, tangents)


def _check_cotangent(model, x, r, name):
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(r).__name__}")
    k = _out_features(model, x)
    if r.dim() != 2 or r.shape[0] != x.shape[0] or r.shape[1] != k:
        raise ValueError(f"{name} must have shape ({x.shape[0]}, {k}), got {tuple(r.shape)}")
    if r.dtype != x.dtype or r.device != x.device:
        raise TypeError(f"{name} must have the inputs' dtype and device ({x.dtype}, {x.device}), got ({r.dtype}, {r.device})")
    if r.numel() and not bool(torch.isfinite(r).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def vjp(model: nn.Module, x: torch.Tensor, cotangent: torch.Tensor, *, implementation: str = "auto") -> Dict[str, torch.Tensor]:
    """Vector-Jacobian product J(w, x)ᵀ·R.

    Args:
        x: (n, ...) inputs; cotangent: R, (n, k).

    Returns:
        dict parameter name → gradient shaped like the parameter.
    """
    check_module(model)
    check_input(x, "x", model)
    _check_cotangent(model, x, cotangent, "cotangent")
    _check_impl(implementation, PRODUCT_IMPLEMENTATIONS)
    if _use_fused(model, implementation):
        return two_layer.model_vjp(model, x, cotangent)
    return reference.vjp(model, x, cotangent)


def ntk_vp(model: nn.Module, x1: torch.Tensor, v: torch.Tensor, x2: Optional[torch.Tensor] = None, *,
           implementation: str = "auto") -> torch.Tensor:
    """Kernel-vector product Θ(x1, x2)·v without forming Θ.

    ``out[i, a] = Σ_{j, b} Θ(x1_i, x2_j)_{ab} · v[j, b]``: one VJP over x2, one JVP over x1.

    Args:
        x1: (n1, ...); v: (n2, k); x2: (n2, ...) or None for x1.

    Returns:
        (n1, k).
    """
    _check_pair(model, x1, x2)
    _check_cotangent(model, x1 if x2 is None else x2, v, "v")
    _check_impl(implementation, PRODUCT_IMPLEMENTATIONS)
    if _use_fused(model, implementation):
        return two_layer.model_ntk_vp(model, x1, v, x2)
    return reference.ntk_vp(model, x1, v, x2)
