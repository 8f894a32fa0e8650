"""The Conv rule's own code: a conv input's patches in the weight's flattening order.

``nn.Conv1d/2d/3d`` (stride, padding of every mode, dilation, groups) take the rule through
:mod:`.builtin`; with its patches a conv layer is a linear layer over output positions per group
(:func:`lazyfast._engine.structured.rules.linear._lin_jac`).
"""
from __future__ import annotations

import math

import torch.nn.functional as F


def _conv_patches(m, u):
    """Conv input (n, C_in, *S) → (n, g, D, C_in/g·Πkernel) in the weight's flattening order,
    with the layer's own padding (any padding mode) applied exactly as its forward does."""
    nd = u.dim() - 2
    pad = list(m._reversed_padding_repeated_twice)
    if any(pad):
        u = F.pad(u, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    ks, st, dl = m.kernel_size, m.stride, m.dilation
    n, c = u.shape[:2]
    if nd == 2:
        pt = F.unfold(u, ks, dilation=dl, stride=st)  # (n, C·kh·kw, D)
    else:
        for d in range(nd):
            u = u.unfold(2 + d, dl[d] * (ks[d] - 1) + 1, st[d])[..., ::dl[d]]
        perm = [0, 1] + list(range(2 + nd, 2 + 2 * nd)) + list(range(2, 2 + nd))
        pt = u.permute(perm).reshape(n, c * math.prod(ks), -1)
    g = m.groups
    return pt.reshape(n, g, pt.shape[1] // g, pt.shape[2]).transpose(2, 3)
