"""The layer-scale / shift operator rules (``x·γ``, ``x + β``): their shell and per-example gradients.

Taken where a forward multiplies (adds) a parameter broadcast into a tensor (:mod:`.ops`, ``match_op``),
the parameter itself or an order-keeping view of it made in the forward (``γ.reshape(1, -1, 1, 1)``);
∂f_a/∂γ = Σ_broadcast δ_a ⊙ x, ∂f_a/∂β = Σ_broadcast δ_a.
"""
from __future__ import annotations

from torch import nn


class _ScaleShift(nn.Module):
    """x·γ (``weight``) or x + β (``bias``), γ / β broadcast into x."""

    def __init__(self, w, b, view_shape=None):
        super().__init__()
        self._parameters["weight"] = w
        self._parameters["bias"] = b
        self.view_shape = view_shape  # the shape of the view the forward applies (γ.reshape(1, -1, 1, 1)), or None


def _scale_shift_jac(L, cap):
    """Per-example gradients of γ in x·γ (u = x) or β in x + β, γ / β broadcast into the
    per-sample x: [(n·k, P)], summed over the broadcast positions and over the calls."""
    p = L.module.weight if L.kind == "scale" else L.module.bias
    acc = None
    for u, d in cap:
        k, n = d.shape[:2]
        per = d.shape[2:]
        pshape = tuple(L.module.view_shape or p.shape)
        while len(pshape) > len(per):  # leading 1s of a parameter shaped like a whole batch (1, C, 1, 1)
            pshape = pshape[1:]
        pshape = (1,) * (len(per) - len(pshape)) + pshape
        t = d * u.unsqueeze(0) if L.kind == "scale" else d
        dims = [2 + i for i, (a, b) in enumerate(zip(pshape, per)) if a == 1 and b != 1]
        if dims:
            t = t.sum(dims, keepdim=True)
        t = t.reshape(k, n, -1)
        acc = t if acc is None else acc + t
    return [acc.transpose(0, 1).reshape(-1, acc.shape[2])]
