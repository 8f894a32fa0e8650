"""The Embedding rule: the options it takes, and a layer's factors (token indices and their cotangents).

Its three contraction orders (per-example gradients, dense on the distinct tokens of a chunk pair;
position pairs; or "matches": each sample's cotangents summed per token, then the pairs of such rows
with a token in common) are chosen per chunk pair by
:func:`lazyfast._engine.structured.contract._add_embedding`.
"""
from __future__ import annotations

import torch
from torch import nn


def _embedding_options_supported(m: nn.Embedding) -> bool:
    """Neither ``scale_grad_by_freq`` nor ``max_norm`` (which renormalises rows in the forward)."""
    return not (m.scale_grad_by_freq or m.max_norm is not None)


def _embedding_factors(cap):
    """An Embedding layer's calls as indices (n, P) and δ (k, n, P, dim), positions of all calls
    concatenated (weight sharing)."""
    idx = torch.cat([u.reshape(u.shape[0], -1) for u, _ in cap], dim=1)
    d = torch.cat([dd.reshape(dd.shape[0], dd.shape[1], -1, dd.shape[-1]) for _, dd in cap], dim=2)
    return idx, d
