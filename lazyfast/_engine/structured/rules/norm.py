"""The norm rule: which norm layers it takes, and the per-example gradients of their affine parameters.

``LayerNorm``, ``GroupNorm``, ``BatchNorm*d`` (eval statistics) and ``InstanceNorm*d`` with the torch
class's own forward; ∂f_a/∂γ = Σ_p δ_{a,p} ⊙ x̂_p and ∂f_a/∂β = Σ_p δ_{a,p} (positions: the
dims other than the normalized / channel one). The operator rules' norm shells
(:mod:`.ops`) are such modules too.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from lazyfast._engine.structured.rules.registry import _plain_forward

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _norm_applies(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
        return False
    for b in type(m).__mro__:  # the concrete torch class whose forward it must keep
        if b.__module__.startswith("torch.nn"):
            return _plain_forward(m, b)
    return False


def _norm_xhat(m, u):
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(u, m.normalized_shape, None, None, m.eps)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(u, m.num_groups, None, None, m.eps)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return F.batch_norm(u, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    use_running = m.track_running_stats and not m.training
    return F.instance_norm(u, m.running_mean if use_running else None, m.running_var if use_running else None,
                           None, None, not use_running, 0.0, m.eps)


def _norm_jac(L, cap):
    """Per-example gradients of a norm layer's affine parameters: [(n·k, E)] per parameter."""
    m = L.module
    E = m.weight.numel() if m.weight is not None else m.bias.numel()
    jw = jb = None
    for u, d in cap:
        k, n = d.shape[:2]
        if isinstance(m, nn.LayerNorm):
            dd = d.reshape(k, n, -1, E)
            xh = _norm_xhat(m, u).reshape(1, n, -1, E) if L.w_on else None
        else:  # channel dim 1
            dd = d.reshape(k, n, E, -1).transpose(2, 3)
            xh = _norm_xhat(m, u).reshape(1, n, E, -1).transpose(2, 3) if L.w_on else None
        if L.w_on:
            t = (dd * xh).sum(2)
            jw = t if jw is None else jw + t
        if L.b_on:
            t = dd.sum(2)
            jb = t if jb is None else jb + t
    return [t.transpose(0, 1).reshape(-1, t.shape[2]) for t in (jw, jb) if t is not None]
