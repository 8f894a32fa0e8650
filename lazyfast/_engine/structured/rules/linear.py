"""The Linear rule's own code: the ``addmm`` (in, out) weight shell and linear / conv per-example gradient blocks.

``nn.Linear`` and lazyfast's ``_Dense`` (any input rank, shared calls concatenate positions) take the
rule through :mod:`.builtin`; Hugging Face's ``Conv1D`` (``addmm(b, x, W)``, W (in, out)) through the
operator rules (:mod:`.ops`), holding a :class:`_LinearT`. A conv layer's patches (:mod:`.conv`) make
it a linear layer over positions, so :func:`_lin_jac` serves both.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class _LinearT(nn.Module):
    """``addmm(b, x, W)`` with W (in, out) (Hugging Face's Conv1D) seen as a linear layer: ``weight``
    is Wᵀ (out, in), a view, for the shape-based cost model; ``params`` the real parameters."""

    def __init__(self, W, b):
        super().__init__()
        object.__setattr__(self, "params", (W, b))

    @property
    def weight(self):
        return self.params[0].T

    @property
    def bias(self):
        return self.params[1]


def _lin_jac(L, u, d):
    """Per-example gradient blocks of a linear/conv layer: [(n·k, P_weight), (n·k, P_bias)]."""
    k, n, g, P, o = d.shape
    parts = []
    if L.w_on:
        j = torch.einsum("aigpo,igpq->iagoq", d, u).reshape(n * k, -1)
        parts.append(j * math.sqrt(L.gamma) if L.gamma != 1.0 else j)
    if L.b_on:
        parts.append(_bias_jac(d))
    return parts  # separate blocks: concatenating them would copy as much as a contraction reads


def _bias_jac(d):
    """A linear/conv layer's per-example bias gradients (n·k, g·o) from δ (k, n, g, P, o)."""
    k, n, g, P, o = d.shape
    return d.sum(3).transpose(0, 1).reshape(n * k, g * o)
