"""JVP, VJP and NTK·v of any module by torch.func, the parameters substituted by name (the engine's
products path: ``lazyfast.jvp`` / ``vjp`` / ``ntk_vp`` on models without a fused kernel).

``tangents``: parameter name → (T, *param.shape), missing names zero. Every function differentiates
the module's trainable parameters only and runs its forward under the alias guard
(:class:`lazyfast._engine.uses.AliasGuard`) of :func:`lazyfast._engine.generic.functional_model`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.func import jvp as _func_jvp, vjp as _func_vjp, vmap

from lazyfast._engine.generic import functional_model

Params = Dict[str, torch.Tensor]


def _out_dim(f, params, x) -> int:
    with torch.no_grad():
        return f(params, x[:1]).shape[1]


def check_tangents(params: Params, tangents: Dict[str, torch.Tensor]) -> int:
    """Validates a tangent dict (name → (T, *param.shape)) against ``params``; returns T."""
    if not isinstance(tangents, dict) or not tangents:
        raise TypeError("tangents must be a non-empty dict: parameter name -> tensor of shape (T, *param.shape)")
    unknown = sorted(set(tangents) - set(params))
    if unknown:
        raise ValueError(f"tangents has names that are not trainable parameters of the model: {unknown}; "
                         f"expected a subset of {sorted(params)}")
    T = None
    for name, t in tangents.items():
        p = params[name]
        if not isinstance(t, torch.Tensor) or t.dim() != p.dim() + 1 or t.shape[1:] != p.shape:
            raise ValueError(f"tangents[{name!r}] must have shape (T, {', '.join(map(str, p.shape))}), "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != p.dtype or t.device != p.device:
            raise TypeError(f"tangents[{name!r}] must have the parameter's dtype/device ({p.dtype}, {p.device}), "
                            f"got ({t.dtype}, {t.device})")
        if T is None:
            T = t.shape[0]
        elif t.shape[0] != T:
            raise ValueError(f"tangents[{name!r}] has {t.shape[0]} tangents but others have {T}")
    return T


def _full_tangents(params: Params, tangents: Dict[str, torch.Tensor]) -> Tuple[Params, int]:
    T = check_tangents(params, tangents)
    full = {n: tangents[n] if n in tangents else torch.zeros((T,) + p.shape, dtype=p.dtype, device=p.device)
            for n, p in params.items()}
    return full, T


def jvp(model: nn.Module, x: torch.Tensor, tangents: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Batched Jacobian-vector products J(w, x)·V for T tangents at once.

    ``tangents``: parameter name → (T, *param.shape); missing names count as zero.
    Returns (T, n, k).
    """
    f, params = functional_model(model)
    full, T = _full_tangents(params, tangents)
    if T == 0 or x.shape[0] == 0:
        k = _out_dim(f, params, x) if x.shape[0] else 1
        return torch.zeros((T, x.shape[0], k), dtype=x.dtype, device=x.device)

    def single(t):
        return _func_jvp(lambda p: f(p, x), (params,), (t,))[1]

    return vmap(single)(full)


def vjp(model: nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Vector-Jacobian product J(w, x)ᵀ·R for a cotangent R of shape (n, k) → name → grad."""
    f, params = functional_model(model)
    _, vjp_fn = _func_vjp(lambda p: f(p, x), params)
    (g,) = vjp_fn(cotangent)
    return g


def ntk_vp(model: nn.Module, x1: torch.Tensor, v: torch.Tensor, x2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Θ(x1, x2)·v without forming Θ: ``out[i, a] = Σ_{j,b} Θ(x1_i, x2_j)_{ab} v[j, b]``.

    One VJP over x2 then one JVP over x1. v: (n2, k) → (n1, k).
    """
    x2 = x1 if x2 is None else x2
    f, params = functional_model(model)
    _, vjp_fn = _func_vjp(lambda p: f(p, x2), params)
    (g,) = vjp_fn(v)
    return _func_jvp(lambda p: f(p, x1), (params,), (g,))[1]
